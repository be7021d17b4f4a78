package capture

import (
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// Character devices that carry no state and can simply be reopened.
var statelessDevices = map[string]bool{
	"/dev/null": true, "/dev/zero": true, "/dev/full": true,
	"/dev/random": true, "/dev/urandom": true,
}

// describeFDs records every open file descriptor, refusing those a restore
// could not rebuild. Sockets are held in socks (tcp_linux.go) until the
// process resumes or is killed. In a tree, inner holds the pipes with both ends
// inside it (by inode), each true once its buffered data is saved.
func describeFDs(pid int, inner map[uint64]bool, socks *sockets) ([]image.FD, error) {
	infos, err := procfs.FDs(pid)
	if err != nil {
		return nil, fmt.Errorf("fds: %w", err)
	}
	var out []image.FD
	for _, fi := range infos {
		where := fmt.Sprintf("fd %d (%s)", fi.Fd, fi.Link)
		var st syscall.Stat_t
		if err := syscall.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fi.Fd), &st); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		fd := image.FD{Fd: fi.Fd, Flags: fi.Flags, Pos: fi.Pos, Mode: st.Mode, What: fi.Link, Desc: fi.Fd}
		kind := st.Mode & syscall.S_IFMT
		tty := kind == syscall.S_IFCHR && isTTY(st.Rdev)
		stream := kind == syscall.S_IFIFO || kind == syscall.S_IFSOCK || tty
		pipe, isPipe := pipeID(fi.Link, &st)
		_, innerPipe := inner[pipe]
		ptyIndex, isSlave := slaveIndex(st.Rdev)
		isSlave = isSlave && kind == syscall.S_IFCHR
		switch {
		case kind == syscall.S_IFCHR && isPtmx(st.Rdev) && strings.Contains(fi.Link, "ptmx"):
			if err := describePtyMaster(pid, fi.Fd, &fd); err != nil {
				return nil, &unsupportedError{msg: fmt.Sprintf("%s: %v", where, err), cause: err}
			}
		case isSlave && socks.ptys[ptyIndex]:
			if err := describePtySlave(pid, fi.Fd, ptyIndex, st.Rdev, &fd); err != nil {
				return nil, &unsupportedError{msg: fmt.Sprintf("%s: %v", where, err), cause: err}
			}
		case isPipe && innerPipe:
			fd.Kind, fd.Pipe = image.FDPipe, pipe
			if pipe&namedFIFO != 0 {
				fd.Path = fi.Link
			}
			if !inner[pipe] {
				if fd.PipeSize, fd.PipeData, err = peekPipe(pid, fi.Fd); err != nil {
					return nil, fmt.Errorf("%s: %w", where, err)
				}
				inner[pipe] = true
			}
		case fi.Fd <= 2 && stream:
			fd.Kind = image.FDInherit
		case stream && dupOfInherited(pid, fi.Fd, out):
			// A copy of fd 0-2 (a shell saves its stdin at fd 10 while
			// it redirects): a copy of pthaw's on restore. Desc is set
			// below.
			fd.Kind = image.FDInherit
		case fi.Link == "anon_inode:[eventfd]":
			fd.Kind = image.FDEventfd
			for _, line := range fi.Extra {
				k, v, _ := strings.Cut(line, ":")
				v = strings.TrimSpace(v)
				switch k {
				case "eventfd-count":
					fd.EventCount, _ = strconv.ParseUint(v, 16, 64)
				case "eventfd-semaphore":
					fd.Semaphore = v == "1"
				}
			}
		case fi.Link == "anon_inode:[eventpoll]":
			fd.Kind = image.FDEpoll
			for _, line := range fi.Extra {
				var t image.EpollTarget
				if _, err := fmt.Sscanf(line, "tfd: %d events: %x data: %x", &t.Fd, &t.Events, &t.Data); err != nil {
					return nil, fmt.Errorf("%s: fdinfo line %q: %w", where, line, err)
				}
				fd.Epoll = append(fd.Epoll, t)
			}
		case kind == syscall.S_IFSOCK && fi.Fd > 2 && dupOfSocket(pid, fi.Fd, out, &fd):
			// A copy (dup) of a socket described above: the same socket
			// once (it is held, and its filter attached, once).
		case anonKinds[fi.Link] != 0:
			if err := describeAnon(pid, &fd, anonKinds[fi.Link], fi); err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
		case kind == syscall.S_IFSOCK && fi.Fd > 2:
			if err := describeSocket(pid, fi.Fd, socks, &fd); err != nil {
				return nil, &unsupportedError{msg: fmt.Sprintf("%s: %v", where, err), cause: err}
			}
		case isPipe && fi.Fd > 2:
			// Its other end is outside: the copy gets a pipe whose far
			// end is closed (or what pthaw -inherit-fd gives it). The
			// bytes buffered for a read end are the process's to read;
			// those a write end left are the outside reader's.
			fd.Kind, fd.Pipe = image.FDPipeOut, pipe
			size, data, err := peekPipe(pid, fi.Fd)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			fd.PipeSize = size
			end := "write end: writing to it will fail with EPIPE"
			if fi.Flags&unix.O_ACCMODE != unix.O_WRONLY {
				fd.PipeData = data
				end = fmt.Sprintf("read end: its %d buffered bytes kept, then the end of the stream", len(data))
			}
			socks.say("%s leads outside the process: the copy gets a pipe whose far end is closed (%s), unless pthaw -inherit-fd %d=FD gives it one", where, end, fi.Fd)
		case stream || strings.HasPrefix(fi.Link, "anon_inode:"):
			return nil, unsupported("%s: terminals (but ptys whose master the process holds) and this kind of anonymous inode beyond fds 0-2 are not supported yet", where)
		case strings.HasSuffix(fi.Link, " (deleted)") || strings.HasPrefix(fi.Link, "/memfd:"):
			_, _, id, ok, err := fileObject(fi.Link, &st)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			if !ok {
				return nil, unsupported("%s: file deleted", where)
			}
			fd.Kind, fd.Path, fd.Object = image.FDFile, fi.Link, id
		case kind == syscall.S_IFCHR:
			if !statelessDevices[fi.Link] {
				return nil, unsupported("%s: device", where)
			}
			fd.Kind, fd.Path = image.FDFile, fi.Link
		case kind == syscall.S_IFREG || kind == syscall.S_IFDIR || kind == syscall.S_IFBLK:
			if err := namesFile(pid, fi.Link, &st, "open file"); err != nil {
				return nil, unsupported("%s: %v", where, err)
			}
			fd.Kind, fd.Path = image.FDFile, fi.Link
		default:
			return nil, unsupported("%s: file type %#o", where, kind)
		}
		if fi.Flags&unix.O_ASYNC != 0 && fd.Kind != image.FDInherit {
			if fd.Owner, fd.Signal, err = fileOwner(pid, fi.Fd); err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
		}
		out = append(out, fd)
	}
	// An epoll instance watches files by the fd number they were added
	// under: each must still be at that number or at another one.
	if err := findEpollTargets(pid, out); err != nil {
		return nil, err
	}
	// fds that share one open file description (dup, fork) must share it
	// again: they share the offset and status flags.
	for i := range out {
		for j := 0; j < i; j++ {
			if out[j].Desc != out[j].Fd || out[j].Kind != out[i].Kind {
				continue
			}
			same, err := kcmpFile(pid, out[i].Fd, out[j].Fd)
			if err != nil {
				return nil, err
			}
			if same {
				out[i].Desc = out[j].Fd
				break
			}
		}
	}
	return out, nil
}

