package loader

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// A unix socket pair both of whose ends the process held is made again by
// a socketpair injected into the process, when the first of its fds is
// placed; the other end waits above every saved fd number until its own
// fd's turn. The messages queued in each end are sent into it from the
// other end through pthaw's duplicates of them (pidfd_getfd), in their
// order and with their boundaries, and then each end is shut down as it
// was.

// unixSocket returns the process's new fd of the unix socket end f.
// Runs on the tracer thread.
func (p *Process) unixSocket(f *image.FD) (uintptr, error) {
	u := f.Unix
	if u == nil {
		return 0, fmt.Errorf("%w: fd %d: unix socket", image.ErrCorrupt, f.Fd)
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
	// f's queue came from its peer, the peer's from f.
	if err := p.fillUnix(ends[1], u.Queue); err != nil {
		return fail(fmt.Errorf("fd %d (%s): refill its queue: %w", f.Fd, f.What, err))
	}
	if err := p.fillUnix(ends[0], peer.Unix.Queue); err != nil {
		return fail(fmt.Errorf("fd %d (%s): refill its queue: %w", peer.Fd, peer.What, err))
	}
	for i, s := range []*image.UnixSocket{u, peer.Unix} {
		if how := shutdownHow(s.Shutdown); how >= 0 {
			if _, err := p.call(unix.SYS_SHUTDOWN, ends[i], uintptr(how)); err != nil {
				return fail(fmt.Errorf("fd %d: shutdown: %w", f.Fd, err))
			}
		}
	}
	// Out of the way of the fds still to be placed.
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

// fillUnix sends msgs, in order, from the process's socket fd (to its
// peer). Runs on the tracer thread.
func (p *Process) fillUnix(fd uintptr, msgs [][]byte) error {
	if len(msgs) == 0 {
		return nil
	}
	pidfd, err := unix.PidfdOpen(p.pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	mine, err := unix.PidfdGetfd(pidfd, int(fd), 0)
	if err != nil {
		return fmt.Errorf("pidfd_getfd: %w", err)
	}
	defer unix.Close(mine)
	for _, m := range msgs {
		// Never blocking: a queue that does not fit is an error, not a
		// hang. A stream's bytes may take several sends.
		for off := 0; off < len(m) || (off == 0 && len(m) == 0); {
			n, err := unix.SendmsgN(mine, m[off:], nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			if err != nil {
				return fmt.Errorf("%d bytes: %w", len(m), err)
			}
			if n == 0 && len(m) == 0 {
				break
			}
			off += n
		}
	}
	return nil
}
