package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// openFiles puts every saved file descriptor back on its number: regular
// files, directories and devices are reopened by path at their offset,
// fds that share an open file description share one again, and inherited
// fds 0-2 (and copies of them) stay connected to ours. Every other fd is
// closed.
func (p *Process) openFiles() error {
	if err := p.setRlimits(); err != nil {
		return err
	}
	want := map[int]bool{}
	for _, f := range p.fds {
		want[f.Fd] = true
	}
	if p.tree == nil {
		// A single process's own pipes: pthaw holds their ends only
		// until every fd of the process is open.
		p.pipes, p.ptys = map[uint64][2]int{}, map[int]*heldPty{}
		defer func() {
			for _, ends := range p.pipes {
				closeEnds(ends)
			}
			for _, h := range p.ptys {
				h.master.Close()
			}
			p.pipes, p.ptys = nil, nil
		}()
	}
	return p.tr.Do(func() error {
		for _, f := range p.fds {
			switch {
			case f.Kind == image.FDInherit && f.Fd <= 2, p.replaced(f):
				// Already there: the stub inherited our fd.
			case f.Kind == image.FDInherit:
				// A copy of an inherited fd 0-2: dup3 below.
			case f.Desc != f.Fd:
				// Shares the description of an earlier fd: dup3 below.
			default:
				if err := p.openFile(f); err != nil {
					return err
				}
			}
		}

		for _, f := range p.fds {
			if (f.Kind != image.FDInherit || f.Fd > 2) && !p.replaced(f) && f.Desc != f.Fd {
				if !want[f.Desc] {
					return fmt.Errorf("%w: fd %d shares fd %d, which is not in the snapshot", image.ErrCorrupt, f.Fd, f.Desc)
				}
				if _, err := p.call(unix.SYS_DUP3, uintptr(f.Desc), uintptr(f.Fd), uintptr(f.Flags&unix.O_CLOEXEC)); err != nil {
					return fmt.Errorf("fd %d (%s): dup3: %w", f.Fd, f.What, err)
				}
			}
			var fdflags uintptr
			if f.Flags&unix.O_CLOEXEC != 0 {
				fdflags = unix.FD_CLOEXEC
			}
			if _, err := p.call(unix.SYS_FCNTL, uintptr(f.Fd), unix.F_SETFD, fdflags); err != nil {
				return fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
			}
		}
		if len(p.unixEnds) > 0 {
			for id := range p.unixEnds {
				return fmt.Errorf("%w: unix socket %d: its pair's other end has no fd", image.ErrCorrupt, id)
			}
		}
		if p.tree == nil {
			if err := p.fillUnixQueues(); err != nil {
				return err
			}
		}
		// Epoll registrations once every fd they watch is in place,
		// dup'ed ones included.
		for _, f := range p.fds {
			if f.Kind == image.FDEpoll && f.Desc == f.Fd {
				if err := p.watch(f, want); err != nil {
					return err
				}
			}
		}
		// Close everything else (the stub's memfd, our stdio the process
		// did not have).
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid))
		if err != nil {
			return err
		}
		var calls []batchCall
		for _, e := range ents {
			n, err := strconv.Atoi(e.Name())
			if err != nil || want[n] {
				continue
			}
			calls = append(calls, batchCall{nr: unix.SYS_CLOSE, args: [6]uintptr{uintptr(n)},
				fail: func(err error) error { return fmt.Errorf("close fd %d: %w", n, err) }})
		}
		_, err = p.callBatch(calls)
		return err
	})
}

// replaced reports whether f is an fd 0-2 that Options.Stdio replaces
// whatever it was (Options.StdioFiles).
func (p *Process) replaced(f *image.FD) bool {
	return p.opts.StdioFiles && f.Fd >= 0 && f.Fd <= 2 && p.opts.Stdio[f.Fd] != nil
}

