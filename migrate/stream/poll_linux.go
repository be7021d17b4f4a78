package stream

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A pipe, FIFO or socket given as stdin, stdout or by path can stall for
// ever: a reader that stops reading (with the process frozen meanwhile),
// a writer that neither writes nor closes. Network connections have
// deadlines (deadlineConn); these get the same from poll(2).
//
// The open file description is never made O_NONBLOCK: stdin and stdout
// share theirs with other processes (`{ pfreeze …; cat big; } | slow`),
// which would all see the flag, and a pfreeze killed before clearing it
// would leave it set for good (cat: write error: Resource temporarily
// unavailable). Instead each call asks for non-blocking behaviour itself
// (RWF_NOWAIT, honoured by pipes and sockets since Linux 5.x) and, when it
// would block, waits in poll(2) for at most d of no progress. Where
// RWF_NOWAIT is refused (EOPNOTSUPP), it polls first and then writes at
// most PIPE_BUF bytes, which a pipe reported writable takes without
// blocking (a read reported ready does not block either).
// pipeBuf is PIPE_BUF (limits.h): a write of at most that many bytes to a
// pipe that poll reports writable does not block.
const pipeBuf = 4096

type pollFile struct {
	f      *os.File // kept referenced, so that fd stays open
	fd     int
	d      time.Duration
	nowait bool // RWF_NOWAIT works on fd

	// mu guards stop, which abort may use from any goroutine while
	// close runs on the owner's.
	mu sync.Mutex
	// stop is an eventfd that abort makes readable: a wait under way
	// ends at once (pfreeze interrupted while a reader stalls must
	// resume the process now, not after the timeout). -1 once closed.
	stop int
}

// pollable returns a bounded reader and writer of f, with d as the bound on
// each read or write's time without progress, when f is a pipe, FIFO or
// socket and d is positive; otherwise nil: regular files, terminals and
// devices do not stall that way (or cannot be polled).
func pollable(f *os.File, d time.Duration) *pollFile {
	if d <= 0 {
		return nil
	}
	sc, err := f.SyscallConn()
	if err != nil {
		return nil
	}
	var p *pollFile
	sc.Control(func(fd uintptr) {
		var st unix.Stat_t
		if unix.Fstat(int(fd), &st) != nil {
			return
		}
		if t := st.Mode & unix.S_IFMT; t != unix.S_IFIFO && t != unix.S_IFSOCK {
			return
		}
		stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return
		}
		p = &pollFile{f: f, fd: int(fd), d: d, nowait: true, stop: stop}
	})
	return p
}

// abort ends the wait under way, and every later one, with ErrAborted.
// It may be called from any goroutine.
func (p *pollFile) abort() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stop >= 0 {
		unix.Write(p.stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}
}

// close releases the eventfd; the file itself is its owner's.
func (p *pollFile) close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stop >= 0 {
		unix.Close(p.stop)
		p.stop = -1
	}
}

func (p *pollFile) Write(b []byte) (int, error) {
	n := 0
	deadline := time.Now().Add(p.d)
	for n < len(b) {
		var m int
		var err error
		if p.nowait {
			m, err = unix.Pwritev2(p.fd, [][]byte{b[n:]}, -1, unix.RWF_NOWAIT)
			if errors.Is(err, unix.EOPNOTSUPP) {
				p.nowait = false
				continue
			}
		} else {
			if err = p.wait(unix.POLLOUT, deadline); err != nil {
				return n, err
			}
			m, err = unix.Write(p.fd, b[n:min(len(b), n+pipeBuf)])
		}
		switch {
		case m > 0:
			n += m
			deadline = time.Now().Add(p.d)
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.EAGAIN):
			if err := p.wait(unix.POLLOUT, deadline); err != nil {
				return n, err
			}
		case err != nil:
			return n, err
		default: // a write of 0 bytes
			return n, io.ErrShortWrite
		}
	}
	return n, nil
}

func (p *pollFile) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	deadline := time.Now().Add(p.d)
	for {
		var n int
		var err error
		if p.nowait {
			n, err = unix.Preadv2(p.fd, [][]byte{b}, -1, unix.RWF_NOWAIT)
			if errors.Is(err, unix.EOPNOTSUPP) {
				p.nowait = false
				continue
			}
		} else {
			if err = p.wait(unix.POLLIN, deadline); err != nil {
				return 0, err
			}
			n, err = unix.Read(p.fd, b)
		}
		switch {
		case errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.EAGAIN):
			if err := p.wait(unix.POLLIN, deadline); err != nil {
				return 0, err
			}
		case err != nil:
			return 0, err
		case n == 0:
			return 0, io.EOF
		default:
			return n, nil
		}
	}
}

// wait polls fd for ev until deadline or abort. Readiness, a hang-up or
// an error all end it: the next read or write says which. Only the
// owner's goroutine waits, so stop is not closed under it.
func (p *pollFile) wait(ev int16, deadline time.Time) error {
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("no progress for %v: %w", p.d, os.ErrDeadlineExceeded)
		}
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: ev}, {Fd: int32(p.stop), Events: unix.POLLIN}}
		_, err := unix.Poll(fds, int(min(left.Milliseconds()+1, math.MaxInt32)))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if fds[1].Revents != 0 {
			return ErrAborted
		}
		if fds[0].Revents != 0 {
			return nil
		}
	}
}

// openWriteEnd opens path, which is not a regular file, for writing. A
// FIFO's open waits for a reader: it is opened non-blocking, which fails
// with ENXIO until there is one, again and again for at most d (at
// least once).
func openWriteEnd(path string, fi os.FileInfo, d time.Duration) (*os.File, error) {
	if fi.Mode()&os.ModeNamedPipe == 0 {
		return os.OpenFile(path, os.O_WRONLY, 0)
	}
	deadline := time.Now().Add(d)
	for {
		f, err := os.OpenFile(path, os.O_WRONLY|unix.O_NONBLOCK, 0)
		if !errors.Is(err, unix.ENXIO) {
			return f, err
		}
		if !time.Now().Before(deadline) {
			return nil, fmt.Errorf("FIFO %s: no reader within %v: %w", path, d, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
