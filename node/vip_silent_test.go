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
	"github.com/pcluster/pcluster/scheduler"
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
	err := netlab.InNS(lab.Hosts[1].NS, func() error {
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
	err = netlab.InNS(lab.Hosts[0].NS, func() error {
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
	err = netlab.InNS(lab.Hosts[0].NS, func() error {
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

// TestVIPClaimedLeftToReceive: the reconcile of a migration's target
// leaves the VIP of a workload it has claimed (restored, not yet started)
// to receive: it neither adds nor announces it (an announcement before
// the restored sockets are bound sends the client's retransmissions to a
// host without them, which answers with a reset), nor removes the
// address receive added silently. Once the workload has arrived the
// reconcile carries its VIP as any other.
func TestVIPClaimedLeftToReceive(t *testing.T) {
	lab := netlab.New(t, 1, 63)
	const wid, vip = "w1", "198.18.63.50/24"
	a := netip.MustParsePrefix(vip).Addr()
	l := &fakeLeader{fsm: scheduler.NewFSM()}
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{
		ID: wid, Command: "/bin/true", UID: -1, GID: -1, DesiredNode: "a", VIP: vip}}); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ag := New(Config{Name: "a", DataDir: t.TempDir(), FSM: l.fsm, Logger: log})
	defer ag.vips.close()
	state := func() (bool, bool, error) {
		has, err := netrehome.Has("eth0", a)
		ag.vips.mu.Lock()
		defer ag.vips.mu.Unlock()
		return has, ag.vips.ann[a] != nil, err
	}
	err := netlab.InNS(lab.Hosts[0].NS, func() error {
		ag.mu.Lock()
		ag.claimed[wid] = 1 // receive, after the commit
		ag.mu.Unlock()
		ag.reconcileVIPs()
		if has, ann, err := state(); err != nil || has || ann {
			return fmt.Errorf("claimed, before receive adds it: on eth0 %v, announced %v (%v); want neither", has, ann, err)
		}
		if err := ag.vips.addSilent(wid, vip); err != nil {
			return err
		}
		ag.reconcileVIPs()
		if has, ann, err := state(); err != nil || !has || ann {
			return fmt.Errorf("claimed, added silently: on eth0 %v, announced %v (%v); want on eth0, not announced", has, ann, err)
		}
		// Started and announced by receive, then taken by Run.
		ag.vips.announce(vip)
		ag.arrived(arrival{wid: wid, attempt: 1})
		ag.mu.Lock()
		ag.procs[wid] = &proc{id: wid, attempt: 1, pid: os.Getpid()}
		ag.mu.Unlock()
		ag.reconcileVIPs()
		if has, ann, err := state(); err != nil || !has || !ann {
			return fmt.Errorf("arrived: on eth0 %v, announced %v (%v); want both", has, ann, err)
		}
		ag.mu.Lock()
		delete(ag.procs, wid)
		ag.mu.Unlock()
		ag.reconcileVIPs()
		if has, _, err := state(); err != nil || has {
			return fmt.Errorf("gone: on eth0 %v (%v); want removed", has, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
