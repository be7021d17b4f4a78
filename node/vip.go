package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/netrehome"
	"github.com/pcluster/pcluster/scheduler"
)

// The agent's part of virtual IPs (docs/cluster.md, "Virtual IPs"): the
// node that runs a workload carries its VIP. Run's reconcile makes the
// addresses follow the processes (started: add and announce; exited,
// stopped, moved away: remove); a migration orders the move itself: the
// source removes the VIP once the process is frozen (migrateOut's
// Frozen), the target adds and announces it after the commit and before
// the process runs (receive), and a source whose migration failed puts it
// back. Every address this agent added is recorded in DataDir/vips.json,
// so that the next agent removes the ones no longer due and never one it
// did not add.

// vipFile is the record of the addresses this node's agents added.
const vipFile = "vips.json"

// vipHeld is an address this agent carries for a workload.
type vipHeld struct {
	Addr      netip.Addr `json:"addr"`
	Interface string     `json:"interface"`
	Workload  string     `json:"workload"`
	// Owned: this agent (or an earlier one here) added it. An address
	// that was on the interface already is announced but never removed.
	Owned bool `json:"-"`
	// recorded: read from the record at start, not yet checked against
	// the interface (which an operator or a reboot may have cleared).
	recorded bool
}

// vips holds this agent's virtual IPs. Its methods may be called from Run
// and from migration goroutines.
type vips struct {
	path  string // the record, DataDir/vipFile
	iface string // Config.VIPInterface
	log   *slog.Logger

	// mu guards the fields below; it is held across the netlink calls (a
	// few milliseconds), so that an add and a remove never interleave.
	mu     sync.Mutex
	held   map[netip.Addr]*vipHeld
	frozen map[string]bool // workloads frozen by a migration out: their VIP stays off
	ann    map[netip.Addr]*netrehome.Announcement
	failed map[netip.Addr]string // the last error adding it, logged once
}

func newVIPs(dataDir, iface string, log *slog.Logger) *vips {
	v := &vips{path: filepath.Join(dataDir, vipFile), iface: iface, log: log,
		held: map[netip.Addr]*vipHeld{}, frozen: map[string]bool{}, ann: map[netip.Addr]*netrehome.Announcement{},
		failed: map[netip.Addr]string{}}
	b, err := os.ReadFile(v.path)
	if errors.Is(err, os.ErrNotExist) {
		return v
	}
	var rec []vipHeld
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	if err != nil {
		// Without the record nothing is removed that this node may not
		// have added; the addresses still due are added again.
		log.Warn("virtual IP record unreadable; addresses it lists are left alone", "file", v.path, "err", err)
		return v
	}
	for _, h := range rec {
		if h.Addr.IsValid() && h.Interface != "" {
			h.Owned, h.recorded = true, true
			v.held[h.Addr] = &h
		}
	}
	return v
}

// save writes the record of owned addresses (mu held).
func (v *vips) save() {
	var rec []vipHeld
	for _, h := range v.held {
		if h.Owned {
			rec = append(rec, *h)
		}
	}
	sort.Slice(rec, func(i, j int) bool { return rec[i].Addr.Less(rec[j].Addr) })
	b, _ := json.Marshal(rec)
	tmp := v.path + ".tmp"
	err := os.MkdirAll(filepath.Dir(v.path), 0o700)
	if err == nil {
		err = os.WriteFile(tmp, b, 0o600)
	}
	if err == nil {
		err = os.Rename(tmp, v.path)
	}
	if err != nil {
		v.log.Warn("virtual IP record not written", "file", v.path, "err", err)
	}
}

// add carries vip for workload wid: adds it, records it, announces it.
// Carried already for wid, or wid frozen by a migration out: nothing to
// do.
func (v *vips) add(wid, vip string) error { return v.place(wid, vip, true) }

