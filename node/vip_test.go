package node

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pcluster/pcluster/internal/netlab"
	"github.com/pcluster/pcluster/netrehome"
)

// TestVIPRecord: an agent's VIPs on a lab host. A frozen workload's VIP
// stays off until thawed; an address that was on the interface before
// is announced but never removed; the record in the data dir lets the
// next agent remove what the first added and is no longer due.
func TestVIPRecord(t *testing.T) {
	lab := netlab.New(t, 1, 61)
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	mine, theirs, frozen := "198.18.61.50/24", "198.18.61.60/24", "198.18.61.70/24"
	addr := func(s string) netip.Addr { return netip.MustParsePrefix(s).Addr() }
	has := func(s string) bool {
		ok, err := netrehome.Has("eth0", addr(s))
		if err != nil {
			t.Error(err)
		}
		return ok
	}
	err := netlab.InNS(lab.Hosts[0].NS, func() error {
		ifi, err := netrehome.Interface(netip.MustParsePrefix(theirs), "")
		if err != nil {
			return err
		}
		if _, err := netrehome.Add(ifi, addr(theirs)); err != nil { // an operator's
			return err
		}
		v := newVIPs(dir, "", log)
		due := map[string]string{mine: "w1", theirs: "w2", frozen: "w3"}
		running := func(string) bool { return false }
		v.reconcile(due, running)
		if !has(mine) || !has(theirs) || !has(frozen) {
			return fmt.Errorf("after the first reconcile: mine %v theirs %v w3's %v, want all", has(mine), has(theirs), has(frozen))
		}
		v.freeze("w3")
		v.reconcile(due, running)
		if has(frozen) {
			return fmt.Errorf("frozen workload's VIP still on the interface")
		}
		v.thaw("w3", frozen)
		if !has(frozen) {
			return fmt.Errorf("VIP not put back by thaw")
		}
		// w2 ended: its address was not ours, so it stays.
		delete(due, theirs)
		v.reconcile(due, running)
		if !has(theirs) {
			return fmt.Errorf("an address pclusterd did not add was removed")
		}
		v.close()
		b, err := os.ReadFile(filepath.Join(dir, vipFile))
		if err != nil {
			return err
		}
		if !strings.Contains(string(b), addr(mine).String()) || strings.Contains(string(b), addr(theirs).String()) {
			return fmt.Errorf("record %s: want %s and not %s", b, addr(mine), addr(theirs))
		}
		// The next agent: w1 still runs here (not yet adopted: the
		// state says so), w3 moved away while no agent ran.
		v2 := newVIPs(dir, "", log)
		v2.reconcile(map[string]string{}, func(wid string) bool { return wid == "w1" })
		if !has(mine) || has(frozen) {
			return fmt.Errorf("after the restart: w1's %v (want true), w3's %v (want false)", has(mine), has(frozen))
		}
		// An operator removed w1's address: the next agent adds it again.
		if err := netrehome.Remove("eth0", addr(mine)); err != nil {
			return err
		}
		v3 := newVIPs(dir, "", log)
		v3.reconcile(map[string]string{mine: "w1"}, running)
		defer v3.close()
		if !has(mine) {
			return fmt.Errorf("recorded VIP gone from the interface not added again")
		}
		v3.reconcile(map[string]string{}, running)
		if has(mine) {
			return fmt.Errorf("w1's VIP not removed once it ended")
		}
		if b, _ := os.ReadFile(filepath.Join(dir, vipFile)); strings.Contains(string(b), addr(mine).String()) {
			return fmt.Errorf("record still lists %s: %s", addr(mine), b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