// openFile creates f in the process (opens its path, or makes the eventfd
// or epoll instance) and moves it onto f.Fd. Runs on the tracer thread.
func (p *Process) openFile(f *image.FD) error {
	var tmp uintptr
	var err error
	switch f.Kind {
	case image.FDEventfd:
		flags := uintptr(f.Flags & unix.O_NONBLOCK)
		if f.Semaphore {
			flags |= unix.EFD_SEMAPHORE
		}
		if tmp, err = p.call(unix.SYS_EVENTFD2, 0, flags|unix.EFD_CLOEXEC); err != nil {
			return fmt.Errorf("fd %d: eventfd: %w", f.Fd, err)
		}
		// The counter is 64 bits; eventfd2's initial value only 32.
		if f.EventCount > 0 {
			if f.EventCount == ^uint64(0) {
				return fmt.Errorf("%w: fd %d: eventfd counter %#x", image.ErrCorrupt, f.Fd, f.EventCount)
			}
			scratch := p.base + stubScratchOff
			b := make([]byte, 8)
			binary.LittleEndian.PutUint64(b, f.EventCount)
			if err := p.mem.Write(scratch, b); err != nil {
				return err
			}
			if _, err := p.call(unix.SYS_WRITE, tmp, uintptr(scratch), 8); err != nil {
				return fmt.Errorf("fd %d: eventfd counter %d: %w", f.Fd, f.EventCount, err)
			}
		}
		return p.moveFd(f, tmp)
	case image.FDEpoll:
		if tmp, err = p.call(unix.SYS_EPOLL_CREATE1, unix.EPOLL_CLOEXEC); err != nil {
			return fmt.Errorf("fd %d: epoll_create1: %w", f.Fd, err)
		}
		return p.moveFd(f, tmp)
	case image.FDListen:
		if tmp, err = p.listenSocket(f); err != nil {
			return err
		}
		return p.moveFd(f, tmp)
	case image.FDTimerfd, image.FDSignalfd, image.FDInotify, image.FDFanotify:
		if tmp, err = p.openAnon(f); err != nil {
			return err
		}
		return p.moveFd(f, tmp)
	case image.FDTCP, image.FDUDP, image.FDTCPNew:
		if tmp, err = p.newSocket(f); err != nil {
			return err
		}
		return p.moveFd(f, tmp)
	case image.FDUnix:
		if tmp, err = p.unixSocket(f); err != nil {
			return err
		}
		return p.moveFd(f, tmp)
	case image.FDPtyMaster:
		if tmp, err = p.ptyMaster(f); err != nil {
			return err
		}
		return p.moveFd(f, tmp)
	case image.FDFile:
	case image.FDPipe, image.FDPipeOut, image.FDPtySlave:
	default:
		return fmt.Errorf("%w: fd %d of kind %d", image.ErrCorrupt, f.Fd, f.Kind)
	}
	name := f.Path
	if f.Object != 0 {
		if name = p.objectPath(f.Object); name == "" {
			return fmt.Errorf("%w: fd %d: file object %#x not in the snapshot", image.ErrCorrupt, f.Fd, f.Object)
		}
	}
	if f.Kind == image.FDPipe || f.Kind == image.FDPipeOut {
		if name, err = p.pipeEnd(f); err != nil {
			return err
		}
		if tmp, ok, err := p.takePipeEnd(f, name); ok || err != nil {
			if err != nil {
				return err
			}
			return p.moveFd(f, tmp)
		}
	}
	if f.Kind == image.FDPtySlave {
		if name, err = p.ptySlavePath(f); err != nil {
			return err
		}
	}
	path, err := p.putString(name)
	if err != nil {
		return err
	}
	// O_ASYNC too: open keeps the flag but registers nothing, and then
	// F_SETFL cannot (it acts only on a change); setOwners sets it.
	flags := uintptr(f.Flags) &^ (unix.O_CREAT | unix.O_EXCL | unix.O_TRUNC | unix.O_NOCTTY | unix.O_ASYNC)
	if f.Kind == image.FDPtySlave {
		flags |= unix.O_NOCTTY // made the controlling terminal on purpose below
	}
	tmp, err = p.call(unix.SYS_OPEN, path, flags|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fd %d: open %s: %w", f.Fd, name, err)
	}
	if f.Flags&unix.O_PATH == 0 && f.Mode&unix.S_IFMT == unix.S_IFREG {
		if _, err := p.call(unix.SYS_LSEEK, tmp, uintptr(f.Pos), 0); err != nil {
			return fmt.Errorf("fd %d: seek %s to %d: %w", f.Fd, f.Path, f.Pos, err)
		}
	}
	if err := p.moveFd(f, tmp); err != nil {
		return err
	}
	if f.Kind == image.FDPtySlave {
		p.ptyCtty(f)
	}
	return nil
}

