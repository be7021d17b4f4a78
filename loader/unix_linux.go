package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/netns"
	"github.com/pcluster/pcluster/migrate/image"
)

// A unix socket pair both of whose ends the process held is made again by
// a socketpair injected into the process, when the first of its fds is
// placed; the other end waits above every saved fd number until its own
// fd's turn. Once every fd is in place, the messages queued in each end
// are sent into it from the other end through pthaw's duplicates of them
// (pidfd_getfd), in their order and with their boundaries and the fds
// they carried, and then each end is shut down as it was.

// unixSocket returns the process's new fd of the unix socket end f.
// Runs on the tracer thread.
func (p *Process) unixSocket(f *image.FD) (uintptr, error) {
	u := f.Unix
	if u == nil {
		return 0, fmt.Errorf("%w: fd %d: unix socket", image.ErrCorrupt, f.Fd)
	}
	if u.PeerClosed {
		return p.peerClosedEnd(f)
	}
	if u.Handover != nil {
		return p.handOverUnix(f)
	}
	unconnected := u.Peer == 0 && u.Connect == ""
	if unconnected && u.Name == "" {
		// Unbound: a socket of its type is all there is to it.
		typ := uintptr(u.Type) | unix.SOCK_CLOEXEC
		if f.Flags&unix.O_NONBLOCK != 0 {
			typ |= unix.SOCK_NONBLOCK
		}
		s, err := p.call(unix.SYS_SOCKET, unix.AF_UNIX, typ, 0)
		if err != nil {
			return 0, fmt.Errorf("fd %d: socket: %w", f.Fd, err)
		}
		return s, nil
	}
	if (u.Listen || unconnected) && p.tree != nil {
		return p.treeUnixListener(f)
	}
	if u.Listen || unconnected {
		typ := uintptr(u.Type) | unix.SOCK_CLOEXEC
		if f.Flags&unix.O_NONBLOCK != 0 {
			typ |= unix.SOCK_NONBLOCK
		}
		s, err := p.call(unix.SYS_SOCKET, unix.AF_UNIX, typ, 0)
		if err != nil {
			return 0, fmt.Errorf("fd %d: socket: %w", f.Fd, err)
		}
		p.unixListeners = append(p.unixListeners, f)
		return s, nil
	}
	if u.Connect != "" {
		typ := uintptr(u.Type) | unix.SOCK_CLOEXEC
		if f.Flags&unix.O_NONBLOCK != 0 {
			typ |= unix.SOCK_NONBLOCK
		}
		s, err := p.call(unix.SYS_SOCKET, unix.AF_UNIX, typ, 0)
		if err != nil {
			return 0, fmt.Errorf("fd %d: socket: %w", f.Fd, err)
		}
		p.unixConnects = append(p.unixConnects, f)
		return s, nil
	}
	if p.tree != nil {
		return p.treeUnixEnd(f)
	}
	if end, ok := p.unixEnds[u.ID]; ok {
		delete(p.unixEnds, u.ID)
		return end, nil
	}
	var peer *image.FD
	top := 0
	for _, o := range p.fds {
		top = max(top, o.Fd)
		if o.Kind == image.FDUnix && o.Unix != nil && o.Unix.ID == u.Peer && peer == nil {
			peer = o
		}
	}
	if peer == nil || peer.Unix.Peer != u.ID || peer.Unix.Type != u.Type {
		return 0, fmt.Errorf("%w: fd %d: unix socket %d: its peer %d is not in the snapshot", image.ErrCorrupt, f.Fd, u.ID, u.Peer)
	}
	scratch := p.base + stubScratchOff
	if _, err := p.call(unix.SYS_SOCKETPAIR, unix.AF_UNIX, uintptr(u.Type)|unix.SOCK_CLOEXEC, 0, uintptr(scratch)); err != nil {
		return 0, fmt.Errorf("fd %d: socketpair: %w", f.Fd, err)
	}
	b := make([]byte, 8)
	if err := p.mem.Read(scratch, b); err != nil {
		return 0, err
	}
	ends := [2]uintptr{uintptr(binary.LittleEndian.Uint32(b)), uintptr(binary.LittleEndian.Uint32(b[4:]))}
	fail := func(err error) (uintptr, error) {
		p.call(unix.SYS_CLOSE, ends[0])
		p.call(unix.SYS_CLOSE, ends[1])
		return 0, err
	}
	for i, o := range []*image.FD{f, peer} {
		if o.Flags&unix.O_NONBLOCK != 0 {
			if _, err := p.call(unix.SYS_FCNTL, ends[i], unix.F_SETFL, unix.O_NONBLOCK); err != nil {
				return fail(fmt.Errorf("fd %d: O_NONBLOCK: %w", o.Fd, err))
			}
		}
	}
	// Out of the way of the fds still to be placed. Queues are filled
	// once every fd is (fillUnixQueues).
	high, err := p.call(unix.SYS_FCNTL, ends[1], unix.F_DUPFD_CLOEXEC, uintptr(top+1))
	if err != nil {
		return fail(fmt.Errorf("fd %d: move its pair's other end: %w", f.Fd, err))
	}
	p.call(unix.SYS_CLOSE, ends[1])
	if p.unixEnds == nil {
		p.unixEnds = map[uint64]uintptr{}
	}
	p.unixEnds[u.Peer] = high
	return ends[0], nil
}

