package capture

import (
	"fmt"
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
// could not rebuild. In a tree, inner holds the pipes with both ends
// inside it (by inode), each true once its buffered data is saved.
func describeFDs(pid int, inner map[uint64]bool) ([]image.FD, error) {
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
		_, innerPipe := inner[st.Ino]
		switch {
		case kind == syscall.S_IFIFO && innerPipe:
			fd.Kind, fd.Pipe = image.FDPipe, st.Ino
			if !inner[st.Ino] {
				if fd.PipeSize, fd.PipeData, err = peekPipe(pid, fi.Fd); err != nil {
					return nil, fmt.Errorf("%s: %w", where, err)
				}
				inner[st.Ino] = true
			}
		case fi.Fd <= 2 && stream:
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
		case kind == syscall.S_IFSOCK && fi.Fd > 2:
			l, err := describeListener(pid, fi.Fd)
			if err != nil {
				return nil, unsupported("%s: %v", where, err)
			}
			fd.Kind, fd.Listen = image.FDListen, l
		case stream || strings.HasPrefix(fi.Link, "anon_inode:"):
			return nil, unsupported("%s: pipes, sockets, terminals and anonymous inodes beyond fds 0-2 are not supported yet", where)
		case strings.HasSuffix(fi.Link, " (deleted)"):
			return nil, unsupported("%s: file deleted", where)
		case kind == syscall.S_IFCHR:
			if !statelessDevices[fi.Link] {
				return nil, unsupported("%s: device", where)
			}
			fd.Kind, fd.Path = image.FDFile, fi.Link
		case kind == syscall.S_IFREG || kind == syscall.S_IFDIR || kind == syscall.S_IFBLK:
			var pst syscall.Stat_t
			if err := syscall.Stat(fi.Link, &pst); err != nil || pst.Ino != st.Ino || pst.Dev != st.Dev {
				return nil, unsupported("%s: path no longer names the open file", where)
			}
			fd.Kind, fd.Path = image.FDFile, fi.Link
		default:
			return nil, unsupported("%s: file type %#o", where, kind)
		}
		out = append(out, fd)
	}
	// An epoll instance watches fds by number: they must all be here.
	have := map[int]bool{}
	for _, f := range out {
		have[f.Fd] = true
	}
	for _, f := range out {
		for _, t := range f.Epoll {
			if !have[t.Fd] {
				return nil, unsupported("fd %d (epoll) watches fd %d, which is closed or was replaced", f.Fd, t.Fd)
			}
		}
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
