package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/tcplock"
	"github.com/pcluster/pcluster/internal/tcprepair"
	"github.com/pcluster/pcluster/migrate/image"
)

// Sockets of a frozen process are read through duplicates of them
// (pidfd_getfd). A listening socket and a TCP connection also get a
// socket filter that drops every packet, so that while the process is
// frozen nothing changes them: no connection joins a listener's accept
// queue, and a connection takes in no byte after its receive queue was
// saved (the peer retransmits later, to the copy). A connection is then
// put in repair mode (TCP_REPAIR), in which its queues and sequence
// numbers can be read and in which closing it sends nothing: when the
// original is killed its connections vanish without a reset, for their
// copies to take over. Resuming the original removes the filters and
// turns repair mode off again.

// ErrConnectionStays wraps the refusal of a TCP connection whose local
// address does not move with the process (TCPOptions).
var ErrConnectionStays = errors.New("its local address does not move with the process")

// TCPOptions say which TCP connections move with the process.
type TCPOptions struct {
	// Moving lists the local addresses that move with the process (its
	// virtual IPs): a connection from any other address cannot work on
	// another host. Nil: every address moves (a restore on this host).
	Moving []netip.Prefix
	// Close closes the connections that cannot move, instead of refusing
	// the freeze: once the original is killed their peers get a reset,
	// and the copy finds the connection aborted (ECONNABORTED).
	Close bool
	// Held, when set, is told of each connection that moves once it is
	// held silent, while the snapshot is written (before Decide and the
	// kill): its local and peer address (an IPv4-mapped one as IPv4, as
	// on the wire). A cluster that cannot take the
	// address off the source before the kill drops these 4-tuples'
	// packets there until the address has moved (docs/pfreeze.md).
	Held func(local, peer netip.AddrPort)
	// Lock drops each moving connection's incoming packets with netfilter
	// (internal/tcplock) from the moment it is held until a pthaw on
	// this host has rebuilt it (loader lifts the lock) or the original
	// resumes: from the kill until the copy's connect no socket holds
	// the connection, and a packet of its peer would draw a reset. Only
	// for a restore on this host: a pthaw elsewhere cannot lift it.
	Lock bool
}

