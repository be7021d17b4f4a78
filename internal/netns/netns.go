// Package netns names the network namespace the caller runs in.
package netns

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Cookie returns the cookie of the network namespace the caller runs in
// (SO_NETNS_COOKIE of a socket it makes): equal cookies are one
// namespace, on this boot of this host.
func Cookie() (uint64, error) {
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("network namespace: %w", err)
	}
	defer unix.Close(s)
	v, err := unix.GetsockoptUint64(s, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("network namespace: SO_NETNS_COOKIE: %w", err)
	}
	return v, nil
}