// shutdownHow turns a socket's sk_shutdown (1 receiving, 2 sending) into
// shutdown(2)'s how, -1 for none.
func shutdownHow(mask int) int {
	switch mask {
	case 1:
		return unix.SHUT_RD
	case 2:
		return unix.SHUT_WR
	case 3:
		return unix.SHUT_RDWR
	}
	return -1
}

// fillUnixQueues sends each unix socket pair's saved queues into it, once
// every fd of the process is in place (a message may carry some of them,
// SCM_RIGHTS), and then shuts each end down as it was. An end's queue is
// sent from its peer, through pthaw's duplicates of the process's fds.
// Runs on the tracer thread.
func (p *Process) fillUnixQueues() error {
	var pidfd int = -1
	defer func() {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
	}()
	get := func(fd int) (int, error) {
		if pidfd < 0 {
			var err error
			if pidfd, err = unix.PidfdOpen(p.pid, 0); err != nil {
				return -1, fmt.Errorf("pidfd_open: %w", err)
			}
		}
		mine, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			return -1, fmt.Errorf("fd %d: pidfd_getfd: %w", fd, err)
		}
		return mine, nil
	}
	fdOf := map[uint64]*image.FD{}
	for _, f := range p.fds {
		if f.Kind == image.FDUnix && f.Unix != nil && f.Unix.Peer != 0 && fdOf[f.Unix.ID] == nil {
			fdOf[f.Unix.ID] = f
		}
	}
	for _, f := range p.fds {
		u := f.Unix
		if f.Kind != image.FDUnix || u == nil || u.Listen || fdOf[u.ID] != f {
			continue
		}
		peer := fdOf[u.Peer]
		if peer == nil {
			return fmt.Errorf("%w: fd %d: unix socket %d: its peer %d is not in the snapshot", image.ErrCorrupt, f.Fd, u.ID, u.Peer)
		}
		if len(u.Queue) == 0 {
			// Its own buffer size all the same (its peer's is set
			// below, or with the peer's queue).
			if s, err := get(f.Fd); err == nil {
				err = setSndBuf(s, u.SndBuf)
				unix.Close(s)
				if err != nil {
					return fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
				}
			}
		}
		if len(u.Queue) > 0 {
			if err := p.fillUnix(get, peer.Fd, peer.Unix.SndBuf, u); err != nil {
				return fmt.Errorf("fd %d (%s): refill its queue: %w", f.Fd, f.What, err)
			}
		}
	}
	for _, f := range p.fds {
		if u := f.Unix; f.Kind == image.FDUnix && u != nil && !u.Listen && fdOf[u.ID] == f {
			if how := shutdownHow(u.Shutdown); how >= 0 {
				if _, err := p.call(unix.SYS_SHUTDOWN, uintptr(f.Fd), uintptr(how)); err != nil {
					return fmt.Errorf("fd %d (%s): shutdown: %w", f.Fd, f.What, err)
				}
			}
		}
	}
	return nil
}