// moves reports whether a connection from local moves with the process.
func (o TCPOptions) moves(local image.SockAddr) bool {
	if o.Moving == nil {
		return true
	}
	a := local.AddrPort().Addr().Unmap()
	for _, p := range o.Moving {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func unmap(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// heldSocket is a socket of the frozen process that capture changed,
// through fd, its duplicate of the process's fd target.
type heldSocket struct {
	fd, target int
	filter     bool // the drop-all filter is attached
	repair     bool // TCP_REPAIR is on
	reset      bool // a connection that stays: reset when the process is killed
	// window is the connection's TCP_REPAIR_WINDOW, set back on resume
	// (the freeze closed its send window).
	window []byte
	// locked: the connection's packets are dropped (TCPOptions.Lock)
	// from peer to local, until pthaw or resume lifts it.
	locked      bool
	local, peer netip.AddrPort
}

// sockets are the held sockets of one frozen process. Exactly one of
// resume or kill ends them.
type sockets struct {
	held   []*heldSocket
	policy TCPOptions
	// unixOwn holds the inodes of the process's sockets, once a unix
	// socket asks whether its peer is among them.
	unixOwn map[uint64]bool
	// notice, if set, is told what becomes of an fd the copy cannot
	// have as it was (FreezeOptions.Notice).
	notice func(string)
	// ptys holds the indexes of the ptys whose master the process (or
	// its tree) holds: their slaves are carried too (pty_linux.go).
	ptys map[int]bool
	// tree: the process is a member of a frozen tree.
	tree bool
	// members are the tree's live members, for fds queued in a unix
	// socket (SCM_RIGHTS) that another member holds.
	members []treeMember
	// reconnect: a unix socket connected outside is connected again by
	// the copy (FreezeOptions.UnixReconnect).
	reconnect bool
	// handover: a unix socket connected outside is taken over by the
	// copy (FreezeOptions.UnixHandover).
	handover bool
}

// say passes a one-line message for the user to notice.
func (s *sockets) say(format string, args ...any) {
	if s.notice != nil {
		s.notice(fmt.Sprintf(format, args...))
	}
}

// resume puts every held socket back as it was: send window back, filter
// removed, repair mode off (the kernel then probes the peer's window, and
// the connection carries on).
func (s *sockets) resume() error {
	var errs []error
	for _, h := range s.held {
		if h.window != nil {
			if err := setsockoptBytes(h.fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, h.window); err != nil {
				errs = append(errs, fmt.Errorf("fd %d: send window back: %w", h.target, err))
			}
		}
		// The filter first: leaving repair mode probes the peer's window,
		// and its answer must get in.
		if h.filter {
			if err := unix.SetsockoptInt(h.fd, unix.SOL_SOCKET, unix.SO_DETACH_FILTER, 0); err != nil {
				errs = append(errs, fmt.Errorf("fd %d: remove socket filter: %w", h.target, err))
			}
		}
		if h.repair {
			if err := unix.SetsockoptInt(h.fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 0); err != nil {
				errs = append(errs, fmt.Errorf("fd %d: repair mode off: %w", h.target, err))
			}
		}
		if h.locked {
			if err := unlock(h); err != nil {
				errs = append(errs, fmt.Errorf("fd %d: %w", h.target, err))
			}
		}
		unix.Close(h.fd)
	}
	s.held = nil
	return errors.Join(errs...)
}

// lock takes the netfilter lock of h's connection (TCPOptions.Lock) in
// the socket's network namespace. A lock that cannot be taken does not
// fail the freeze: the connection moves as before, and the user is told
// that its peer may reset it meanwhile.
func (s *sockets) lock(h *heldSocket, c *image.TCPConn) {
	h.local, h.peer = unmap(c.Local.AddrPort()), unmap(c.Peer.AddrPort())
	ns, err := unix.IoctlRetInt(h.fd, unix.SIOCGSKNS)
	if err == nil {
		err = tcplock.Lock(ns, h.local, h.peer)
		unix.Close(ns)
	}
	if err != nil {
		s.say("fd %d (TCP connection %s -> %s): its packets are not held off until pthaw rebuilds it (%v): if its peer sends meanwhile, it resets the connection", h.target, h.local, h.peer, err)
		return
	}
	h.locked = true
}

// unlock lifts the lock of h's connection.
func unlock(h *heldSocket) error {
	ns, err := unix.IoctlRetInt(h.fd, unix.SIOCGSKNS)
	if err != nil {
		return fmt.Errorf("network namespace of the socket: %w", err)
	}
	defer unix.Close(ns)
	return tcplock.Unlock(ns, h.local, h.peer)
}

// kill lets the held sockets go once the process is dead: connections,
// still in repair mode, close without a word to their peers; their locks
// (TCPOptions.Lock) stay, for pthaw to lift once it has rebuilt them.
func (s *sockets) kill() {
	for _, h := range s.held {
		if h.reset {
			// Our duplicate is the last: closing it with a zero linger
			// sends the reset.
			unix.SetsockoptLinger(h.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		}
		unix.Close(h.fd)
	}
	s.held = nil
}

// hold duplicates pid's fd.
func (s *sockets) hold(pid, fd int) (*heldSocket, error) {
	dup, err := dupFd(pid, fd)
	if err != nil {
		return nil, err
	}
	h := &heldSocket{fd: dup, target: fd}
	s.held = append(s.held, h)
	return h, nil
}

// attach attaches filter (dropAllFilter). A socket that
// already has a filter of its own is refused: it could not be put back.
func (h *heldSocket) attach(filter []unix.SockFilter) error {
	if n, err := getsockoptBytes(h.fd, unix.SOL_SOCKET, unix.SO_GET_FILTER, nil); err != nil || n > 0 {
		return errors.New("the socket has a socket filter (SO_ATTACH_FILTER) of its own, which is not carried, or is shared with another process of the tree, which is not supported")
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.SetsockoptSockFprog(h.fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog); err != nil {
		return fmt.Errorf("attach a filter to hold its packets: %w", err)
	}
	h.filter = true
	return nil
}

// dropAllFilter drops every packet: a listener's SYNs and handshakes, a
// connection's data, FINs and acknowledgements.
var dropAllFilter = []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: 0}}

// describeSocket records the socket at pid's fd: a listening TCP socket,
// an established TCP connection or a UDP socket; anything else is
// refused with the reason.
func describeSocket(pid, fd int, socks *sockets, rec *image.FD) error {
	h, err := socks.hold(pid, fd)
	if err != nil {
		return err
	}
	s := h.fd
	opt := func(level, name int) int {
		v, _ := unix.GetsockoptInt(s, level, name)
		return v
	}
	domain, typ, proto := opt(unix.SOL_SOCKET, unix.SO_DOMAIN), opt(unix.SOL_SOCKET, unix.SO_TYPE), opt(unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if domain == unix.AF_UNIX {
		if err := describeUnix(pid, h, socks, rec); err != nil {
			return err
		}
		if u := rec.Unix; u != nil {
			u.PassCred, u.PassSec = opt(unix.SOL_SOCKET, unix.SO_PASSCRED) != 0, opt(unix.SOL_SOCKET, unix.SO_PASSSEC) != 0
		}
		return nil
	}
	if domain != unix.AF_INET && domain != unix.AF_INET6 {
		return fmt.Errorf("sockets of family %d are not supported yet (only IPv4, IPv6 and unix)", domain)
	}
	switch {
	case typ == unix.SOCK_STREAM && opt(unix.SOL_SOCKET, unix.SO_ACCEPTCONN) == 1 && (proto == unix.IPPROTO_TCP || proto == unix.IPPROTO_MPTCP):
		l, err := describeListener(h, domain, proto)
		if err != nil {
			return err
		}
		rec.Kind, rec.Listen = image.FDListen, l
	case typ == unix.SOCK_STREAM && proto == unix.IPPROTO_TCP && neverConnected(s):
		u, err := describeUDP(s, domain)
		if err != nil {
			return err
		}
		u.Opts = sockOpts(s, domain, true)
		rec.Kind, rec.UDP = image.FDTCPNew, u
	case typ == unix.SOCK_STREAM && proto == unix.IPPROTO_TCP:
		c, err := describeTCP(h, domain, socks.policy)
		if err != nil {
			return err
		}
		if socks.policy.Lock && h.repair {
			socks.lock(h, c)
		}
		rec.Kind, rec.TCP = image.FDTCP, c
	case typ == unix.SOCK_DGRAM && proto == unix.IPPROTO_UDP:
		u, err := describeUDP(s, domain)
		if err != nil {
			return err
		}
		rec.Kind, rec.UDP = image.FDUDP, u
	default:
		return fmt.Errorf("sockets of type %d, protocol %d are not supported yet (TCP listeners and connections, UDP)", typ, proto)
	}
	return nil
}

// describeTCP reads an established connection in repair mode, after its
// packets are held by the filter: nothing changes it while it is read.
func describeTCP(h *heldSocket, family int, policy TCPOptions) (*image.TCPConn, error) {
	s := h.fd
	c := &image.TCPConn{Family: family}
	var err error
	if c.Local, err = sockName(unix.Getsockname(s)); err != nil {
		return nil, fmt.Errorf("getsockname: %w", err)
	}
	peer, perr := unix.Getpeername(s)
	if perr == nil {
		c.Peer, perr = sockName(peer, nil)
	}
	what := "TCP connection " + c.Local.String()
	if perr == nil {
		what += " -> " + c.Peer.String()
	}
	info, err := unix.GetsockoptTCPInfo(s, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return nil, fmt.Errorf("%s: TCP_INFO: %w", what, err)
	}
	if perr == nil && !policy.moves(c.Local) {
		if !policy.Close {
			return nil, fmt.Errorf("%s: %w", what, ErrConnectionStays)
		}
		c.State, c.Closed, h.reset = int(info.State), true, true
		return c, nil
	}
	if !image.TCPCarried(int(info.State)) {
		return nil, fmt.Errorf("%s in state %s: only established connections, and those closed in one direction or both whose socket is open, are carried", what, image.TCPStateName(int(info.State)))
	}
	if perr != nil {
		return nil, fmt.Errorf("%s: getpeername: %w", what, perr)
	}
	if err := h.attach(dropAllFilter); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
		return nil, fmt.Errorf("%s: repair mode: %w (needs CAP_NET_ADMIN)", what, err)
	}
	h.repair = true
	// Again, now that nothing comes in: a FIN may have arrived.
	if info, err = unix.GetsockoptTCPInfo(s, unix.IPPROTO_TCP, unix.TCP_INFO); err != nil {
		return nil, fmt.Errorf("%s: TCP_INFO: %w", what, err)
	}
	if c.State = int(info.State); !image.TCPCarried(c.State) {
		return nil, fmt.Errorf("%s in state %s: only established connections, and those closed in one direction or both whose socket is open, are carried", what, image.TCPStateName(c.State))
	}
	c.Options = info.Options
	if c.Options&tcprepair.OptWscale != 0 {
		// x/sys leaves out the byte after tcpi_options: the bit fields
		// tcpi_snd_wscale:4, tcpi_rcv_wscale:4.
		var raw [8]byte
		if n, err := getsockoptBytes(s, unix.IPPROTO_TCP, unix.TCP_INFO, raw[:]); err != nil || n != len(raw) {
			return nil, fmt.Errorf("%s: TCP_INFO: %v", what, err)
		}
		c.SndWscale, c.RcvWscale = raw[6]&0xf, raw[6]>>4
	}
	mss, err := unix.GetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_MAXSEG) // mss_clamp in repair mode
	if err != nil {
		return nil, fmt.Errorf("%s: TCP_MAXSEG: %w", what, err)
	}
	c.MSS = uint32(mss)
	if c.Options&tcprepair.OptTimestamps != 0 {
		ts, err := unix.GetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP)
		if err != nil {
			return nil, fmt.Errorf("%s: TCP_TIMESTAMP: %w", what, err)
		}
		c.Timestamp, c.TimestampAt = uint32(ts), time.Now().UnixNano()
	}
	var w [20]byte
	if n, err := getsockoptBytes(s, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, w[:]); err != nil || n != len(w) {
		return nil, fmt.Errorf("%s: TCP_REPAIR_WINDOW: %v", what, err)
	}
	c.Window = image.TCPWindow{SndWl1: binary.NativeEndian.Uint32(w[0:]), SndWnd: binary.NativeEndian.Uint32(w[4:]),
		MaxWindow: binary.NativeEndian.Uint32(w[8:]), RcvWnd: binary.NativeEndian.Uint32(w[12:]), RcvWup: binary.NativeEndian.Uint32(w[16:])}
	// The original sends no new byte from now on: a send window of zero
	// (no acknowledgement gets through the filter to open it again).
	// Bytes it sent after its queues were read would reach the peer, and
	// the peer's acknowledgements of them would be "of data not yet sent"
	// to the copy, which drops them: the connection would stall for
	// good. (Retransmissions and window probes still go out; they carry
	// nothing new.) Resume sets the window back.
	h.window = append([]byte(nil), w[:]...)
	closed := append([]byte(nil), w[:]...)
	binary.NativeEndian.PutUint32(closed[4:], 0)
	if err := setsockoptBytes(s, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, closed); err != nil {
		return nil, fmt.Errorf("%s: close the send window: %w", what, err)
	}
	inq, err := unix.IoctlGetInt(s, unix.SIOCINQ)
	if err != nil {
		return nil, fmt.Errorf("%s: SIOCINQ: %w", what, err)
	}
	outq, err := unix.IoctlGetInt(s, unix.SIOCOUTQ)
	if err != nil {
		return nil, fmt.Errorf("%s: SIOCOUTQ: %w", what, err)
	}
	if c.Unsent, err = unix.IoctlGetInt(s, unix.SIOCOUTQNSD); err != nil {
		return nil, fmt.Errorf("%s: SIOCOUTQNSD: %w", what, err)
	}
	// A FIN not yet acknowledged counts in the send queue's length, and
	// in the unsent part while it is not sent; it carries no byte.
	// (SIOCINQ already leaves out a FIN received.)
	if image.TCPFinUnacked(c.State) {
		outq, c.Unsent = max(outq-1, 0), max(c.Unsent-1, 0)
	}
	if c.RecvSeq, c.RecvQueue, err = peekQueue(s, tcprepair.RecvQueue, inq); err != nil {
		return nil, fmt.Errorf("%s: receive queue: %w", what, err)
	}
	if c.SendSeq, c.SendQueue, err = peekQueue(s, tcprepair.SendQueue, outq); err != nil {
		return nil, fmt.Errorf("%s: send queue: %w", what, err)
	}
	if err := unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcprepair.NoQueue); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	c.Opts = sockOpts(s, family, true)
	if policy.Held != nil {
		policy.Held(unmap(c.Local.AddrPort()), unmap(c.Peer.AddrPort()))
	}
	return c, nil
}

