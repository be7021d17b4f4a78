package netrehome

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/arp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	os.Exit(m.Run())
}

// nsHandle opens a netlink handle in namespace ns.
func nsHandle(t *testing.T, ns string) *netlink.Handle {
	t.Helper()
	h, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nh.Close)
	return nh
}

// TestAddAnnounceRemove carries a VIP on lab host 0 while host 1 watches:
// host 1's neighbour entry for the VIP, made stale with a made-up MAC,
// follows host 0's gratuitous ARP, and host 1 captures a request and a
// reply with sender = target = VIP for each round. Once removed, host 0
// no longer has the address, and a connection from host 1 to it is
// neither accepted nor reset: the kernel drops packets for an address it
// no longer has (with forwarding off, which the test checks).
func TestAddAnnounceRemove(t *testing.T) {
	lab := netlab.New(t, 2, 60)
	owner, peer := lab.Hosts[0], lab.Hosts[1]
	vip := netip.MustParsePrefix("198.18.60.50/24")

	peerNL := nsHandle(t, peer.NS)
	peerLink, err := peerNL.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	stale, _ := net.ParseMAC("02:00:00:00:00:99")
	if err := peerNL.NeighAdd(&netlink.Neigh{LinkIndex: peerLink.Attrs().Index, IP: vip.Addr().AsSlice(),
		HardwareAddr: stale, State: netlink.NUD_STALE}); err != nil {
		t.Fatalf("peer neighbour entry: %v", err)
	}

	// The peer captures ARP on its eth0 until it has seen want packets.
	const rounds = 2
	type seen struct {
		p   *arp.Packet
		err error
	}
	captured := make(chan seen, 16)
	ready := make(chan error, 1)
	go netlab.InNS(peer.NS, func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			ready <- err
			return nil
		}
		c, err := arp.Dial(ifi)
		if err != nil {
			ready <- err
			return nil
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		ready <- nil
		for n := 0; n < 2*rounds; {
			p, _, err := c.Read()
			if err != nil {
				captured <- seen{err: err}
				return nil
			}
			if p.SenderIP == vip.Addr() {
				captured <- seen{p: p}
				n++
			}
		}
		return nil
	})
	if err := <-ready; err != nil {
		t.Fatalf("peer capture: %v", err)
	}

	var mac net.HardwareAddr
	err = netlab.InNS(owner.NS, func() error {
		ifi, err := Interface(vip, "")
		if err != nil {
			return err
		}
		if ifi.Name != "eth0" {
			return fmt.Errorf("interface for %s: got %s, want eth0", vip, ifi.Name)
		}
		if _, err := Interface(netip.MustParsePrefix("198.19.0.7/24"), ""); err == nil {
			return errors.New("interface for 198.19.0.7: found one, want an error")
		}
		if _, err := Interface(vip, "nosuch0"); err == nil {
			return errors.New("interface nosuch0: found, want an error")
		}
		mac = ifi.HardwareAddr
		added, err := Add(ifi, vip.Addr())
		if err != nil || !added {
			return fmt.Errorf("add: added %v, err %v; want true, nil", added, err)
		}
		if added, err := Add(ifi, vip.Addr()); err != nil || added {
			return fmt.Errorf("second add: added %v, err %v; want false, nil", added, err)
		}
		if has, err := Has("eth0", vip.Addr()); err != nil || !has {
			return fmt.Errorf("has after add: %v, %v", has, err)
		}
		an, err := Announce(ifi, vip.Addr(), Schedule{Rounds: rounds, Interval: 50 * time.Millisecond})
		if err != nil {
			return err
		}
		return an.Wait()
	})
	if err != nil {
		t.Fatal(err)
	}
	var reqs, reps int
	for i := 0; i < 2*rounds; i++ {
		s := <-captured
		if s.err != nil {
			t.Fatalf("peer saw %d requests and %d replies, then: %v", reqs, reps, s.err)
		}
		p := s.p
		if p.TargetIP != vip.Addr() || p.SenderHardwareAddr.String() != mac.String() {
			t.Errorf("captured %v: sender %s %s target %s, want sender %s %s target %s", p.Operation,
				p.SenderIP, p.SenderHardwareAddr, p.TargetIP, vip.Addr(), mac, vip.Addr())
		}
		switch p.Operation {
		case arp.OperationRequest:
			reqs++
		case arp.OperationReply:
			reps++
		}
	}
	if reqs != rounds || reps != rounds {
		t.Errorf("captured %d requests and %d replies, want %d of each", reqs, reps, rounds)
	}
	// The neighbour entry follows; the kernel handles the ARP when it
	// arrives, but the capture above may see it first.
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := neighMAC(t, peerNL, peerLink.Attrs().Index, vip.Addr())
		if got == mac.String() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("peer's neighbour entry for %s: %s, want %s", vip.Addr(), got, mac)
		}
		time.Sleep(20 * time.Millisecond)
	}

	err = netlab.InNS(owner.NS, func() error {
		if err := Remove("eth0", vip.Addr()); err != nil {
			return err
		}
		if has, err := Has("eth0", vip.Addr()); err != nil || has {
			return fmt.Errorf("has after remove: %v, %v", has, err)
		}
		if err := Remove("eth0", vip.Addr()); err != nil {
			return fmt.Errorf("second remove: %v", err)
		}
		if err := Remove("nosuch0", vip.Addr()); err != nil {
			return fmt.Errorf("remove from a missing interface: %v", err)
		}
		fwd, err := os.ReadFile("/proc/sys/net/ipv4/conf/eth0/forwarding")
		if err != nil {
			return err
		}
		if string(fwd) != "0\n" {
			return fmt.Errorf("forwarding on eth0: %q, want 0 (the lab's hosts inherit it from the machine)", fwd)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The peer still sends to host 0's MAC; nothing may answer.
	err = netlab.InNS(peer.NS, func() error {
		d := net.Dialer{Timeout: time.Second}
		c, err := d.Dial("tcp", netip.AddrPortFrom(vip.Addr(), 80).String())
		if err == nil {
			c.Close()
			return errors.New("connection to the removed VIP accepted")
		}
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, unix.ECONNRESET) {
			return fmt.Errorf("connection to the removed VIP: %w, want a timeout (no RST)", err)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return fmt.Errorf("connection to the removed VIP: %w, want a timeout", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func neighMAC(t *testing.T, h *netlink.Handle, link int, a netip.Addr) string {
	t.Helper()
	ns, err := h.NeighList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if got, ok := netip.AddrFromSlice(n.IP); ok && got.Unmap() == a {
			return n.HardwareAddr.String()
		}
	}
	return "none"
}

func TestCapable(t *testing.T) {
	// This process's own effective set, read another way: a raw socket
	// needs CAP_NET_RAW.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err == nil {
		unix.Close(fd)
	}
	why := Capable()
	if err != nil && why == "" {
		t.Errorf("Capable() = \"\" but a packet socket failed: %v", err)
	}
	if os.Geteuid() == 0 && err == nil && why != "" {
		// root with CAP_NET_RAW; CAP_NET_ADMIN is what the lab needs too.
		if netlab.Available() == "" {
			t.Errorf("Capable() = %q as root able to open packet sockets", why)
		}
	}
}