// pipeEnd returns the path through which the process opens its end of
// pipe f.Pipe. pthaw makes each pipe of a tree (or of a single process),
// with the data that was
// buffered in it, and holds both ends until the tree starts; a member
// opens /proc/<pthaw>/fd/<end> with its saved flags (a new open file
// description of the same pipe).
func (p *Process) pipeEnd(f *image.FD) (string, error) {
	if f.Kind == image.FDPipeOut {
		if file, ok := p.opts.InheritFDs[f.Fd]; ok {
			var st unix.Stat_t
			if err := unix.Fstat(int(file.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
				return "", fmt.Errorf("fd %d (%s): the fd given for it (%s) is not a pipe or FIFO", f.Fd, f.What, file.Name())
			}
			return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), file.Fd()), nil
		}
		end := "a write end: its writes fail with EPIPE"
		if f.Flags&unix.O_ACCMODE != unix.O_WRONLY {
			end = fmt.Sprintf("a read end: %d buffered bytes, then the end of the stream", len(f.PipeData))
		}
		p.notice("fd %d (%s) led outside the process: it is a pipe whose far end is closed (%s)", f.Fd, f.What, end)
	}
	pipes := p.pipes
	if p.tree != nil {
		pipes = p.tree.pipes
	}
	ends, ok := pipes[f.Pipe]
	if !ok {
		var err error
		open := newPipe
		if f.Path != "" {
			open = openFIFO
		}
		if ends, err = open(f); err != nil {
			return "", fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
		}
		pipes[f.Pipe] = ends
	}
	end := ends[0]
	if f.Flags&unix.O_ACCMODE == unix.O_WRONLY {
		end = ends[1]
	}
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), end), nil
}

// takePipeEnd gives the process pthaw's own end of an unnamed pipe (at
// path, /proc/<pthaw>/fd/N) by an injected pidfd_getfd, for the first fd
// of the process that holds that end, and sets its status flags: the
// pipe() the original made has no O_LARGEFILE, which an open through
// /proc adds (and file_fown-like checks see). ok is false when the fd is
// to be opened by path instead: a FIFO, an end given by -inherit-fd, an
// fd that holds both ends (opened read-write through /proc), a second
// open file description of the same end, or a process restored into a
// PID namespace of its own. Runs on the tracer thread.
func (p *Process) takePipeEnd(f *image.FD, path string) (tmp uintptr, ok bool, err error) {
	var end int
	// In a PID namespace of its own the process cannot name pthaw.
	if f.Path != "" || f.Flags&unix.O_ACCMODE == unix.O_RDWR || p.opts.PIDNamespace {
		return 0, false, nil
	}
	if _, err := fmt.Sscanf(path, fmt.Sprintf("/proc/%d/fd/%%d", os.Getpid()), &end); err != nil {
		return 0, false, nil
	}
	if f.Kind == image.FDPipeOut {
		if _, inherited := p.opts.InheritFDs[f.Fd]; inherited {
			return 0, false, nil
		}
	}
	key := [2]uint64{f.Pipe, uint64(f.Flags & unix.O_ACCMODE)}
	if p.pipesTaken[key] {
		return 0, false, nil
	}
	pidfd, err := p.call(unix.SYS_PIDFD_OPEN, uintptr(os.Getpid()), 0)
	if err != nil {
		return 0, false, fmt.Errorf("fd %d: pidfd_open of pthaw: %w", f.Fd, err)
	}
	tmp, err = p.call(unix.SYS_PIDFD_GETFD, pidfd, uintptr(end), 0)
	p.call(unix.SYS_CLOSE, pidfd)
	if err != nil {
		return 0, false, fmt.Errorf("fd %d: pidfd_getfd of pthaw's pipe end: %w", f.Fd, err)
	}
	// O_DIRECT is a pipe's packet mode; O_ASYNC comes with its owner
	// (setOwners).
	if _, err := p.call(unix.SYS_FCNTL, tmp, unix.F_SETFL, uintptr(f.Flags&(unix.O_NONBLOCK|unix.O_APPEND|unix.O_DIRECT|unix.O_NOATIME))); err != nil {
		p.call(unix.SYS_CLOSE, tmp)
		return 0, false, fmt.Errorf("fd %d: flags: %w", f.Fd, err)
	}
	if p.pipesTaken == nil {
		p.pipesTaken = map[[2]uint64]bool{}
	}
	p.pipesTaken[key] = true
	return tmp, true, nil
}