// peekQueue reads a queue of a connection in repair mode without taking
// its bytes: the sequence number after its last byte and its n bytes.
func peekQueue(s, queue, n int) (uint32, []byte, error) {
	if err := unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue); err != nil {
		return 0, nil, fmt.Errorf("TCP_REPAIR_QUEUE: %w", err)
	}
	seq, err := unix.GetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
	if err != nil {
		return 0, nil, fmt.Errorf("TCP_QUEUE_SEQ: %w", err)
	}
	if n == 0 {
		return uint32(seq), nil, nil
	}
	// One byte more than expected: a queue longer than the kernel said
	// is an error, not a silent loss.
	b := make([]byte, n+1)
	got, _, err := unix.Recvfrom(s, b, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if err != nil {
		return 0, nil, fmt.Errorf("peek %d bytes: %w", n, err)
	}
	if got != n {
		return 0, nil, fmt.Errorf("peeked %d bytes, want %d", got, n)
	}
	return uint32(seq), b[:n], nil
}

// describeUDP reads a UDP socket's addresses and options. Datagrams
// queued in it are not carried (the network may drop datagrams too).
func describeUDP(s, family int) (*image.UDPSocket, error) {
	u := &image.UDPSocket{Family: family}
	var err error
	if u.Local, err = sockName(unix.Getsockname(s)); err != nil {
		return nil, fmt.Errorf("getsockname: %w", err)
	}
	if sa, err := unix.Getpeername(s); err == nil {
		p, err := sockName(sa, nil)
		if err != nil {
			return nil, fmt.Errorf("getpeername: %w", err)
		}
		u.Peer = &p
	} else if err != unix.ENOTCONN {
		return nil, fmt.Errorf("getpeername: %w", err)
	}
	u.Opts = sockOpts(s, family, false)
	return u, nil
}

