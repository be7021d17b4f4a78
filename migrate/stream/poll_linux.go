package stream

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"syscall"
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
//
// Every system call on the fd runs inside RawConn.Control, which holds
// the fd open: a Close from another goroutine (pthaw's interruption)
// cannot have a read or poll reach a reused fd number.

// pipeBuf is PIPE_BUF (limits.h): a write of at most that many bytes to a
// pipe that poll reports writable does not block.
const pipeBuf = 4096

type pollFile struct {
	sc     syscall.RawConn
	d      time.Duration
	nowait bool // RWF_NOWAIT works on the fd; only the owner's goroutine reads or writes

	// mu guards the fields below: abort and close may come from any
	// goroutine while the owner's waits.
	mu sync.Mutex
	// stop is an eventfd that abort makes readable: a wait under way
	// ends at once (pfreeze interrupted while its reader stalls must
	// resume the process now, not after the timeout), and so does every
	// later one. -1 once closed.
	stop    int
	waiters int  // waits using stop now
	closing bool // close was called: stop is closed by the last waiter
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
		p = &pollFile{sc: sc, d: d, nowait: true, stop: stop}
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

// close releases the eventfd (at once, or when the wait under way ends:
// call abort first to end it); the file itself is its owner's. Later
// waits fail with ErrAborted. It may be called from any goroutine.
func (p *pollFile) close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closing = true
	if p.waiters == 0 && p.stop >= 0 {
		unix.Close(p.stop)
		p.stop = -1
	}
}

// do runs fn on the fd, held open meanwhile.
func (p *pollFile) do(fn func(fd int)) error {
	return p.sc.Control(func(fd uintptr) { fn(int(fd)) })
}

func (p *pollFile) Write(b []byte) (int, error) {
	n := 0
	deadline := time.Now().Add(p.d)
	for n < len(b) {
		var m int
		var err error
		if p.nowait {
			if cerr := p.do(func(fd int) { m, err = unix.Pwritev2(fd, [][]byte{b[n:]}, -1, unix.RWF_NOWAIT) }); cerr != nil {
				return n, cerr
			}
			if errors.Is(err, unix.EOPNOTSUPP) {
				p.nowait = false
				continue
			}
		} else {
			if err = p.wait(unix.POLLOUT, deadline); err != nil {
				return n, err
			}
			if cerr := p.do(func(fd int) { m, err = unix.Write(fd, b[n:min(len(b), n+pipeBuf)]) }); cerr != nil {
				return n, cerr
			}
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
			if cerr := p.do(func(fd int) { n, err = unix.Preadv2(fd, [][]byte{b}, -1, unix.RWF_NOWAIT) }); cerr != nil {
				return 0, cerr
			}
			if errors.Is(err, unix.EOPNOTSUPP) {
				p.nowait = false
				continue
			}
		} else {
			if err = p.wait(unix.POLLIN, deadline); err != nil {
				return 0, err
			}
			if cerr := p.do(func(fd int) { n, err = unix.Read(fd, b) }); cerr != nil {
				return 0, cerr
			}
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

// wait polls the fd for ev until deadline or abort. Readiness, a hang-up
// or an error all end it: the next read or write says which.
func (p *pollFile) wait(ev int16, deadline time.Time) error {
	p.mu.Lock()
	if p.closing || p.stop < 0 {
		p.mu.Unlock()
		return ErrAborted
	}
	p.waiters++
	stop := p.stop
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		if p.waiters--; p.waiters == 0 && p.closing && p.stop >= 0 {
			unix.Close(p.stop)
			p.stop = -1
		}
		p.mu.Unlock()
	}()
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("no progress for %v: %w", p.d, os.ErrDeadlineExceeded)
		}
		fds := []unix.PollFd{{Events: ev}, {Fd: int32(stop), Events: unix.POLLIN}}
		var err error
		if cerr := p.do(func(fd int) {
			fds[0].Fd = int32(fd)
			_, err = unix.Poll(fds, int(min(left.Milliseconds()+1, math.MaxInt32)))
		}); cerr != nil {
			return cerr
		}
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
