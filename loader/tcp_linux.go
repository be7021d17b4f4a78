package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/tcplock"
	"github.com/pcluster/pcluster/internal/tcprepair"
	"github.com/pcluster/pcluster/migrate/image"
)

// TCP connections and UDP sockets are re-created in the process while it
// is built (newSocket: just the socket, on its fd number) and given
// their addresses only in finish (restoreSockets), after the commit: on
// one host the original holds the same addresses until it is killed.
// A connection is rebuilt in repair mode (TCP_REPAIR), the way CRIU's
// soccr does: bound to its local address and "connected" to its peer
// without a packet, its sequence numbers, options, queues and window set,
// and then repair mode turned off, at which the kernel probes the peer's
// window and the connection goes on.

// sockChunk is the most queue data written with one call.
const sockChunk = 64 << 10

// newSocket creates the socket of a TCP connection or UDP socket f; it is
// not yet bound. Runs on the tracer thread.
func (p *Process) newSocket(f *image.FD) (uintptr, error) {
	family, typ, proto := 0, uintptr(unix.SOCK_STREAM), uintptr(unix.IPPROTO_TCP)
	switch {
	case f.Kind == image.FDTCP && f.TCP != nil:
		family = f.TCP.Family
	case f.Kind == image.FDUDP && f.UDP != nil:
		family, typ, proto = f.UDP.Family, unix.SOCK_DGRAM, unix.IPPROTO_UDP
	case f.Kind == image.FDTCPNew && f.UDP != nil:
		family = f.UDP.Family
	default:
		return 0, fmt.Errorf("%w: fd %d: socket", image.ErrCorrupt, f.Fd)
	}
	// Non-blocking while it is rebuilt: a queue that does not fit must
	// fail, not hang. Its own flag comes back at the end.
	s, err := p.call(unix.SYS_SOCKET, uintptr(family), typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return 0, fmt.Errorf("fd %d: socket: %w", f.Fd, err)
	}
	p.socks = append(p.socks, f)
	return s, nil
}

// errCannotHold marks a connection this host cannot hold: its local
// address is not here (a host's own address, after a move between hosts),
// or the connection still exists (its original runs on).
var errCannotHold = errors.New("its local address is not on this host, or the connection still exists")

// isLocal reports whether a's address is one of this host's (pthaw's
// network namespace, the process's): a socket binds to it without
// IP_FREEBIND.
func isLocal(family int, a image.SockAddr) bool {
	s, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return true // cannot tell: not the reason
	}
	defer unix.Close(s)
	var sa unix.Sockaddr
	if family == unix.AF_INET {
		sa4 := &unix.SockaddrInet4{}
		copy(sa4.Addr[:], a.IP)
		sa = sa4
	} else {
		sa6 := &unix.SockaddrInet6{ZoneId: a.Zone}
		copy(sa6.Addr[:], a.IP)
		sa = sa6
	}
	return unix.Bind(s, sa) != unix.EADDRNOTAVAIL
}

