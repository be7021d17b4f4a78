package node

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/netlab"
	"github.com/pcluster/pcluster/netrehome"
)

// TestVIPAddSilent: addSilent (a migration's target, before the start)
// puts the address on the interface without telling the neighbours;
// announce (after the start) sends the gratuitous ARP. A second host on
// the bridge sees the first ARP packet with the VIP as sender only after
// announce was called.
func TestVIPAddSilent(t *testing.T) {
	lab := netlab.New(t, 2, 62)
	vip := "198.18.62.50/24"
	a := netip.MustParsePrefix(vip).Addr()
	// The second host's ARP packets from the VIP, with when they came.
	var fd int
	err := inNS(lab.Hosts[1].NS, func() error {
		var err error
		proto := int(unix.ETH_P_ARP>>8 | unix.ETH_P_ARP&0xff<<8) // htons
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		t.Fatalf("packet socket on %s: %v", lab.Hosts[1].NS, err)
	}
	var mu sync.Mutex
	var first time.Time
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		defer unix.Close(fd)
		buf := make([]byte, 64)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			// ARP for IPv4 over Ethernet: the sender's address at 14.
			if err != nil || n < 28 || netip.AddrFrom4([4]byte(buf[14:18])) != a {
				continue
			}
			mu.Lock()
			if first.IsZero() {
				first = time.Now()
			}
			mu.Unlock()
		}
	}()
	defer func() { close(stop); <-done }()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	v := newVIPs(t.TempDir(), "", log)
	var announced time.Time
	err = inNS(lab.Hosts[0].NS, func() error {
		defer v.close()
		if err := v.addSilent("w1", vip); err != nil {
			return err
		}
		if has, err := netrehome.Has("eth0", a); err != nil || !has {
			return fmt.Errorf("after addSilent the address is on eth0: %v (%v), want true", has, err)
		}
		v.mu.Lock()
		an := v.ann[a]
		v.mu.Unlock()
		if an != nil {
			return fmt.Errorf("addSilent started an announcement")
		}
		// Let a stray packet arrive, if one was sent: what the target
		// does while the copy starts. Not a bound on anything.
		time.Sleep(200 * time.Millisecond)
		announced = time.Now()
		v.announce(vip)
		deadline := time.Now().Add(10 * time.Second)
		for {
			mu.Lock()
			f := first
			mu.Unlock()
			if !f.IsZero() {
				if f.Before(announced) {
					return fmt.Errorf("an ARP packet from %s came %v before announce", a, announced.Sub(f))
				}
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("no ARP packet from %s on %s after announce", a, lab.Hosts[1].NS)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	err = inNS(lab.Hosts[0].NS, func() error {
		v.reconcile(map[string]string{}, func(string) bool { return false })
		if has, err := netrehome.Has("eth0", a); err != nil || has {
			return fmt.Errorf("after the reconcile the address is on eth0: %v (%v), want false", has, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
