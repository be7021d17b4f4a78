package loader

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// watchVia adds a registration whose fd was closed (or replaced) since it
// was added while another fd, t.Via, still holds its file: the file is
// put at t.Fd for the EPOLL_CTL_ADD (the registration keeps that number,
// as the kernel kept it), and t.Fd given back what it holds now, or
// closed. Runs on the tracer thread.
func (p *Process) watchVia(f *image.FD, t image.EpollTarget, have map[int]bool) error {
	via := *t.Via
	if !have[via] {
		return fmt.Errorf("%w: fd %d (epoll) watches the file of fd %d, which is not in the snapshot", image.ErrCorrupt, f.Fd, via)
	}
	saved := -1
	if have[t.Fd] {
		// Keep what t.Fd holds at a spare number meanwhile.
		s, err := p.call(unix.SYS_FCNTL, uintptr(t.Fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("fd %d: keep fd %d aside: %w", f.Fd, t.Fd, err)
		}
		saved = int(s)
	}
	if _, err := p.call(unix.SYS_DUP3, uintptr(via), uintptr(t.Fd), 0); err != nil {
		return fmt.Errorf("fd %d: put the file of fd %d at %d: %w", f.Fd, via, t.Fd, err)
	}
	scratch := p.base + stubScratchOff
	b := make([]byte, 12)
	binary.LittleEndian.PutUint32(b[0:], t.Events)
	binary.LittleEndian.PutUint64(b[4:], t.Data)
	if err := p.mem.Write(scratch, b); err != nil {
		return err
	}
	if _, err := p.call(unix.SYS_EPOLL_CTL, uintptr(f.Fd), unix.EPOLL_CTL_ADD, uintptr(t.Fd), uintptr(scratch)); err != nil {
		return fmt.Errorf("fd %d: epoll_ctl add fd %d (the file of fd %d) events %#x: %w", f.Fd, t.Fd, via, t.Events, err)
	}
	if saved < 0 {
		_, err := p.call(unix.SYS_CLOSE, uintptr(t.Fd))
		return err
	}
	cloexec := uintptr(0)
	for _, o := range p.fds {
		if o.Fd == t.Fd && o.Flags&unix.O_CLOEXEC != 0 {
			cloexec = unix.O_CLOEXEC
		}
	}
	if _, err := p.call(unix.SYS_DUP3, uintptr(saved), uintptr(t.Fd), cloexec); err != nil {
		return fmt.Errorf("fd %d: give fd %d back: %w", f.Fd, t.Fd, err)
	}
	_, err := p.call(unix.SYS_CLOSE, uintptr(saved))
	return err
}
