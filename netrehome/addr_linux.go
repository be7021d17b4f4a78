package netrehome

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Interface returns the interface that carries vip: the one named, if
// name is not "", else the up, non-loopback interface with an address
// whose subnet holds vip (with vip's own prefix, if shorter than /32, the
// subnet must also lie within it). Host addresses (/32, such as other
// VIPs) do not count as subnets.
func Interface(vip netip.Prefix, name string) (*net.Interface, error) {
	if name != "" {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			return nil, fmt.Errorf("virtual IP %s: interface %s: %w", vip.Addr(), name, err)
		}
		return ifi, nil
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("virtual IP %s: list interfaces: %w", vip.Addr(), err)
	}
	for i := range ifs {
		ifi := &ifs[i]
		if ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			return nil, fmt.Errorf("virtual IP %s: addresses of %s: %w", vip.Addr(), ifi.Name, err)
		}
		for _, a := range addrs {
			n, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			p, ok := netipPrefix(n)
			if !ok || p.Bits() >= p.Addr().BitLen() || !p.Contains(vip.Addr()) {
				continue
			}
			if vip.Bits() < vip.Addr().BitLen() && p.Bits() < vip.Bits() {
				continue // a wider subnet than the VIP's own
			}
			return ifi, nil
		}
	}
	return nil, fmt.Errorf("virtual IP %s: no interface has a subnet holding it", vip.Addr())
}

func netipPrefix(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

func hostAddr(a netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}}
}

func link(ifi *net.Interface) (netlink.Link, error) {
	l, err := netlink.LinkByIndex(ifi.Index)
	if err != nil {
		return nil, fmt.Errorf("interface %s: %w", ifi.Name, err)
	}
	return l, nil
}

// Add adds a as a host address (/32) to ifi, through rtnetlink. It
// reports false, and no error, if ifi already had it: then the address is
// not this caller's to remove.
func Add(ifi *net.Interface, a netip.Addr) (added bool, err error) {
	l, err := link(ifi)
	if err != nil {
		return false, fmt.Errorf("add %s: %w", a, err)
	}
	err = netlink.AddrAdd(l, hostAddr(a))
	if errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("add %s to %s: %w", a, ifi.Name, err)
	}
	return true, nil
}

// Remove removes host address a from interface name. An address already
// gone, or an interface gone, is not an error.
func Remove(name string, a netip.Addr) error {
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove %s: interface %s: %w", a, name, err)
	}
	err = netlink.AddrDel(l, hostAddr(a))
	if errors.Is(err, unix.EADDRNOTAVAIL) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove %s from %s: %w", a, name, err)
	}
	return nil
}

// Has reports whether interface name carries host address a.
func Has(name string, a netip.Addr) (bool, error) {
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("interface %s: %w", name, err)
	}
	fam := netlink.FAMILY_V4
	if a.Is6() {
		fam = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(l, fam)
	if err != nil {
		return false, fmt.Errorf("addresses of %s: %w", name, err)
	}
	for _, x := range addrs {
		if got, ok := netip.AddrFromSlice(x.IP); ok && got.Unmap() == a {
			ones, bits := x.Mask.Size()
			if ones == bits {
				return true, nil
			}
		}
	}
	return false, nil
}