// addSilent is add without the announcement, which announce makes: a
// migration's target adds the address before the restored process binds
// its sockets to it (they need it: routing picks it as their source) but
// tells the neighbours only once those sockets are there. Announced
// earlier, the peers' segments, retransmitted while the copy is built,
// would reach a host that has the address and no socket for them, and it
// would answer with a reset.
func (v *vips) addSilent(wid, vip string) error { return v.place(wid, vip, false) }

// announce announces vip, if held: addSilent's second half.
func (v *vips) announce(vip string) {
	p, err := netrehome.Parse(vip)
	if err != nil {
		return
	}
	a := p.Addr()
	v.mu.Lock()
	defer v.mu.Unlock()
	h := v.held[a]
	if h == nil {
		return
	}
	ifi, err := net.InterfaceByName(h.Interface)
	if err == nil {
		v.announceLocked(ifi, a, h.Workload)
	} else {
		v.log.Warn("virtual IP added but not announced", "vip", a, "workload", h.Workload, "err", err)
	}
}

// announceLocked starts announcing a on ifi (mu held).
func (v *vips) announceLocked(ifi *net.Interface, a netip.Addr, wid string) {
	an, err := netrehome.Announce(ifi, a, netrehome.DefaultSchedule)
	if err != nil {
		// The address is here; neighbours learn it when their entries
		// expire. Not a reason to take it away again.
		v.log.Warn("virtual IP added but not announced", "vip", a, "workload", wid, "err", err)
		return
	}
	if old := v.ann[a]; old != nil {
		old.Stop()
	}
	v.ann[a] = an
	v.log.Info("virtual IP announced", "vip", a, "interface", ifi.Name, "workload", wid)
}

func (v *vips) place(wid, vip string, announce bool) error {
	p, err := netrehome.Parse(vip)
	if err != nil {
		return fmt.Errorf("workload %s: %w", wid, err)
	}
	a := p.Addr()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.frozen[wid] {
		return nil
	}
	if h := v.held[a]; h != nil && h.recorded {
		h.recorded = false
		if has, err := netrehome.Has(h.Interface, a); err == nil && !has {
			v.log.Info("recorded virtual IP gone from its interface; adding it again", "vip", a, "interface", h.Interface)
			delete(v.held, a)
		}
	}
	if h := v.held[a]; h != nil {
		if h.Workload == wid {
			return nil
		}
		v.log.Info("virtual IP passes to another workload", "vip", a, "from", h.Workload, "to", wid)
		h.Workload = wid
		v.save()
		return nil
	}
	ifi, err := netrehome.Interface(p, v.iface)
	if err != nil {
		return fmt.Errorf("workload %s: %w", wid, err)
	}
	added, err := netrehome.Add(ifi, a)
	if err != nil {
		return fmt.Errorf("workload %s: %w", wid, err)
	}
	v.held[a] = &vipHeld{Addr: a, Interface: ifi.Name, Workload: wid, Owned: added}
	delete(v.failed, a)
	if added {
		v.save()
	} else {
		v.log.Warn("virtual IP was on the interface already: announced, never removed by pclusterd", "vip", a, "interface", ifi.Name, "workload", wid)
	}
	v.log.Info("virtual IP added", "vip", a, "interface", ifi.Name, "workload", wid)
	if announce {
		v.announceLocked(ifi, a, wid)
	}
	return nil
}

// removeLocked removes a held address (mu held): only if owned from the
// interface.
func (v *vips) removeLocked(h *vipHeld) {
	if an := v.ann[h.Addr]; an != nil {
		an.Stop()
		delete(v.ann, h.Addr)
	}
	if h.Owned {
		if err := netrehome.Remove(h.Interface, h.Addr); err != nil {
			v.log.Warn("virtual IP not removed", "vip", h.Addr, "workload", h.Workload, "err", err)
			return // tried again by the next reconcile
		}
	}
	delete(v.held, h.Addr)
	v.save()
	v.log.Info("virtual IP removed", "vip", h.Addr, "interface", h.Interface, "workload", h.Workload, "owned", h.Owned)
}