// fillUnix sends u's queue, in order, from the process's socket at fd
// (u's peer), each message with the process's fds it carried. get
// duplicates one of the process's fds into pthaw.
func (p *Process) fillUnix(get func(int) (int, error), fd, sndbuf int, u *image.UnixSocket) error {
	s, err := get(fd)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	if err := setSndBuf(s, sndbuf); err != nil {
		return err
	}
	return sendQueue(s, u, func(_, _, fd int) (int, error) { return get(fd) })
}

// bindUnixListeners binds the re-created listening unix sockets to their
// names and makes them listen, when the process starts: on one host the
// original held the names until it was killed. A path's socket file left
// by the original (nobody accepts on it) is replaced; one another
// process listens on is left to it, and the process starts with that
// socket unbound, which pthaw says. scratch is argument memory in the
// process. Runs on the tracer thread.
func (p *Process) bindUnixListeners(scratch uintptr) error {
	for _, f := range p.unixListeners {
		u := f.Unix
		if u.Name == "" || len(u.Name) > 107 {
			return fmt.Errorf("%w: fd %d: listening unix socket", image.ErrCorrupt, f.Fd)
		}
		name := []byte(u.Name)
		if name[0] == '@' {
			name[0] = 0
		} else if !staleSocket(u.Name) {
			p.notice("fd %d (unix socket listening on %s) cannot be bound here: another process listens there; the process finds it unbound", f.Fd, u.Name)
			continue
		}
		sa := make([]byte, 2+len(name))
		binary.LittleEndian.PutUint16(sa, unix.AF_UNIX)
		copy(sa[2:], name)
		if err := p.mem.Write(uint64(scratch), sa); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_BIND, uintptr(f.Fd), scratch, uintptr(len(sa))); err != nil {
			return fmt.Errorf("fd %d: bind unix socket %s: %w", f.Fd, u.Name, err)
		}
		if name[0] != 0 {
			if err := os.Lchown(u.Name, int(u.Uid), int(u.Gid)); err != nil {
				return fmt.Errorf("fd %d: unix socket %s: %w", f.Fd, u.Name, err)
			}
			if err := unix.Fchmodat(unix.AT_FDCWD, u.Name, u.Mode&0o7777, 0); err != nil {
				return fmt.Errorf("fd %d: unix socket %s: chmod: %w", f.Fd, u.Name, err)
			}
		}
		if !u.Listen {
			continue // bound, not listening
		}
		if _, err := p.call(unix.SYS_LISTEN, uintptr(f.Fd), listenBacklog); err != nil {
			return fmt.Errorf("fd %d: listen on unix socket %s: %w", f.Fd, u.Name, err)
		}
	}
	return nil
}

// connectUnix connects the sockets whose peer was outside (pfreeze
// -unix-reconnect) to the peer's name again, when the process starts. One
// that cannot connect is left unconnected, which pthaw says. scratch is
// argument memory in the process. Runs on the tracer thread.
func (p *Process) connectUnix(scratch uintptr) error {
	for _, f := range p.unixConnects {
		name := []byte(f.Unix.Connect)
		if name[0] == '@' {
			name[0] = 0
		}
		sa := make([]byte, 2+len(name))
		binary.LittleEndian.PutUint16(sa, unix.AF_UNIX)
		copy(sa[2:], name)
		if err := p.mem.Write(uint64(scratch), sa); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_CONNECT, uintptr(f.Fd), scratch, uintptr(len(sa))); err != nil {
			p.notice("fd %d (unix socket) cannot connect again to %s: %v; the process finds it unconnected", f.Fd, f.Unix.Connect, err)
		}
	}
	return nil
}

