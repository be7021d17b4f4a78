// Package netrehome moves a virtual IP address (VIP) to this host: it adds
// the address to the interface whose subnet holds it, announces it with
// gratuitous ARP so that neighbours and switches send its traffic here at
// once rather than when their cache entries expire, and removes it again.
// It knows nothing of the cluster: the node agent decides when (node/vip.go,
// docs/cluster.md "Virtual IPs").
package netrehome

import (
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Parse reads a VIP as given to `pclusterctl run -vip`: an IPv4 address,
// alone or with the prefix length of the subnet it lives in
// ("198.18.0.50/24"). The address itself is always added as a /32; the
// prefix only says which interface carries it. A bare address has the
// full length (/32), and its interface is the one whose own subnet holds
// it.
func Parse(s string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, fmt.Errorf("virtual IP %q: %w", s, err)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return p, fmt.Errorf("virtual IP %q: %w", s, err)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	a := p.Addr()
	switch {
	case a.Zone() != "":
		return p, fmt.Errorf("virtual IP %q: zoned addresses are not supported", s)
	case !a.Is4() || a.Is4In6():
		return p, fmt.Errorf("virtual IP %q: only IPv4 addresses are supported", s)
	case a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return p, fmt.Errorf("virtual IP %q: not a unicast host address", s)
	case p.Bits() < 31 && (a == p.Masked().Addr() || a == broadcast(p)):
		return p, fmt.Errorf("virtual IP %q: the network or broadcast address of its subnet", s)
	}
	return p, nil
}

// broadcast returns the last address of p (IPv4).
func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Schedule says how an address is announced: Rounds rounds, Interval
// apart, each a gratuitous ARP request and a gratuitous ARP reply (some
// neighbours heed only one of the two), then the same again Repeat after
// the first (0: no repeat). Pacemaker's IPaddr2 sends 5 rounds 200 ms
// apart; keepalived repeats its burst after 5 s, for switches that were
// still learning when the first arrived.
type Schedule struct {
	Rounds   int
	Interval time.Duration
	Repeat   time.Duration
}

// DefaultSchedule is the schedule the node agent uses.
var DefaultSchedule = Schedule{Rounds: 5, Interval: 200 * time.Millisecond, Repeat: 5 * time.Second}
