package image

import (
	"net/netip"
	"strconv"
)

// AddrPort returns a as a netip.AddrPort (the zone, an interface index,
// is dropped).
func (a SockAddr) AddrPort() netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.IP)
	return netip.AddrPortFrom(ip, uint16(a.Port))
}

// String formats a as "198.18.0.5:80" or "[::1]:80".
func (a SockAddr) String() string { return a.AddrPort().String() }

// TCPStateName names a TCP state as the kernel numbers them
// (include/net/tcp_states.h).
func TCPStateName(s int) string {
	names := []string{1: "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
		"CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"}
	if s > 0 && s < len(names) {
		return names[s]
	}
	return "state " + strconv.Itoa(s)
}

// TCP states, as the kernel numbers them.
const (
	TCPEstablished = 1
	TCPFinWait1    = 4
	TCPFinWait2    = 5
	TCPCloseWait   = 8
	TCPLastAck     = 9
	TCPClosing     = 11
)

// TCPCarried reports whether a connection in state s can be carried: an
// established one, or one closed in either direction or both whose socket
// is still open.
func TCPCarried(s int) bool {
	switch s {
	case TCPEstablished, TCPFinWait1, TCPFinWait2, TCPCloseWait, TCPLastAck, TCPClosing:
		return true
	}
	return false
}

// TCPFinIn reports whether in state s the peer's FIN was received.
func TCPFinIn(s int) bool { return s == TCPCloseWait || s == TCPLastAck || s == TCPClosing }

// TCPFinOut reports whether in state s our FIN was sent (or queued).
func TCPFinOut(s int) bool {
	return s == TCPFinWait1 || s == TCPFinWait2 || s == TCPLastAck || s == TCPClosing
}

// TCPFinUnacked reports whether in state s our FIN is not yet acknowledged
// (the kernel counts it in the send queue's length).
func TCPFinUnacked(s int) bool { return s == TCPFinWait1 || s == TCPLastAck || s == TCPClosing }

// Holder returns who holds fd j of queued message i (RightsFrom): 0 the
// process itself, else a tree member's saved PID.
func (u *UnixSocket) Holder(i, j int) int {
	if i < len(u.RightsFrom) && j < len(u.RightsFrom[i]) {
		return u.RightsFrom[i][j]
	}
	return 0
}