// fileOwner reads the owner (F_GETOWN) and signal (F_GETSIG) of pid's fd
// through a duplicate: they belong to the open file description, which
// the duplicate shares (closing it drops no O_ASYNC registration: that
// goes only with the description's last reference).
func fileOwner(pid, fd int) (owner, sig int, err error) {
	dup, err := dupFd(pid, fd)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(dup)
	if owner, err = unix.FcntlInt(uintptr(dup), unix.F_GETOWN, 0); err != nil {
		return 0, 0, fmt.Errorf("F_GETOWN: %w", err)
	}
	if sig, err = unix.FcntlInt(uintptr(dup), unix.F_GETSIG, 0); err != nil {
		return 0, 0, fmt.Errorf("F_GETSIG: %w", err)
	}
	return owner, sig, nil
}

// dupOfSocket reports whether pid's fd shares its open file description
// with a socket fd in prev, and if so gives rec that fd's socket.
func dupOfSocket(pid, fd int, prev []image.FD, rec *image.FD) bool {
	for _, o := range prev {
		if o.Kind != image.FDListen && o.Kind != image.FDTCP && o.Kind != image.FDUDP && o.Kind != image.FDTCPNew && o.Kind != image.FDUnix {
			continue
		}
		if same, err := kcmpFile(pid, fd, o.Fd); err == nil && same {
			rec.Kind, rec.Listen, rec.TCP, rec.UDP, rec.Unix = o.Kind, o.Listen, o.TCP, o.UDP, o.Unix
			return true
		}
	}
	return false
}