// replace puts a new, unbound socket on f's fd in place of one that
// failed halfway. Runs on the tracer thread.
func (s *sockCalls) replace(f *image.FD) error {
	tmp, err := s.p.call(unix.SYS_SOCKET, uintptr(f.TCP.Family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	if _, err := s.p.call(unix.SYS_DUP3, tmp, s.fd, uintptr(f.Flags&unix.O_CLOEXEC)); err != nil {
		return fmt.Errorf("dup3: %w", err)
	}
	_, err = s.p.call(unix.SYS_CLOSE, tmp)
	return err
}

// restoreSockets gives the re-created connections and UDP sockets their
// addresses, state and options. Runs on the tracer thread; scratch is
// argument memory in the process (scratchLen bytes).
func (p *Process) restoreSockets(scratch uintptr) error {
	for _, f := range p.socks {
		s := &sockCalls{p: p, fd: uintptr(f.Fd), scratch: scratch}
		var err error
		if f.TCP != nil && f.TCP.Closed {
			err = s.aborted(f.TCP)
		} else if f.TCP != nil {
			err = s.repairTCP(f.TCP)
			if errors.Is(err, errCannotHold) {
				// Past the commit the original is gone: the process
				// runs with this one connection aborted, and is told
				// why, rather than being lost.
				p.notice("fd %d (%s) cannot be rebuilt here (%v): the process finds it aborted", f.Fd, sockWhat(f), err)
				if err = s.replace(f); err == nil {
					err = s.aborted(f.TCP)
				}
				// The peer gets its reset at its next packet.
				p.unlockTCP(f.TCP)
			}
		} else {
			err = s.bindUDP(f.UDP, f.Kind == image.FDTCPNew)
		}
		if err == nil {
			// The file status flags last: O_NONBLOCK as it was.
			_, err = p.call(unix.SYS_FCNTL, uintptr(f.Fd), unix.F_SETFL, uintptr(f.Flags&unix.O_NONBLOCK))
		}
		if err != nil {
			return fmt.Errorf("fd %d (%s): %w", f.Fd, sockWhat(f), err)
		}
	}
	return nil
}

// unlockTCP lifts the lock pfreeze put on c's packets (capture.
// TCPOptions.Lock; none: nothing to do) in the process's network
// namespace. It comes after the commit: a failure is told, not fatal.
func (p *Process) unlockTCP(c *image.TCPConn) {
	local, peer := c.Local.AddrPort(), c.Peer.AddrPort()
	ns, err := unix.Open(fmt.Sprintf("/proc/%d/ns/net", p.pid), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err == nil {
		err = tcplock.Unlock(ns, local, peer)
		unix.Close(ns)
	}
	if err != nil {
		p.notice("TCP connection %s -> %s: the lock on its packets stays (%v): remove it with nft delete table inet %s", c.Local, c.Peer, err, tcplock.Name(local, peer))
	}
}

// sockWhat names a socket in messages.
func sockWhat(f *image.FD) string {
	if c := f.TCP; c != nil {
		return fmt.Sprintf("TCP connection %s -> %s", c.Local, c.Peer)
	}
	u := f.UDP
	if f.Kind == image.FDTCPNew {
		return fmt.Sprintf("unconnected TCP socket %s", u.Local)
	}
	if u.Peer != nil {
		return fmt.Sprintf("UDP socket %s -> %s", u.Local, *u.Peer)
	}
	return fmt.Sprintf("UDP socket %s", u.Local)
}

// sockCalls makes the calls that rebuild one socket, in the process.
type sockCalls struct {
	p       *Process
	fd      uintptr
	scratch uintptr
}

func (s *sockCalls) set(level, name uintptr, v []byte) error {
	if err := s.p.mem.Write(uint64(s.scratch), v); err != nil {
		return err
	}
	_, err := s.p.call(unix.SYS_SETSOCKOPT, s.fd, level, name, s.scratch, uintptr(len(v)))
	return err
}

func (s *sockCalls) setInt(level, name uintptr, v int, what string) error {
	b := make([]byte, 4)
	binary.LittleEndian.PutUint32(b, uint32(int32(v)))
	if err := s.set(level, name, b); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// options sets the saved socket options, the buffer sizes forced (as
// root: SO_SNDBUFFORCE goes past net.core.wmem_max, as the sizes the
// kernel grew may have).
func (s *sockCalls) options(family int, o image.SockOpts, tcp bool) error {
	type opt struct {
		level, name uintptr
		v           int
		what        string
	}
	opts := []opt{
		{unix.SOL_SOCKET, unix.SO_REUSEADDR, boolInt(o.ReuseAddr), "SO_REUSEADDR"},
		{unix.SOL_SOCKET, unix.SO_REUSEPORT, boolInt(o.ReusePort), "SO_REUSEPORT"},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, boolInt(o.KeepAlive), "SO_KEEPALIVE"},
		{unix.SOL_SOCKET, unix.SO_BROADCAST, boolInt(o.Broadcast), "SO_BROADCAST"},
	}
	if o.SndBuf > 0 {
		opts = append(opts, opt{unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, o.SndBuf / 2, "SO_SNDBUFFORCE"})
	}
	if o.RcvBuf > 0 {
		opts = append(opts, opt{unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, o.RcvBuf / 2, "SO_RCVBUFFORCE"})
	}
	if family == unix.AF_INET6 {
		opts = append(opts, opt{unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, boolInt(o.V6Only), "IPV6_V6ONLY"})
	}
	for _, k := range []opt{{unix.SOL_SOCKET, unix.SO_PRIORITY, o.Priority, "SO_PRIORITY"},
		{unix.SOL_SOCKET, unix.SO_MARK, o.Mark, "SO_MARK"},
		{unix.SOL_SOCKET, unix.SO_DONTROUTE, boolInt(o.DontRoute), "SO_DONTROUTE"},
		{unix.SOL_SOCKET, unix.SO_NO_CHECK, boolInt(o.NoCheck), "SO_NO_CHECK"},
		{unix.SOL_SOCKET, unix.SO_OOBINLINE, boolInt(o.OOBInline), "SO_OOBINLINE"}} {
		if k.v != 0 {
			opts = append(opts, k)
		}
	}
	if o.RcvLowat > 1 {
		opts = append(opts, opt{unix.SOL_SOCKET, unix.SO_RCVLOWAT, o.RcvLowat, "SO_RCVLOWAT"})
	}
	if o.BindToDevice != "" {
		if err := s.set(unix.SOL_SOCKET, unix.SO_BINDTODEVICE, append([]byte(o.BindToDevice), 0)); err != nil {
			return fmt.Errorf("SO_BINDTODEVICE %s: %w", o.BindToDevice, err)
		}
	}
	if tcp {
		opts = append(opts, opt{unix.IPPROTO_TCP, unix.TCP_NODELAY, boolInt(o.NoDelay), "TCP_NODELAY"},
			opt{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, o.UserTimeout, "TCP_USER_TIMEOUT"})
		for _, k := range []opt{{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, o.KeepIdle, "TCP_KEEPIDLE"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, o.KeepIntvl, "TCP_KEEPINTVL"}, {unix.IPPROTO_TCP, unix.TCP_KEEPCNT, o.KeepCnt, "TCP_KEEPCNT"}} {
			if k.v > 0 {
				opts = append(opts, k)
			}
		}
	}
	for _, o := range opts {
		if err := s.setInt(o.level, o.name, o.v, o.what); err != nil {
			return err
		}
	}
	return nil
}

// freeBind sets IP_FREEBIND (IPV6_FREEBIND): the address may not be on
// this host yet (a virtual IP that arrives with the process).
func (s *sockCalls) freeBind(family int, on bool) error {
	if family == unix.AF_INET6 {
		return s.setInt(unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, boolInt(on), "IPV6_FREEBIND")
	}
	return s.setInt(unix.IPPROTO_IP, unix.IP_FREEBIND, boolInt(on), "IP_FREEBIND")
}

// addrCall makes bind or connect with a.
func (s *sockCalls) addrCall(nr uintptr, family int, a image.SockAddr) error {
	sa := sockaddrBytes(family, a)
	if err := s.p.mem.Write(uint64(s.scratch), sa); err != nil {
		return err
	}
	_, err := s.p.call(nr, s.fd, s.scratch, uintptr(len(sa)))
	return err
}

// sockaddrBytes encodes a as struct sockaddr_in or sockaddr_in6.
func sockaddrBytes(family int, a image.SockAddr) []byte {
	var sa []byte
	if family == unix.AF_INET {
		sa = make([]byte, 16)
		copy(sa[4:8], a.IP)
	} else {
		sa = make([]byte, 28)
		copy(sa[8:24], a.IP)
		binary.LittleEndian.PutUint32(sa[24:], a.Zone)
	}
	binary.LittleEndian.PutUint16(sa[0:], uint16(family))
	binary.BigEndian.PutUint16(sa[2:], uint16(a.Port))
	return sa
}

// bind binds to a, with IP_FREEBIND for the time of the call.
func (s *sockCalls) bind(family int, a image.SockAddr, freeBind bool) error {
	if err := s.freeBind(family, true); err != nil {
		return err
	}
	if err := s.addrCall(unix.SYS_BIND, family, a); err != nil {
		return fmt.Errorf("bind %s: %w", a, err)
	}
	return s.freeBind(family, freeBind)
}

// repairTCP rebuilds an established connection.
func (s *sockCalls) repairTCP(c *image.TCPConn) error {
	if err := s.options(c.Family, c.Opts, true); err != nil {
		return err
	}
	// After the options: repair mode makes the socket bind whatever
	// else holds its port (SO_REUSEADDR would undo that).
	if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR, 1, "repair mode (needs CAP_NET_ADMIN)"); err != nil {
		return err
	}
	if err := s.bind(c.Family, c.Local, c.Opts.FreeBind); err != nil {
		return err
	}
	// The sequence number of each queue's first byte; the bytes follow
	// once connected.
	if err := s.queueSeq(tcprepair.RecvQueue, c.RecvSeq-uint32(len(c.RecvQueue))); err != nil {
		return err
	}
	// A FIN sent is not in the queue: it is sent again (shutdown below).
	// A FIN received stays counted in the receive sequence: the queue's
	// bytes are placed one lower than they came, which no one sees, and
	// the copy acknowledges the FIN as the original did.
	finOut := uint32(0)
	if image.TCPFinOut(c.State) {
		finOut = 1
	}
	if err := s.queueSeq(tcprepair.SendQueue, c.SendSeq-finOut-uint32(len(c.SendQueue))); err != nil {
		return err
	}
	// In repair mode connect sends nothing: the connection is
	// established at once. The local address must be on this host by
	// now (routing picks it as the source).
	if err := s.addrCall(unix.SYS_CONNECT, c.Family, c.Peer); err != nil {
		if err == unix.EADDRNOTAVAIL || !isLocal(c.Family, c.Local) {
			return fmt.Errorf("connect in repair mode: %w: %w", err, errCannotHold)
		}
		return fmt.Errorf("connect in repair mode: %w", err)
	}
	var opts []byte
	add := func(code, val uint32) {
		opts = binary.LittleEndian.AppendUint32(opts, code)
		opts = binary.LittleEndian.AppendUint32(opts, val)
	}
	if c.Options&tcprepair.OptSack != 0 {
		add(tcprepair.KindSackPerm, 0)
	}
	if c.Options&tcprepair.OptWscale != 0 {
		add(tcprepair.KindWindow, uint32(c.SndWscale)|uint32(c.RcvWscale)<<16)
	}
	if c.Options&tcprepair.OptTimestamps != 0 {
		add(tcprepair.KindTimestamp, 0)
	}
	add(tcprepair.KindMSS, c.MSS)
	if err := s.set(unix.IPPROTO_TCP, unix.TCP_REPAIR_OPTIONS, opts); err != nil {
		return fmt.Errorf("TCP_REPAIR_OPTIONS: %w", err)
	}
	if c.Options&tcprepair.OptTimestamps != 0 {
		if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int(int32(tcpTimestamp(c, time.Now()))), "TCP_TIMESTAMP"); err != nil {
			return err
		}
	}
	if err := s.fill(tcprepair.RecvQueue, c.RecvQueue, c.Opts.RcvBuf); err != nil {
		return fmt.Errorf("receive queue of %d bytes: %w", len(c.RecvQueue), err)
	}
	sent := c.SendQueue[:len(c.SendQueue)-c.Unsent]
	if err := s.fill(tcprepair.SendQueue, sent, c.Opts.SndBuf); err != nil {
		return fmt.Errorf("send queue of %d bytes: %w", len(sent), err)
	}
	w := make([]byte, 0, 20)
	for _, v := range []uint32{c.Window.SndWl1, c.Window.SndWnd, c.Window.MaxWindow, c.Window.RcvWnd, c.Window.RcvWup} {
		w = binary.LittleEndian.AppendUint32(w, v)
	}
	if err := s.set(unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, w); err != nil {
		return fmt.Errorf("TCP_REPAIR_WINDOW: %w", err)
	}
	if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcprepair.NoQueue, "TCP_REPAIR_QUEUE"); err != nil {
		return err
	}
	// The socket holds the connection again: the peer's packets, held
	// off since the freeze (capture.TCPOptions.Lock), may come in. Just
	// before repair mode goes off, for the answer to its probe.
	s.p.unlockTCP(c)
	// Out of repair mode the kernel sends a window probe: the peer
	// answers with its window, and what is unacknowledged is resent.
	if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR, 0, "repair mode off"); err != nil {
		return err
	}
	// Leaving repair mode cleared SO_REUSEADDR.
	if err := s.setInt(unix.SOL_SOCKET, unix.SO_REUSEADDR, boolInt(c.Opts.ReuseAddr), "SO_REUSEADDR"); err != nil {
		return err
	}
	// Bytes never sent are written as the process would have.
	if err := s.fill(tcprepair.NoQueue, c.SendQueue[len(sent):], c.Opts.SndBuf); err != nil {
		return fmt.Errorf("unsent %d bytes: %w", c.Unsent, err)
	}
	// A closed direction closes again, without a packet for the peer's
	// FIN (reads end once the queue is read, as after it) and with our
	// FIN sent again (the peer, which may have it, acknowledges it). The
	// socket is then ESTABLISHED, FIN_WAIT1 or FIN_WAIT2 where the
	// original was CLOSE_WAIT, CLOSING or LAST_ACK: when the process
	// closes it, it waits in FIN_WAIT2 for a FIN it already had, until
	// net.ipv4.tcp_fin_timeout.
	in, out := image.TCPFinIn(c.State), image.TCPFinOut(c.State)
	how := -1
	switch {
	case in && out:
		how = unix.SHUT_RDWR
	case in:
		how = unix.SHUT_RD
	case out:
		how = unix.SHUT_WR
	}
	if how >= 0 {
		if _, err := s.p.call(unix.SYS_SHUTDOWN, s.fd, uintptr(how)); err != nil {
			return fmt.Errorf("shutdown %d: %w", how, err)
		}
	}
	return nil
}