// newPipe makes the pipe of f (its first fd record) in pthaw, with the
// saved capacity and buffered data.
func newPipe(f *image.FD) ([2]int, error) {
	var ends [2]int
	if err := unix.Pipe2(ends[:], unix.O_CLOEXEC); err != nil {
		return ends, fmt.Errorf("pipe2: %w", err)
	}
	return fillPipe(f, ends)
}

// openFIFO opens the named FIFO of f (its first fd record) in pthaw, for
// reading and writing: one fd that stands for both ends, so that members
// opening it read-only or write-only do not wait for each other. It gets
// the saved capacity and buffered data.
func openFIFO(f *image.FD) ([2]int, error) {
	// Opening has effects for some files (devices): look first. The path
	// was resolved at the freeze, so a symlink here is not the FIFO.
	var st unix.Stat_t
	if err := unix.Lstat(f.Path, &st); err != nil {
		return [2]int{}, fmt.Errorf("FIFO %s: %w", f.Path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return [2]int{}, fmt.Errorf("%s is not a FIFO here", f.Path)
	}
	fd, err := unix.Open(f.Path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return [2]int{}, fmt.Errorf("open FIFO %s: %w", f.Path, err)
	}
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		unix.Close(fd)
		return [2]int{}, fmt.Errorf("%s is not a FIFO here", f.Path)
	}
	// A FIFO's buffer belongs to its inode: bytes in it now were written
	// by someone else (the original tree, still running on this host?),
	// and adding the saved ones would deliver data twice.
	if n, err := unix.IoctlGetInt(fd, unix.TIOCINQ); err != nil || n > 0 { // TIOCINQ is FIONREAD
		unix.Close(fd)
		return [2]int{}, fmt.Errorf("FIFO %s already holds %d bytes: another process is using it", f.Path, n)
	}
	return fillPipe(f, [2]int{fd, fd})
}

// fillPipe gives the pipe behind ends (read, write) f's saved capacity and
// buffered data, closing them on failure.
func fillPipe(f *image.FD, ends [2]int) ([2]int, error) {
	fail := func(err error) ([2]int, error) {
		closeEnds(ends)
		return [2]int{}, err
	}
	if size, err := unix.FcntlInt(uintptr(ends[1]), unix.F_GETPIPE_SZ, 0); f.PipeSize > 0 && (err != nil || size != f.PipeSize) {
		if _, err := unix.FcntlInt(uintptr(ends[1]), unix.F_SETPIPE_SZ, f.PipeSize); err != nil {
			return fail(fmt.Errorf("pipe size %d: %w", f.PipeSize, err))
		}
	}
	if len(f.PipeData) > 0 {
		// Non-blocking: more data than the pipe holds is corruption,
		// not a reason to hang.
		if err := unix.SetNonblock(ends[1], true); err != nil {
			return fail(err)
		}
		for b := f.PipeData; len(b) > 0; {
			n, err := unix.Write(ends[1], b)
			if err != nil {
				return fail(fmt.Errorf("refill %d buffered bytes: %w", len(f.PipeData), err))
			}
			b = b[n:]
		}
	}
	return ends, nil
}

// moveFd puts the new fd tmp on f.Fd. Runs on the tracer thread.
func (p *Process) moveFd(f *image.FD, tmp uintptr) error {
	if int(tmp) == f.Fd {
		return nil
	}
	if _, err := p.call(unix.SYS_DUP3, tmp, uintptr(f.Fd), 0); err != nil {
		return fmt.Errorf("fd %d (%s): dup3: %w", f.Fd, f.What, err)
	}
	_, err := p.call(unix.SYS_CLOSE, tmp)
	return err
}

