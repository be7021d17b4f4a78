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