// staleSocket reports whether path is free for a unix socket to bind:
// nothing there, or a socket file nobody accepts on (the original's),
// which it removes.
func staleSocket(path string) bool {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return true
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return false
	}
	for _, typ := range []int{unix.SOCK_STREAM, unix.SOCK_SEQPACKET, unix.SOCK_DGRAM} {
		s, err := unix.Socket(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			return false
		}
		err = unix.Connect(s, &unix.SockaddrUnix{Name: path})
		unix.Close(s)
		if err != unix.ECONNREFUSED && err != unix.EPROTOTYPE {
			return false // someone listens (or it cannot be told)
		}
	}
	return unix.Unlink(path) == nil
}

// In a tree, the ends of a pair may be held by two members: pthaw makes
// the pair itself (treePair), sends each end's saved queue into it from
// the other end as that end's record arrives, and every member takes its
// end from pthaw with an injected pidfd_getfd, as for a pty master. The
// ends are shut down as they were once every member is built, before any
// runs (a shut-down end could not send the other's queue), and pthaw's
// copies are closed with the tree's pipes.

// treeQueue is the queue of a tree's pair end whose messages carry fds
// (SCM_RIGHTS), sent from pthaw's other end once every member is built.
type treeQueue struct {
	member *Process // the first to hold the end
	f      *image.FD
	from   int // pthaw's other end
}

// sendQueues sends the queues whose messages carry fds (treeQueue), each
// fd taken from the member that holds it (pidfd_getfd), as it is once
// every member is built.
func (t *tree) sendQueues() error {
	pidfds := map[int]int{}
	defer func() {
		for _, fd := range pidfds {
			unix.Close(fd)
		}
	}()
	for _, q := range t.queued {
		get := func(i, j, fd int) (int, error) {
			pid := q.member.pid
			if by := q.f.Unix.Holder(i, j); by != 0 {
				here, ok := t.pids[by]
				if !ok {
					return -1, fmt.Errorf("%w: fd %d of pid %d, not a member", image.ErrCorrupt, fd, by)
				}
				pid = here
			}
			pidfd, ok := pidfds[pid]
			if !ok {
				var err error
				if pidfd, err = unix.PidfdOpen(pid, 0); err != nil {
					return -1, fmt.Errorf("pidfd_open %d: %w", pid, err)
				}
				pidfds[pid] = pidfd
			}
			mine, err := unix.PidfdGetfd(pidfd, fd, 0)
			if err != nil {
				return -1, fmt.Errorf("fd %d of pid %d: pidfd_getfd: %w", fd, pid, err)
			}
			return mine, nil
		}
		if err := sendQueue(q.from, q.f.Unix, get); err != nil {
			return fmt.Errorf("pid %d: fd %d (%s): refill its queue: %w", q.member.proc.Pid, q.f.Fd, q.f.What, err)
		}
	}
	t.queued = nil
	return nil
}

