package loader

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// A pty whose master the process (or tree) held is made again by pthaw:
// it opens /dev/ptmx until it gets the saved index (each open takes the
// lowest free one; the extra ones are closed), or, when that index is
// taken, any (said), and gives it the saved terminal settings, window
// size and packet mode. The process takes the master from pthaw with an
// injected pidfd_getfd (a master cannot be reopened by a path: that
// would make another pty) and opens the slave by its path.

// heldPty is pthaw's master of a pty being restored.
type heldPty struct {
	master *os.File
	index  int // its index here
}

// ptyMaxOpens bounds the opens made looking for the saved index.
const ptyMaxOpens = 4096

// openPty makes the pty of t in pthaw: the saved index if free.
func openPty(t *image.Pty) (*heldPty, error) {
	var extra []*os.File
	defer func() {
		for _, f := range extra {
			f.Close()
		}
	}()
	for i := 0; ; i++ {
		m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
		if err != nil {
			return nil, fmt.Errorf("open /dev/ptmx: %w", err)
		}
		n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("TIOCGPTN: %w", err)
		}
		// Past the saved index: it is taken; take this one.
		if n == t.Index || n > t.Index || i >= ptyMaxOpens {
			h := &heldPty{master: m, index: n}
			if err := h.set(t); err != nil {
				m.Close()
				return nil, err
			}
			return h, nil
		}
		extra = append(extra, m)
	}
}

// set gives the pty t's settings.
func (h *heldPty) set(t *image.Pty) error {
	fd := int(h.master.Fd())
	if tt := t.Termios; tt != nil {
		tio := &unix.Termios{Iflag: tt.Iflag, Oflag: tt.Oflag, Cflag: tt.Cflag, Lflag: tt.Lflag, Line: tt.Line, Ispeed: tt.Ispeed, Ospeed: tt.Ospeed}
		copy(tio.Cc[:], tt.Cc)
		if err := unix.IoctlSetTermios(fd, unix.TCSETS, tio); err != nil {
			return fmt.Errorf("pty %d: TCSETS: %w", h.index, err)
		}
	}
	if err := unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: t.Rows, Col: t.Cols}); err != nil {
		return fmt.Errorf("pty %d: TIOCSWINSZ: %w", h.index, err)
	}
	if t.Packet {
		if err := unix.IoctlSetPointerInt(fd, unix.TIOCPKT, 1); err != nil {
			return fmt.Errorf("pty %d: TIOCPKT: %w", h.index, err)
		}
	}
	if !t.Locked {
		if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
			return fmt.Errorf("pty %d: unlock: %w", h.index, err)
		}
	}
	return nil
}

// pty returns pthaw's master of f's pty, made on first use.
func (p *Process) pty(f *image.FD) (*heldPty, error) {
	if f.Pty == nil {
		return nil, fmt.Errorf("%w: fd %d: pty", image.ErrCorrupt, f.Fd)
	}
	ptys := p.ptys
	if p.tree != nil {
		ptys = p.tree.ptys
	}
	h, ok := ptys[f.Pty.Index]
	if !ok {
		var err error
		if h, err = openPty(f.Pty); err != nil {
			return nil, fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
		}
		ptys[f.Pty.Index] = h
		if h.index != f.Pty.Index {
			p.notice("pty %d is taken on this host: its master and slave are pty %d (/dev/pts/%d)", f.Pty.Index, h.index, h.index)
		}
	}
	return h, nil
}

// ptyMaster gives the process the master of f's pty, on a new fd.
// Runs on the tracer thread.
func (p *Process) ptyMaster(f *image.FD) (uintptr, error) {
	h, err := p.pty(f)
	if err != nil {
		return 0, err
	}
	tmp, err := p.takeFromPthaw(f, int(h.master.Fd()))
	if err != nil {
		return 0, err
	}
	if _, err := p.call(unix.SYS_FCNTL, tmp, unix.F_SETFL, uintptr(f.Flags&(unix.O_NONBLOCK|unix.O_APPEND|unix.O_ASYNC))); err != nil {
		p.call(unix.SYS_CLOSE, tmp)
		return 0, fmt.Errorf("fd %d: flags: %w", f.Fd, err)
	}
	return tmp, nil
}

// ptySlavePath returns the path the process opens its slave fd f by.
func (p *Process) ptySlavePath(f *image.FD) (string, error) {
	h, err := p.pty(f)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("/dev/pts/%d", h.index), nil
}

// ptyCtty makes the slave at f.Fd the process's controlling terminal
// again, with its foreground process group, when it was. Only a session
// leader can have one: a single process is not restored as one, and is
// told so. Runs on the tracer thread.
func (p *Process) ptyCtty(f *image.FD) {
	if f.Pty == nil || !f.Pty.Ctty {
		return
	}
	if _, err := p.call(unix.SYS_IOCTL, uintptr(f.Fd), unix.TIOCSCTTY, 0); err != nil {
		p.notice("fd %d (%s) was the controlling terminal of pid %d; it is not any more (TIOCSCTTY: %v: only a session leader of a tree is restored as one)", f.Fd, f.What, p.proc.Pid, err)
		return
	}
	if f.Pty.Tpgid > 0 {
		pg := f.Pty.Tpgid
		if p.tree != nil && p.tree.ns == nil {
			// (In a new PID namespace the member names it by its
			// saved PID, as it is there.)
			if here, ok := p.tree.pids[pg]; ok {
				pg = here
			}
		}
		scratch := p.base + stubScratchOff
		b := []byte{byte(pg), byte(pg >> 8), byte(pg >> 16), byte(pg >> 24)}
		if err := p.mem.Write(scratch, b); err == nil {
			if _, err := p.call(unix.SYS_IOCTL, uintptr(f.Fd), unix.TIOCSPGRP, uintptr(scratch)); err != nil {
				p.notice("fd %d (%s): foreground process group %d not restored: %v", f.Fd, f.What, f.Pty.Tpgid, err)
			}
		}
	}
}