// watch adds an epoll instance's registrations. Runs on the tracer thread.
func (p *Process) watch(f *image.FD, have map[int]bool) error {
	scratch := p.base + stubScratchOff
	for _, t := range f.Epoll {
		if t.Via != nil {
			if err := p.watchVia(f, t, have); err != nil {
				return err
			}
			continue
		}
		if !have[t.Fd] {
			return fmt.Errorf("%w: fd %d (epoll) watches fd %d, which is not in the snapshot", image.ErrCorrupt, f.Fd, t.Fd)
		}
		// struct epoll_event is packed on x86-64: events, then data.
		b := make([]byte, 12)
		binary.LittleEndian.PutUint32(b[0:], t.Events)
		binary.LittleEndian.PutUint64(b[4:], t.Data)
		if err := p.mem.Write(scratch, b); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_EPOLL_CTL, uintptr(f.Fd), unix.EPOLL_CTL_ADD, uintptr(t.Fd), uintptr(scratch)); err != nil {
			return fmt.Errorf("fd %d: epoll_ctl add fd %d events %#x: %w", f.Fd, t.Fd, t.Events, err)
		}
	}
	return nil
}

// setOwners gives every open file description that had O_ASYNC its
// signal (F_SETSIG), owner (F_SETOWN) and O_ASYNC back, once per
// description. After the sockets are connected and before the
// credentials: F_SETOWN records the caller's, and the kernel lets an
// owner with root's signal anyone, as the original owner could signal
// the process. An owner that is not on this host any more (a process
// outside the snapshot) is left out, and said. Runs on the tracer thread.
func (p *Process) setOwners() error {
	for _, f := range p.fds {
		if f.Flags&unix.O_ASYNC == 0 || f.Desc != f.Fd || f.Kind == image.FDInherit || p.replaced(f) {
			continue
		}
		fd := uintptr(f.Fd)
		if _, err := p.call(unix.SYS_FCNTL, fd, unix.F_SETSIG, uintptr(f.Signal)); err != nil {
			return fmt.Errorf("fd %d (%s): F_SETSIG %d: %w", f.Fd, f.What, f.Signal, err)
		}
		if f.Owner != 0 {
			_, err := p.call(unix.SYS_FCNTL, fd, unix.F_SETOWN, uintptr(f.Owner))
			if errors.Is(err, unix.ESRCH) {
				p.notice("fd %d (%s): its owner for I/O signals, %d, is gone: it has none", f.Fd, f.What, f.Owner)
			} else if err != nil {
				return fmt.Errorf("fd %d (%s): F_SETOWN %d: %w", f.Fd, f.What, f.Owner, err)
			}
		}
		fl, err := p.call(unix.SYS_FCNTL, fd, unix.F_GETFL)
		if err == nil {
			_, err = p.call(unix.SYS_FCNTL, fd, unix.F_SETFL, fl|unix.O_ASYNC)
		}
		if err != nil {
			return fmt.Errorf("fd %d (%s): O_ASYNC: %w", f.Fd, f.What, err)
		}
	}
	return nil
}

// setRlimits applies the saved resource limits. A hard limit above ours
// needs CAP_SYS_RESOURCE; without it, or for an ordinary user whatever
// our capabilities (aboveUser), the limit is capped and the user told.
func (p *Process) setRlimits() error {
	for res, rl := range p.proc.Rlimits {
		want := unix.Rlimit{Cur: rl.Cur, Max: rl.Max}
		if want.Cur > want.Max {
			return fmt.Errorf("%w: rlimit %d soft %d above hard %d", image.ErrCorrupt, res, want.Cur, want.Max)
		}
		var err error = unix.EPERM
		if !aboveUser(p.pid, res, want) {
			err = unix.Prlimit(p.pid, res, &want, nil)
		}
		if err == unix.EPERM {
			var cur unix.Rlimit
			if unix.Prlimit(p.pid, res, nil, &cur) == nil {
				capped := unix.Rlimit{Cur: min(want.Cur, cur.Max), Max: cur.Max}
				if err = unix.Prlimit(p.pid, res, &capped, nil); err == nil {
					p.notice("resource limit %d: hard limit %d lowered to %d (raising it needs CAP_SYS_RESOURCE)", res, want.Max, cur.Max)
				}
			}
		}
		if err != nil {
			return fmt.Errorf("resource limit %d: %w", res, err)
		}
	}
	return nil
}