// sendQueue sends u's queue from s, in order, never blocking (a queue
// that does not fit is an error, not a hang). A message's fds
// (SCM_RIGHTS) come from get, given the message, the fd's place in it and
// its number, and are closed after; a stream's bytes may take several
// sends, the fds going with the first.
func sendQueue(s int, u *image.UnixSocket, get func(i, j, fd int) (int, error)) error {
	for i, m := range u.Queue {
		var oob []byte
		if i < len(u.Rights) && len(u.Rights[i]) > 0 {
			if get == nil {
				return fmt.Errorf("%w: message %d carries fds", image.ErrCorrupt, i)
			}
			var mine []int
			for j, r := range u.Rights[i] {
				d, err := get(i, j, r)
				if err != nil {
					closeAll(mine)
					return fmt.Errorf("a file descriptor it carries: %w", err)
				}
				mine = append(mine, d)
			}
			oob = unix.UnixRights(mine...)
			defer closeAll(mine)
		}
		for off := 0; off < len(m) || off == 0; {
			n, err := unix.SendmsgN(s, m[off:], oob, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			if err != nil {
				return fmt.Errorf("%d bytes: %w", len(m), err)
			}
			oob = nil
			if off += n; len(m) == 0 {
				break
			}
		}
	}
	return nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// treePair is a unix socket pair pthaw holds for a tree.
type treePair struct {
	ends     map[uint64]int // by saved inode
	shutdown map[uint64]int // sk_shutdown of each end, once its record came
	sndbuf   map[uint64]int // SO_SNDBUF of each end, set with the shutdowns
}

// treeUnixEnd gives the member the end f of a pair pthaw holds, on a new
// fd. Runs on the tracer thread.
func (p *Process) treeUnixEnd(f *image.FD) (uintptr, error) {
	u := f.Unix
	key := min(u.ID, u.Peer)
	pair, ok := p.tree.unix[key]
	if !ok {
		var fds [2]int
		// In a container's own network namespace, where its members'
		// sockets are (and sock_diag finds them at the next freeze).
		err := p.inContainerNet(func() (err error) {
			fds, err = unix.Socketpair(unix.AF_UNIX, u.Type|unix.SOCK_CLOEXEC, 0)
			return err
		})
		if err != nil {
			return 0, fmt.Errorf("fd %d: socketpair: %w", f.Fd, err)
		}
		pair = &treePair{ends: map[uint64]int{u.ID: fds[0], u.Peer: fds[1]}, shutdown: map[uint64]int{}, sndbuf: map[uint64]int{}}
		p.tree.unix[key] = pair
	}
	mine, ok1 := pair.ends[u.ID]
	other, ok2 := pair.ends[u.Peer]
	if !ok1 || !ok2 || pair.ends[u.ID] == pair.ends[u.Peer] {
		return 0, fmt.Errorf("%w: fd %d: unix socket %d and its peer %d", image.ErrCorrupt, f.Fd, u.ID, u.Peer)
	}
	if _, seen := pair.shutdown[u.ID]; !seen {
		// The first record of this end: its buffer size, and its queue,
		// sent from the other.
		pair.shutdown[u.ID], pair.sndbuf[u.ID] = u.Shutdown, u.SndBuf
		// The other end's own size may not be known yet (its record may
		// come later, and it is set with the shutdowns): room enough for
		// this queue meanwhile.
		if err := roomFor(other, u.Queue); err != nil {
			return 0, fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
		}
		if len(u.Rights) > 0 {
			// Its messages carry fds, which members not yet built
			// may hold: sent once every member is.
			p.tree.queued = append(p.tree.queued, treeQueue{member: p, f: f, from: other})
		} else if err := sendQueue(other, u, nil); err != nil {
			return 0, fmt.Errorf("fd %d (%s): refill its queue: %w", f.Fd, f.What, err)
		}
	}
	tmp, err := p.takeFromPthaw(f, mine)
	if err != nil {
		return 0, err
	}
	if f.Flags&unix.O_NONBLOCK != 0 {
		if _, err := p.call(unix.SYS_FCNTL, tmp, unix.F_SETFL, unix.O_NONBLOCK); err != nil {
			p.call(unix.SYS_CLOSE, tmp)
			return 0, fmt.Errorf("fd %d: O_NONBLOCK: %w", f.Fd, err)
		}
	}
	return tmp, nil
}

// peerClosedEnd makes a unix socket whose peer was closed: pthaw makes a
// pair, sends the saved queue from the other end and closes that, and
// the process takes the first end (in a tree, members that held it take
// the same one). Runs on the tracer thread.
func (p *Process) peerClosedEnd(f *image.FD) (uintptr, error) {
	u := f.Unix
	if p.opts.PIDNamespace {
		// The process, in its own PID namespace, cannot name pthaw.
		return 0, fmt.Errorf("fd %d (%s): a unix socket whose peer was closed is not carried into a new PID namespace (-pidns) yet", f.Fd, f.What)
	}
	var pair *treePair
	if p.tree != nil {
		pair = p.tree.unix[u.ID]
	}
	if pair == nil {
		fds, err := unix.Socketpair(unix.AF_UNIX, u.Type|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return 0, fmt.Errorf("fd %d: socketpair: %w", f.Fd, err)
		}
		pair = &treePair{ends: map[uint64]int{u.ID: fds[0]}, shutdown: map[uint64]int{u.ID: u.Shutdown}, sndbuf: map[uint64]int{}}
		err = roomFor(fds[1], u.Queue)
		if err == nil {
			err = sendQueue(fds[1], u, nil)
		}
		unix.Close(fds[1])
		if err != nil {
			unix.Close(fds[0])
			return 0, fmt.Errorf("fd %d (%s): refill its queue: %w", f.Fd, f.What, err)
		}
		if p.tree != nil {
			p.tree.unix[u.ID] = pair
		}
	}
	tmp, err := p.takeFromPthaw(f, pair.ends[u.ID])
	if p.tree == nil {
		unix.Close(pair.ends[u.ID])
	}
	if err == nil && f.Flags&unix.O_NONBLOCK != 0 {
		if _, err = p.call(unix.SYS_FCNTL, tmp, unix.F_SETFL, unix.O_NONBLOCK); err != nil {
			p.call(unix.SYS_CLOSE, tmp)
			return 0, fmt.Errorf("fd %d: O_NONBLOCK: %w", f.Fd, err)
		}
	}
	return tmp, err
}

// roomFor makes the send buffer of s big enough for queue, so that
// sendQueue never blocks on it.
func roomFor(s int, queue [][]byte) error {
	total := 0
	for _, m := range queue {
		total += len(m) + 1024 // and each message's overhead
	}
	if cur, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil && cur < 2*total {
		return setSndBuf(s, 2*total)
	}
	return nil
}

// takeFromPthaw gives the process a new fd of pthaw's fd mine (an
// injected pidfd_getfd through a pidfd of pthaw: pthawPidfd).
// Runs on the tracer thread.
func (p *Process) takeFromPthaw(f *image.FD, mine int) (uintptr, error) {
	pidfd, err := p.pthawPidfd()
	if err != nil {
		return 0, fmt.Errorf("fd %d: %w", f.Fd, err)
	}
	tmp, err := p.call(unix.SYS_PIDFD_GETFD, pidfd, uintptr(mine), 0)
	p.call(unix.SYS_CLOSE, pidfd)
	if err != nil {
		return 0, fmt.Errorf("fd %d: pidfd_getfd of pthaw's fd %d: %w", f.Fd, mine, err)
	}
	return tmp, nil
}

// pthawPidfd gives the process a pidfd of pthaw, for pidfd_getfd. A
// member of a tree restored into a new PID namespace (-pidns) cannot name
// pthaw by a PID; it reopens pthaw's pidfd of itself through
// /proc/<pthaw>/fd instead (a procfs resolves PIDs in the namespace it was
// mounted for, this host's, as for pipes). Runs on the tracer thread.
func (p *Process) pthawPidfd() (uintptr, error) {
	if p.tree == nil || p.tree.ns == nil {
		pidfd, err := p.call(unix.SYS_PIDFD_OPEN, uintptr(os.Getpid()), 0)
		if err != nil {
			return 0, fmt.Errorf("pidfd_open of pthaw: %w", err)
		}
		return pidfd, nil
	}
	if p.tree.self < 0 {
		self, err := unix.PidfdOpen(os.Getpid(), 0)
		if err != nil {
			return 0, fmt.Errorf("pidfd_open of pthaw itself: %w", err)
		}
		p.tree.self = self
	}
	name := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), p.tree.self)
	path, err := p.putString(name)
	if err != nil {
		return 0, err
	}
	pidfd, err := p.call(unix.SYS_OPEN, path, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("open %s (pthaw's pidfd): %w", name, err)
	}
	return pidfd, nil
}