// dupOfInherited reports whether pid's fd shares its open file description
// with one of its fds 0-2 that lead outside (in prev).
func dupOfInherited(pid, fd int, prev []image.FD) bool {
	for _, o := range prev {
		if o.Kind == image.FDInherit && o.Fd <= 2 {
			if same, err := kcmpFile(pid, fd, o.Fd); err == nil && same {
				return true
			}
		}
	}
	return false
}

// peekPipe returns the capacity of the pipe at pid's fd and the bytes
// buffered in it, without consuming them: a read end of our own (opened
// through /proc, whichever end fd is) is tee(2)d into a pipe of ours.
func peekPipe(pid, fd int) (int, []byte, error) {
	src, err := unix.Open(fmt.Sprintf("/proc/%d/fd/%d", pid, fd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, nil, fmt.Errorf("open pipe: %w", err)
	}
	defer unix.Close(src)
	size, err := unix.FcntlInt(uintptr(src), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		return 0, nil, fmt.Errorf("pipe size: %w", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return 0, nil, err
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, size); err != nil {
		return 0, nil, fmt.Errorf("pipe size %d: %w", size, err)
	}
	n, err := unix.Tee(src, p[1], size, unix.SPLICE_F_NONBLOCK)
	if err == unix.EAGAIN {
		return size, nil, nil // empty
	}
	if err != nil {
		return 0, nil, fmt.Errorf("tee: %w", err)
	}
	data := make([]byte, n)
	for off := 0; off < len(data); {
		m, err := unix.Read(p[0], data[off:])
		if err != nil {
			return 0, nil, fmt.Errorf("read pipe copy: %w", err)
		}
		off += m
	}
	return size, data, nil
}

// namedFIFO marks the pipeID of a FIFO that is reopened by its path.
const namedFIFO = 1 << 63

// pipeID identifies the pipe behind an fd whose /proc link is link and
// whose stat is st: an anonymous pipe by its inode, a named FIFO by its
// device and inode with namedFIFO set. A FIFO whose path no longer names
// it (unlinked, replaced) can only be reached through the fds that hold
// it, so it counts as an anonymous pipe.
func pipeID(link string, st *syscall.Stat_t) (uint64, bool) {
	if st.Mode&syscall.S_IFMT != syscall.S_IFIFO {
		return 0, false
	}
	if strings.HasPrefix(link, "pipe:[") {
		return st.Ino, true
	}
	var pst syscall.Stat_t
	if err := syscall.Stat(link, &pst); err != nil || pst.Dev != st.Dev || pst.Ino != st.Ino {
		return st.Ino, true
	}
	h := fnv.New64a()
	fmt.Fprintf(h, "%d:%d", st.Dev, st.Ino)
	return h.Sum64() | namedFIFO, true
}

func isTTY(rdev uint64) bool {
	switch unix.Major(rdev) {
	case 4, 5, 136, 137, 138, 139, 140, 141, 142, 143:
		return true
	}
	return false
}

func kcmpFile(pid, fd1, fd2 int) (bool, error) {
	const kcmpFile = 0
	r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid), uintptr(pid), kcmpFile, uintptr(fd1), uintptr(fd2), 0)
	if e != 0 {
		return false, fmt.Errorf("kcmp fds %d and %d: %w", fd1, fd2, e)
	}
	return r == 0, nil
}

// sharedWith names what pid shares with other by clone flags without being
// its thread (CLONE_VM, CLONE_FILES, CLONE_FS, CLONE_SIGHAND): state a
// restore would silently split in two.
func sharedWith(pid, other int) []string {
	var shared []string
	for _, k := range []struct {
		typ  uintptr
		name string
	}{{1, "memory (CLONE_VM: a vfork child before its exec?)"}, {2, "fd table (CLONE_FILES)"},
		{3, "cwd and umask (CLONE_FS)"}, {4, "signal handlers (CLONE_SIGHAND)"}} {
		r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid), uintptr(other), k.typ, 0, 0, 0)
		if e == 0 && r == 0 {
			shared = append(shared, k.name)
		}
	}
	return shared
}
