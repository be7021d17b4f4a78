package capture

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// describeListener reads a socket of pid through a duplicate of it
// (pidfd_getfd): only listening TCP sockets can be carried so far.
func describeListener(pid, fd int) (*image.Listener, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	s, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_getfd: %w", err)
	}
	defer unix.Close(s)
	opt := func(level, name int) int {
		v, _ := unix.GetsockoptInt(s, level, name)
		return v
	}
	domain, typ, proto := opt(unix.SOL_SOCKET, unix.SO_DOMAIN), opt(unix.SOL_SOCKET, unix.SO_TYPE), opt(unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if (domain != unix.AF_INET && domain != unix.AF_INET6) || typ != unix.SOCK_STREAM || (proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_MPTCP) {
		return nil, fmt.Errorf("sockets other than TCP are not supported yet (domain %d, type %d, protocol %d)", domain, typ, proto)
	}
	if opt(unix.SOL_SOCKET, unix.SO_ACCEPTCONN) != 1 {
		return nil, errors.New("TCP connections are not supported yet (only listening sockets)")
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
	return l, nil
}