// treeUnixListener gives the member the listening unix socket f, which
// members of a tree may share: pthaw makes it once and binds it when
// the tree starts (bindTreeListeners); each member takes it from pthaw.
// Runs on the tracer thread.
func (p *Process) treeUnixListener(f *image.FD) (uintptr, error) {
	u := f.Unix
	l, ok := p.tree.listeners[u.ID]
	if !ok {
		s := -1
		// In a container's own network namespace: an abstract name is
		// its namespace's.
		err := p.inContainerNet(func() (err error) {
			s, err = unix.Socket(unix.AF_UNIX, u.Type|unix.SOCK_CLOEXEC, 0)
			return err
		})
		if err != nil {
			return 0, fmt.Errorf("fd %d: socket: %w", f.Fd, err)
		}
		l = &treeListener{fd: s, rec: f}
		p.tree.listeners[u.ID] = l
	}
	tmp, err := p.takeFromPthaw(f, l.fd)
	if err != nil {
		return 0, err
	}
	if f.Flags&unix.O_NONBLOCK != 0 {
		if _, err := p.call(unix.SYS_FCNTL, tmp, unix.F_SETFL, unix.O_NONBLOCK); err != nil {
			p.call(unix.SYS_CLOSE, tmp)
			return 0, fmt.Errorf("fd %d: O_NONBLOCK: %w", f.Fd, err)
		}
	}
	return tmp, nil
}