// aborted makes the socket of a connection that stayed behind (its peer
// was sent a reset): a connection made in repair mode over loopback, no
// packet sent, and then dropped in repair mode, which leaves the socket
// closed with ECONNABORTED pending. The process's next read or write on
// it fails with that error, as on a connection reset.
func (s *sockCalls) aborted(c *image.TCPConn) error {
	if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR, 1, "repair mode (needs CAP_NET_ADMIN)"); err != nil {
		return err
	}
	lo := image.SockAddr{IP: []byte{127, 0, 0, 1}, Port: c.Peer.Port}
	if c.Family == unix.AF_INET6 {
		lo.IP = make([]byte, 16)
		lo.IP[15] = 1
	}
	if err := s.addrCall(unix.SYS_CONNECT, c.Family, lo); err != nil {
		return fmt.Errorf("connect in repair mode to %s: %w", lo, err)
	}
	// connect(AF_UNSPEC) disconnects.
	unspec := make([]byte, 16)
	if err := s.p.mem.Write(uint64(s.scratch), unspec); err != nil {
		return err
	}
	if _, err := s.p.call(unix.SYS_CONNECT, s.fd, s.scratch, uintptr(len(unspec))); err != nil {
		return fmt.Errorf("disconnect in repair mode: %w", err)
	}
	return s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR, 0, "repair mode off")
}