// freeze takes workload wid's VIP away and keeps it away until thaw: its
// process is frozen by a migration out.
func (v *vips) freeze(wid string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.frozen[wid] = true
	for _, h := range v.held {
		if h.Workload == wid {
			v.removeLocked(h)
		}
	}
}

// thaw ends freeze; with vip != "" (the migration failed and the
// original resumes here) the VIP is put back at once.
func (v *vips) thaw(wid, vip string) {
	v.mu.Lock()
	delete(v.frozen, wid)
	v.mu.Unlock()
	if vip != "" {
		if err := v.add(wid, vip); err != nil {
			v.log.Warn("virtual IP not put back after a failed migration", "workload", wid, "err", err)
		}
	}
}

// reconcile makes the held addresses match due (address → workload, the
// workloads that run here now). A held address not due is removed unless
// keep says its workload may still run here (the state says running here
// but the agent has not taken it over yet).
func (v *vips) reconcile(due map[string]string, keep func(wid string) bool) {
	want := map[netip.Addr]string{}
	for vip, wid := range due {
		if err := v.add(wid, vip); err != nil {
			p, _ := netrehome.Parse(vip)
			v.mu.Lock()
			if v.failed[p.Addr()] != err.Error() {
				v.failed[p.Addr()] = err.Error()
				v.log.Warn("virtual IP not added; will retry", "vip", vip, "workload", wid, "err", err)
			}
			v.mu.Unlock()
			continue
		}
		if p, err := netrehome.Parse(vip); err == nil {
			want[p.Addr()] = wid
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for a, h := range v.held {
		if want[a] == h.Workload || (!v.frozen[h.Workload] && keep(h.Workload)) {
			continue
		}
		v.removeLocked(h)
	}
}

// close stops the announcements under way; the addresses stay (the
// workloads outlive the agent).
func (v *vips) close() {
	v.mu.Lock()
	defer v.mu.Unlock()
	for a, an := range v.ann {
		an.Stop()
		delete(v.ann, a)
	}
}

// reconcileVIPs gives each workload running here its VIP and takes away
// the others (Run only). Before the replica has applied anything it does
// nothing: an empty state would take every address away.
func (a *Agent) reconcileVIPs() {
	due := map[string]string{}
	running := map[string]bool{}
	empty := false
	a.cfg.FSM.Read(func(s *scheduler.State) {
		empty = s.Index == 0
		for _, w := range s.Workloads {
			if w.VIP == "" {
				continue
			}
			if w.Node == a.cfg.Name && w.State == scheduler.StateRunning {
				running[w.ID] = true
			}
			a.mu.Lock()
			here := a.procs[w.ID] != nil || a.claimed[w.ID] > 0
			a.mu.Unlock()
			if here {
				due[w.VIP] = w.ID
			}
		}
	})
	if empty {
		return
	}
	a.vips.reconcile(due, func(wid string) bool { return running[wid] })
}

// workloadVIP returns workload wid's VIP, "" if none.
func (a *Agent) workloadVIP(wid string) string {
	vip := ""
	a.cfg.FSM.Read(func(s *scheduler.State) {
		if w, ok := s.Workloads[wid]; ok {
			vip = w.VIP
		}
	})
	return vip
}

// movingTCP says which of a migrating workload's TCP connections can
// work on another host: those from its virtual IP, which moves with it.
// A connection from this host's own addresses is refused by name
// (capture.ErrConnectionStays), so the migration aborts and the workload
// runs on here, its connections intact.
func (a *Agent) movingTCP(wid string) capture.TCPOptions {
	moving := []netip.Prefix{}
	if vip := a.workloadVIP(wid); vip != "" {
		// The address alone: the prefix only picks the interface.
		if addr, err := netrehome.Parse(vip); err == nil {
			moving = append(moving, netip.PrefixFrom(addr.Addr(), addr.Addr().BitLen()))
		}
	}
	return capture.TCPOptions{Moving: moving}
}