// treeListener is a listening unix socket pthaw holds for a tree.
type treeListener struct {
	fd  int
	rec *image.FD // its first fd record
}

// bindTreeListeners binds the tree's listening unix sockets and makes
// them listen, once every member is built and before any runs; a name
// another process listens on is left to it, said.
func (p *Process) bindTreeListeners() error {
	for _, l := range p.tree.listeners {
		u := l.rec.Unix
		if u.Name == "" || len(u.Name) > 107 {
			return fmt.Errorf("%w: fd %d: listening unix socket", image.ErrCorrupt, l.rec.Fd)
		}
		// A path as the tree sees it: in a container's own mount
		// namespace, reached from here through its directory.
		name, done, err := p.containerPath(u.Name)
		if err != nil {
			return fmt.Errorf("fd %d: unix socket %s: %w", l.rec.Fd, u.Name, err)
		}
		err = bindTreeListener(l, name)
		done()
		if errors.Is(err, errListenerTaken) {
			p.notice("fd %d (unix socket listening on %s) cannot be bound here: another process listens there; the tree finds it unbound", l.rec.Fd, u.Name)
			continue
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// errListenerTaken: another process listens on a listener's path.
var errListenerTaken = errors.New("another process listens there")

// bindTreeListener binds l to name (its saved name, or the path that
// reaches it from here) and makes it listen.
func bindTreeListener(l *treeListener, name string) error {
	u := l.rec.Unix
	if u.Name[0] != '@' && !staleSocket(name) {
		return errListenerTaken
	}
	if name[0] == '@' {
		name = "\x00" + name[1:]
	}
	if err := unix.Bind(l.fd, &unix.SockaddrUnix{Name: name}); err != nil {
		return fmt.Errorf("fd %d: bind unix socket %s: %w", l.rec.Fd, u.Name, err)
	}
	if u.Name[0] == '/' {
		if err := os.Lchown(name, int(u.Uid), int(u.Gid)); err != nil {
			return fmt.Errorf("fd %d: unix socket %s: %w", l.rec.Fd, u.Name, err)
		}
		if err := unix.Fchmodat(unix.AT_FDCWD, name, u.Mode&0o7777, 0); err != nil {
			return fmt.Errorf("fd %d: unix socket %s: chmod: %w", l.rec.Fd, u.Name, err)
		}
	}
	if !u.Listen {
		return nil // bound, not listening
	}
	if err := unix.Listen(l.fd, listenBacklog); err != nil {
		return fmt.Errorf("fd %d: listen on unix socket %s: %w", l.rec.Fd, u.Name, err)
	}
	return nil
}

// shutdownUnix sends the queues that carry fds (sendQueues), gives the
// tree's pairs' ends their buffer sizes and shuts them down as they were,
// once every member is built; an end no member
// held is corruption.
func (t *tree) shutdownUnix() error {
	if err := t.sendQueues(); err != nil {
		return err
	}
	for _, pair := range t.unix {
		for id, fd := range pair.ends {
			how, seen := pair.shutdown[id]
			if !seen {
				return fmt.Errorf("%w: unix socket %d: no member holds it, though its peer is held", image.ErrCorrupt, id)
			}
			if err := setSndBuf(fd, pair.sndbuf[id]); err != nil {
				return fmt.Errorf("unix socket %d: %w", id, err)
			}
			if h := shutdownHow(how); h >= 0 {
				if err := unix.Shutdown(fd, h); err != nil {
					return fmt.Errorf("unix socket %d: shutdown: %w", id, err)
				}
			}
		}
	}
	return nil
}

// closeUnix closes pthaw's ends of the tree's pairs and its listeners,
// and its pidfd of itself.
func (t *tree) closeUnix() {
	if t.self >= 0 {
		unix.Close(t.self)
		t.self = -1
	}
	for id, l := range t.listeners {
		unix.Close(l.fd)
		delete(t.listeners, id)
	}
	for key, pair := range t.unix {
		for _, fd := range pair.ends {
			unix.Close(fd)
		}
		delete(t.unix, key)
	}
}

// setSndBuf gives the socket s the send buffer size getsockopt reported
// (twice what setsockopt takes), forced past wmem_max as the original's
// may have been (SO_SNDBUFFORCE); 0 leaves it.
func setSndBuf(s, sndbuf int) error {
	if sndbuf <= 0 {
		return nil
	}
	if cur, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil && cur == sndbuf {
		return nil
	}
	if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sndbuf/2); err != nil {
		return fmt.Errorf("SO_SNDBUFFORCE %d: %w", sndbuf/2, err)
	}
	return nil
}

// unixOptions sets SO_PASSCRED and SO_PASSSEC on the unix sockets that
// had them, however they were made again. Runs on the tracer thread;
// scratch is argument memory in the process.
func (p *Process) unixOptions(scratch uintptr) error {
	for _, f := range p.fds {
		u := f.Unix
		if f.Kind != image.FDUnix || u == nil || f.Desc != f.Fd || p.replaced(f) {
			continue
		}
		s := &sockCalls{p: p, fd: uintptr(f.Fd), scratch: scratch}
		if u.PassCred {
			if err := s.setInt(unix.SOL_SOCKET, unix.SO_PASSCRED, 1, "SO_PASSCRED"); err != nil {
				return fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
			}
		}
		if u.PassSec {
			if err := s.setInt(unix.SOL_SOCKET, unix.SO_PASSSEC, 1, "SO_PASSSEC"); err != nil {
				return fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
			}
		}
	}
	return nil
}

// handOverUnix gives the process the very socket f its original held at
// u.Handover's pid and fd, connected to a peer outside (pfreeze -halt to
// a listening pthaw): pthaw takes it from the original, held frozen by
// pfreeze until the copy is built, and the process takes it from pthaw.
// The peer keeps its connection and every byte queued either way. Only
// on the host the original runs on: pthaw's network namespace must be
// the one pfreeze ran in, and the fd must still be that socket.
// Runs on the tracer thread.
func (p *Process) handOverUnix(f *image.FD) (uintptr, error) {
	h := f.Unix.Handover
	what := fmt.Sprintf("fd %d (unix socket connected outside, pid %d's fd %d)", f.Fd, h.Pid, h.Fd)
	if own, err := netns.Cookie(); err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	} else if own != h.NetNS {
		return 0, fmt.Errorf("%s: frozen on another host (network namespace): a connection to a peer outside is handed over only on its own host", what)
	}
	pidfd, err := unix.PidfdOpen(h.Pid, 0)
	if err != nil {
		return 0, fmt.Errorf("%s: the original is gone (the connection is handed over only while pfreeze -halt holds it): %w", what, err)
	}
	mine, err := unix.PidfdGetfd(pidfd, h.Fd, 0)
	unix.Close(pidfd)
	if err != nil {
		return 0, fmt.Errorf("%s: take it from the original: %w", what, err)
	}
	defer unix.Close(mine)
	var st unix.Stat_t
	if err := unix.Fstat(mine, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Ino != f.Unix.ID {
		return 0, fmt.Errorf("%s: that fd is no longer socket:[%d] (the original is gone)", what, f.Unix.ID)
	}
	return p.takeFromPthaw(f, mine)
}