// tcpTimestamp is the timestamp clock of the copy at now: the saved one
// plus the time since it was read. The original's clock ran on while it
// was frozen, and it may have sent segments stamped with it (a
// retransmission); a copy that went back in time would have its segments
// dropped by the peer's PAWS check until its clock caught up. Across
// hosts the difference of their clocks adds in: forward is harmless,
// backward stalls as long. The clock counts milliseconds, or microseconds
// for a connection that negotiated them (TCPI_OPT_USEC_TS).
func tcpTimestamp(c *image.TCPConn, now time.Time) uint32 {
	elapsed := now.UnixNano() - c.TimestampAt
	if c.TimestampAt == 0 || elapsed < 0 {
		return c.Timestamp
	}
	if c.Options&tcprepair.OptUsecTS != 0 {
		return c.Timestamp + uint32(elapsed/1e3)
	}
	return c.Timestamp + uint32(elapsed/1e6)
}

func (s *sockCalls) queueSeq(queue int, seq uint32) error {
	if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE"); err != nil {
		return err
	}
	return s.setInt(unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ, int(int32(seq)), "TCP_QUEUE_SEQ")
}

// fill writes data into a queue of the connection (tcprepair.NoQueue: an
// ordinary send, out of repair mode). The socket is non-blocking: when
// the kernel wants more room than the saved buffer size gave (its
// accounting of the new buffers is not the original's), the buffer is
// doubled for the time of the fill and set back after.
func (s *sockCalls) fill(queue int, data []byte, bufSize int) error {
	if len(data) == 0 {
		return nil
	}
	if queue != tcprepair.NoQueue {
		if err := s.setInt(unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE"); err != nil {
			return err
		}
	}
	bufOpt, bufName := uintptr(unix.SO_SNDBUFFORCE), "SO_SNDBUFFORCE"
	if queue == tcprepair.RecvQueue {
		bufOpt, bufName = unix.SO_RCVBUFFORCE, "SO_RCVBUFFORCE"
	}
	size, grew := max(bufSize/2, sockChunk), false
	for off := 0; off < len(data); {
		n := min(len(data)-off, sockChunk)
		if err := s.p.mem.Write(uint64(s.scratch), data[off:off+n]); err != nil {
			return err
		}
		got, err := s.p.call(unix.SYS_SENDTO, s.fd, s.scratch, uintptr(n), 0, 0, 0)
		if (err == unix.EAGAIN || err == unix.ENOMEM) && size < 4*(len(data)+bufSize) {
			size, grew = size*2, true
			if err := s.setInt(unix.SOL_SOCKET, bufOpt, size, bufName); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("at byte %d: %w", off, err)
		}
		off += int(got)
	}
	if grew && bufSize > 0 {
		return s.setInt(unix.SOL_SOCKET, bufOpt, bufSize/2, bufName)
	}
	return nil
}

// bindUDP gives a UDP socket its options, address and peer.
func (s *sockCalls) bindUDP(u *image.UDPSocket, tcp bool) error {
	if err := s.options(u.Family, u.Opts, tcp); err != nil {
		return err
	}
	if u.Local.Port != 0 {
		if err := s.bind(u.Family, u.Local, u.Opts.FreeBind); err != nil {
			return err
		}
	}
	if u.Peer != nil {
		if err := s.addrCall(unix.SYS_CONNECT, u.Family, *u.Peer); err != nil {
			return fmt.Errorf("connect %s: %w", *u.Peer, err)
		}
	}
	return nil
}
