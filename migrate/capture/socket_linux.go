package capture

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// describeListener reads a listening TCP socket. Its filter holds new
// connections back while the process is frozen (they retry, and find the
// copy); connections already in its accept queue would be reset when the
// original is killed, so a listener with any is refused, and the process
// resumed accepts them.
func describeListener(h *heldSocket, domain, proto int) (*image.Listener, error) {
	s := h.fd
	opt := func(level, name int) int {
		v, _ := unix.GetsockoptInt(s, level, name)
		return v
	}
	sa, err := unix.Getsockname(s)
	if err != nil {
		return nil, fmt.Errorf("getsockname: %w", err)
	}
	l := &image.Listener{Family: domain, Protocol: proto,
		ReuseAddr: opt(unix.SOL_SOCKET, unix.SO_REUSEADDR) != 0,
		ReusePort: opt(unix.SOL_SOCKET, unix.SO_REUSEPORT) != 0}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		l.IP, l.Port = a.Addr[:], a.Port
	case *unix.SockaddrInet6:
		l.IP, l.Port, l.Zone = a.Addr[:], a.Port, a.ZoneId
		l.V6Only = opt(unix.IPPROTO_IPV6, unix.IPV6_V6ONLY) != 0
	default:
		return nil, fmt.Errorf("socket address %T", sa)
	}
	what := fmt.Sprintf("listening socket %s", image.SockAddr{IP: l.IP, Port: l.Port})
	if proto != unix.IPPROTO_TCP {
		// An MPTCP listener (Go's default) takes no socket filter (its
		// packets go to the TCP socket under it) and reports no accept
		// queue: connections it has not accepted are not seen, and are
		// reset with the original (docs/pfreeze.md).
		return l, nil
	}
	if err := h.attach(dropAllFilter); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	info, err := unix.GetsockoptTCPInfo(s, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return nil, fmt.Errorf("%s: TCP_INFO: %w", what, err)
	}
	// For a listener the kernel reports its accept queue's length in
	// tcpi_unacked.
	if info.Unacked > 0 {
		return nil, fmt.Errorf("%s has %d connections not yet accepted, which would be reset: try again once the process has accepted them (it runs on)", what, info.Unacked)
	}
	return l, nil
}