// listenBacklog is the backlog re-created listeners get: the kernel does
// not report a socket's own; this is SOMAXCONN's default.
const listenBacklog = 4096

// listenSocket creates f's socket with its options. It is bound and made
// to listen by bindListeners, as late as possible: in a migration on one
// host the frozen original holds the address until it is killed.
// Runs on the tracer thread.
func (p *Process) listenSocket(f *image.FD) (uintptr, error) {
	l := f.Listen
	if l == nil || !((l.Family == unix.AF_INET && len(l.IP) == 4) || (l.Family == unix.AF_INET6 && len(l.IP) == 16)) ||
		l.Port < 0 || l.Port > 65535 || (l.Protocol != unix.IPPROTO_TCP && l.Protocol != unix.IPPROTO_MPTCP) {
		return 0, fmt.Errorf("%w: fd %d: listener", image.ErrCorrupt, f.Fd)
	}
	typ := uintptr(unix.SOCK_STREAM | unix.SOCK_CLOEXEC)
	if f.Flags&unix.O_NONBLOCK != 0 {
		typ |= unix.SOCK_NONBLOCK
	}
	s, err := p.call(unix.SYS_SOCKET, uintptr(l.Family), typ, uintptr(l.Protocol))
	if err != nil {
		return 0, fmt.Errorf("fd %d: socket: %w", f.Fd, err)
	}
	scratch := p.base + stubScratchOff
	set := func(level, name uintptr, on bool) error {
		v := []byte{0, 0, 0, 0}
		if on {
			v[0] = 1
		}
		if err := p.mem.Write(scratch, v); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_SETSOCKOPT, s, level, name, uintptr(scratch), 4); err != nil {
			return fmt.Errorf("fd %d: setsockopt %d/%d: %w", f.Fd, level, name, err)
		}
		return nil
	}
	if err := set(unix.SOL_SOCKET, unix.SO_REUSEADDR, l.ReuseAddr); err != nil {
		return 0, err
	}
	if err := set(unix.SOL_SOCKET, unix.SO_REUSEPORT, l.ReusePort); err != nil {
		return 0, err
	}
	if l.Family == unix.AF_INET {
		err = set(unix.IPPROTO_IP, unix.IP_FREEBIND, true)
	} else {
		if err = set(unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, l.V6Only); err == nil {
			err = set(unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, true)
		}
	}
	if err != nil {
		return 0, err
	}
	p.listeners = append(p.listeners, f)
	return s, nil
}

// bindListeners binds the re-created listening sockets and makes them
// listen; before the credentials change, since a port below 1024 needs
// CAP_NET_BIND_SERVICE. scratch is argument memory in the process.
// Runs on the tracer thread.
func (p *Process) bindListeners(scratch uintptr) error {
	for _, f := range p.listeners {
		l := f.Listen
		var sa []byte
		if l.Family == unix.AF_INET {
			sa = make([]byte, 16)
			copy(sa[4:8], l.IP)
		} else {
			sa = make([]byte, 28)
			copy(sa[8:24], l.IP)
			binary.LittleEndian.PutUint32(sa[24:], l.Zone)
		}
		binary.LittleEndian.PutUint16(sa[0:], uint16(l.Family))
		binary.BigEndian.PutUint16(sa[2:], uint16(l.Port))
		if err := p.mem.Write(uint64(scratch), sa); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_BIND, uintptr(f.Fd), scratch, uintptr(len(sa))); err != nil {
			return fmt.Errorf("fd %d: bind %s port %d: %w", f.Fd, net.IP(l.IP), l.Port, err)
		}
		if _, err := p.call(unix.SYS_LISTEN, uintptr(f.Fd), listenBacklog); err != nil {
			return fmt.Errorf("fd %d: listen %s port %d: %w", f.Fd, net.IP(l.IP), l.Port, err)
		}
	}
	return nil
}

// closeEnds closes a pipe's ends; a FIFO's are one fd.
func closeEnds(ends [2]int) {
	unix.Close(ends[0])
	if ends[1] != ends[0] {
		unix.Close(ends[1])
	}
}
