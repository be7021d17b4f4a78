package stream

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// A pipe, FIFO or socket given as stdin, stdout or by path can stall for
// ever: a reader that stops reading (with the process frozen meanwhile),
// a writer that neither writes nor closes. Network connections have
// deadlines (deadlineConn); these get the same through the runtime
// poller. pollable duplicates the fd and sets O_NONBLOCK on its open file
// description, which it shares with the original (and with any process
// holding it: so only for as long as the stream lasts), and release
// clears the flag again if it was not set before.
type pollFile struct {
	f     *os.File // the pollable duplicate
	orig  uintptr  // the original fd
	clear bool     // O_NONBLOCK was set by us
	d     time.Duration
}

// pollable returns a pollable duplicate of f, with d as the bound on each
// read or write, when f is a pipe, FIFO or socket and d is positive;
// otherwise nil: regular files, terminals and devices do not stall that
// way (or cannot be polled).
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
		fl, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
		if err != nil {
			return
		}
		dup, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return
		}
		if fl&unix.O_NONBLOCK == 0 {
			if _, err := unix.FcntlInt(uintptr(dup), unix.F_SETFL, fl|unix.O_NONBLOCK); err != nil {
				unix.Close(dup)
				return
			}
		}
		// Non-blocking, so NewFile makes it pollable (deadlines work).
		p = &pollFile{f: os.NewFile(uintptr(dup), f.Name()), orig: fd, clear: fl&unix.O_NONBLOCK == 0, d: d}
	})
	return p
}

func (p *pollFile) Write(b []byte) (int, error) {
	p.f.SetWriteDeadline(time.Now().Add(p.d))
	n, err := p.f.Write(b)
	return n, p.explain(err)
}

func (p *pollFile) Read(b []byte) (int, error) {
	p.f.SetReadDeadline(time.Now().Add(p.d))
	n, err := p.f.Read(b)
	return n, p.explain(err)
}

func (p *pollFile) explain(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("no progress for %v: %w", p.d, err)
	}
	return err
}

// release closes the duplicate and puts the original's flags back.
func (p *pollFile) release() {
	if p == nil || p.f == nil {
		return
	}
	p.f.Close()
	p.f = nil
	if p.clear {
		if fl, err := unix.FcntlInt(p.orig, unix.F_GETFL, 0); err == nil {
			unix.FcntlInt(p.orig, unix.F_SETFL, fl&^unix.O_NONBLOCK)
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