// neverConnected reports whether TCP socket s is in state CLOSE having
// never sent or received a segment: made by socket(), perhaps bound,
// never connected (one reset or closed after a connection has counted
// segments).
func neverConnected(s int) bool {
	info, err := unix.GetsockoptTCPInfo(s, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil || info.State != tcpClose {
		return false
	}
	if _, err := unix.Getpeername(s); err != unix.ENOTCONN {
		return false
	}
	return info.Segs_out == 0 && info.Segs_in == 0 && info.Bytes_received == 0 && info.Bytes_acked == 0
}

// tcpClose is TCP_CLOSE (include/net/tcp_states.h).
const tcpClose = 7

// sockOpts reads the options carried with a connection or UDP socket.
func sockOpts(s, family int, tcp bool) image.SockOpts {
	opt := func(level, name int) int {
		v, _ := unix.GetsockoptInt(s, level, name)
		return v
	}
	o := image.SockOpts{
		ReuseAddr: opt(unix.SOL_SOCKET, unix.SO_REUSEADDR) != 0,
		ReusePort: opt(unix.SOL_SOCKET, unix.SO_REUSEPORT) != 0,
		KeepAlive: opt(unix.SOL_SOCKET, unix.SO_KEEPALIVE) != 0,
		Broadcast: opt(unix.SOL_SOCKET, unix.SO_BROADCAST) != 0,
		SndBuf:    opt(unix.SOL_SOCKET, unix.SO_SNDBUF),
		RcvBuf:    opt(unix.SOL_SOCKET, unix.SO_RCVBUF),
	}
	o.Priority = opt(unix.SOL_SOCKET, unix.SO_PRIORITY)
	o.RcvLowat = opt(unix.SOL_SOCKET, unix.SO_RCVLOWAT)
	o.Mark = opt(unix.SOL_SOCKET, unix.SO_MARK)
	o.DontRoute = opt(unix.SOL_SOCKET, unix.SO_DONTROUTE) != 0
	o.NoCheck = opt(unix.SOL_SOCKET, unix.SO_NO_CHECK) != 0
	o.OOBInline = opt(unix.SOL_SOCKET, unix.SO_OOBINLINE) != 0
	o.BindToDevice, _ = unix.GetsockoptString(s, unix.SOL_SOCKET, unix.SO_BINDTODEVICE)
	if family == unix.AF_INET6 {
		o.V6Only = opt(unix.IPPROTO_IPV6, unix.IPV6_V6ONLY) != 0
		o.FreeBind = opt(unix.IPPROTO_IPV6, unix.IPV6_FREEBIND) != 0
	} else {
		o.FreeBind = opt(unix.IPPROTO_IP, unix.IP_FREEBIND) != 0
	}
	if tcp {
		o.NoDelay = opt(unix.IPPROTO_TCP, unix.TCP_NODELAY) != 0
		o.KeepIdle = opt(unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		o.KeepIntvl = opt(unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		o.KeepCnt = opt(unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
		o.UserTimeout = opt(unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	}
	return o
}

// sockName converts a socket address (and the error of the call that
// returned it).
func sockName(sa unix.Sockaddr, err error) (image.SockAddr, error) {
	if err != nil {
		return image.SockAddr{}, err
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return image.SockAddr{IP: append([]byte(nil), a.Addr[:]...), Port: a.Port}, nil
	case *unix.SockaddrInet6:
		return image.SockAddr{IP: append([]byte(nil), a.Addr[:]...), Port: a.Port, Zone: a.ZoneId}, nil
	}
	return image.SockAddr{}, fmt.Errorf("socket address %T", sa)
}
