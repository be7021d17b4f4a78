// Package tcplock drops a TCP connection's incoming packets with
// netfilter (nftables) while no socket holds the connection: from the
// kill of a halted original until pthaw has rebuilt it on the same host.
// Without it the kernel answers the peer's next segment (a
// retransmission, a window probe) with a reset, and the peer's end is
// gone before the copy exists. CRIU's --network-lock does the same with
// iptables or nftables rules that outlive the dump.
//
// Each connection gets a table of its own, named after its 4-tuple
// (Name), so that locks taken and lifted by different pfreeze and pthaw
// runs never touch each other's: taking a lock adds the table (again, if
// it is there), lifting it deletes it (whether or not it is there), each
// in one netlink transaction.
package tcplock

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Prefix begins the name of every table of this package.
const Prefix = "pcluster-tcplock-"

// Name is the nftables table (family inet) that locks the connection
// between local and peer, a name nft takes without quotes (no colon):
// `pcluster-tcplock-127.0.0.1-8880-127.0.0.1-40512`, for IPv6
// `pcluster-tcplock-__1-80-__1-5000`.
func Name(local, peer netip.AddrPort) string {
	part := func(a netip.AddrPort) string {
		a = unmap(a)
		return strings.ReplaceAll(a.Addr().String(), ":", "_") + "-" + strconv.Itoa(int(a.Port()))
	}
	return Prefix + part(local) + "-" + part(peer)
}

func unmap(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// conn opens netlink to nftables in the network namespace netns (an open
// fd of one; -1: the caller's).
func conn(netns int) (*nftables.Conn, error) {
	if netns >= 0 {
		return nftables.New(nftables.WithNetNSFd(netns))
	}
	return nftables.New()
}

// Lock drops, in the network namespace netns (-1: the caller's), every
// packet that comes from peer to local over TCP, until Unlock. The
// connection's own packets out are not touched.
func Lock(netns int, local, peer netip.AddrPort) error {
	local, peer = unmap(local), unmap(peer)
	if local.Addr().Is4() != peer.Addr().Is4() {
		return fmt.Errorf("lock %s -> %s: addresses of two families", local, peer)
	}
	c, err := conn(netns)
	if err != nil {
		return fmt.Errorf("lock %s -> %s: nftables: %w", local, peer, err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: Name(local, peer)})
	ch := c.AddChain(&nftables.Chain{
		Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter,
	})
	c.AddRule(&nftables.Rule{
		Table: t, Chain: ch, Exprs: match(local, peer),
		UserData: userdata.AppendString(nil, userdata.TypeComment, "pcluster: held while the connection has no socket (pfreeze -halt until pthaw)"),
	})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("lock %s -> %s: nftables: %w", local, peer, err)
	}
	return nil
}

// Unlock lifts Lock's drop of local and peer's packets, if it is there.
func Unlock(netns int, local, peer netip.AddrPort) error {
	local, peer = unmap(local), unmap(peer)
	c, err := conn(netns)
	if err != nil {
		return fmt.Errorf("unlock %s -> %s: nftables: %w", local, peer, err)
	}
	// Adding the table first makes the deletion succeed whether it was
	// there or not, in one transaction.
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: Name(local, peer)}
	c.AddTable(t)
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("unlock %s -> %s: nftables: %w", local, peer, err)
	}
	return nil
}

// Locked lists the connections locked in netns (-1: the caller's), by
// table name.
func Locked(netns int) ([]string, error) {
	c, err := conn(netns)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("nftables: list tables: %w", err)
	}
	var names []string
	for _, t := range ts {
		if len(t.Name) > len(Prefix) && t.Name[:len(Prefix)] == Prefix {
			names = append(names, t.Name)
		}
	}
	return names, nil
}

// match is `meta nfproto ipvN meta l4proto tcp ip saddr PEER ip daddr
// LOCAL tcp sport PEERPORT tcp dport LOCALPORT drop`.
func match(local, peer netip.AddrPort) []expr.Any {
	proto, src, dst, n := byte(unix.NFPROTO_IPV4), uint32(12), uint32(16), uint32(4)
	if !local.Addr().Is4() {
		proto, src, dst, n = unix.NFPROTO_IPV6, 8, 24, 16
	}
	port := func(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }
	la, pa := local.Addr().AsSlice(), peer.Addr().AsSlice()
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: src, Len: n},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: pa},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: dst, Len: n},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: la},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: port(peer.Port())},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: port(local.Port())},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
}
