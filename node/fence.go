package node

import (
	"context"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// Fencing (docs/cluster.md, "Fencing"). A node cut off from the raft
// majority cannot learn that the leader brought its workloads back
// elsewhere; after Config.FenceAfter without contact the agent freezes
// (cgroup freezer, reversible) those a failover could restore elsewhere
// (scheduler.FenceApplies), so that two copies never serve at once. Back
// in contact, with a current replica, it settles them before anything
// else: thawed if the state still has them here, killed if not.

// fenceCheckEvery is how often the fence compares the last contact with
// the fence time: the fence acts at most this late.
const fenceCheckEvery = 200 * time.Millisecond

// fenceLoop checks the fence every fenceCheckEvery until ctx ends. It is
// a goroutine of its own, not a case of Run's loop: Run can wait several
// seconds on a leader that does not answer (its sync, its reports), the
// very moment the fence must not be late.
func (a *Agent) fenceLoop(ctx context.Context) {
	defer a.wg.Done()
	t := time.NewTicker(fenceCheckEvery)
	defer t.Stop()
	for {
		// The replica's changes too, for the watchdog's lease: a
		// checkpoint whose copy goes to another node makes its workload
		// one the watchdog must freeze before the copy exists
		// (awaitLease).
		var changed <-chan struct{}
		if a.leaseOwner != "" {
			changed = a.cfg.FSM.Changed()
		}
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			a.checkFence(now)
		case <-changed:
			a.checkFence(time.Now())
		}
	}
}

// awaitLease returns once the lease has been written from a replica at
// index idx or later (at once without a watchdog), or after a second.
func (a *Agent) awaitLease(idx uint64) {
	if a.leaseOwner == "" {
		return
	}
	for deadline := time.Now().Add(time.Second); a.leaseIdx.Load() < idx && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
}

// checkFence freezes what the fence covers once the node has been out of
// contact for longer than FenceAfter (fenceLoop only).
func (a *Agent) checkFence(now time.Time) {
	contact := a.cfg.Contact()
	since := now.Sub(contact)
	cut := since > a.cfg.FenceAfter
	if a.leaseOwner != "" {
		a.takeWatchdogFrozen()
		cgs, idx := a.fenceCandidates()
		if a.writeLease(contact, cgs) {
			a.leaseIdx.Store(idx)
		}
	}
	a.mu.Lock()
	was := a.cutOff
	a.cutOff = cut
	n := len(a.fenced)
	a.mu.Unlock()
	switch {
	case !cut && was:
		a.log.Warn("back in contact with the raft majority: fenced workloads are settled once the replica is current", "fenced", n)
		return
	case !cut:
		return
	case !was:
		a.log.Warn("cut off from the raft majority: fencing", "last_contact", since.Round(time.Millisecond), "fence_after", a.cfg.FenceAfter)
		if a.cg == nil {
			a.log.Error("cannot fence: workloads run without cgroups, a failover may run a second copy while this node is cut off")
		}
	}
	if a.cg == nil {
		return
	}
	type victim struct {
		id      string
		attempt int
	}
	var vs []victim
	// What the replica runs here, not only what this agent watches: an
	// agent that started while the node is cut off has adopted nothing
	// yet (it adopts once its replica is current), and the processes run
	// on in their cgroups. The FSM's lock before mu, as reconcile takes
	// them.
	a.cfg.FSM.Read(func(s *scheduler.State) {
		a.mu.Lock()
		defer a.mu.Unlock()
		for id, w := range s.Workloads {
			_, done := a.fenced[id]
			_, held := a.holding[id]
			// held: a migration's source holds it frozen and decides
			// with the state, as it does once a migration is past
			// planned; capturing: the next check takes it.
			if w.Node != a.cfg.Name || done || held || a.capturing[id] {
				continue
			}
			if m := s.ActiveMigration(id); m != nil && m.State != scheduler.MigrationPlanned {
				continue
			}
			if p := a.procs[id]; p != nil && p.attempt != w.Attempt {
				continue
			}
			if scheduler.FenceApplies(s, w, a.cfg.Name) {
				a.fenced[id] = w.Attempt // from now on no capture starts
				vs = append(vs, victim{id, w.Attempt})
			}
		}
		// What the previous agent's lease listed, while the replica may
		// still lack it.
		for _, c := range a.inherited {
			if _, done := a.fenced[c.Workload]; !done && c.Dir == a.cg.dir(c.Workload, c.Attempt) {
				a.fenced[c.Workload] = c.Attempt
				vs = append(vs, victim{c.Workload, c.Attempt})
			}
		}
	})
	for _, v := range vs {
		dir := a.cg.dir(v.id, v.attempt)
		if len(procsOf(dir)) == 0 {
			// Ended while no agent watched, or never in a cgroup (an
			// agent without them started it): settled like the others.
			a.log.Info("nothing to fence: no process in the workload's cgroup", "workload", v.id, "attempt", v.attempt)
			continue
		}
		if err := freeze(dir, true); err != nil {
			a.log.Error("cannot fence workload", "workload", v.id, "err", err)
			a.mu.Lock()
			delete(a.fenced, v.id) // tried again next check
			a.mu.Unlock()
			continue
		}
		a.log.Warn("fenced: workload frozen while this node is cut off", "workload", v.id, "attempt", v.attempt)
	}
}

// isFenced reports whether the fence froze the workload and has not
// settled it yet: no migration starts on it (its capture would wait on
// frozen tasks).
func (a *Agent) isFenced(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.fenced[id]
	return ok
}

// settleFence decides the workloads the fence froze, once the node is
// back in contact and its replica current (reconcile calls it first):
// thawed if the state still has them here at the same attempt, killed if
// they run elsewhere now (or are gone), left frozen while they are lost
// here and the leader has not decided yet.
func (a *Agent) settleFence() {
	a.mu.Lock()
	fenced := maps.Clone(a.fenced)
	if a.cutOff {
		fenced = nil
	}
	a.mu.Unlock()
	now := time.Now()
	for id, attempt := range fenced {
		var v scheduler.FenceVerdict
		a.cfg.FSM.Read(func(s *scheduler.State) { v = scheduler.AfterFence(s, id, attempt, a.cfg.Name) })
		dir := a.cg.dir(id, attempt)
		switch v {
		case scheduler.FenceWait:
			continue
		case scheduler.FenceThaw:
			a.log.Warn("back in contact and the workload is still this node's: thawing", "workload", id, "attempt", attempt)
			if err := freeze(dir, false); err != nil && !errors.Is(err, fs.ErrNotExist) {
				a.log.Error("thaw fenced workload", "workload", id, "err", err)
				continue // tried again next round
			}
		case scheduler.FenceKill:
			a.log.Warn("workload runs elsewhere now: killing this node's stale copy (frozen by the fence)", "workload", id, "attempt", attempt)
			if err := kill(dir); err != nil {
				a.log.Error("kill fenced workload", "workload", id, "err", err)
			}
			if p := a.procs[id]; p != nil && p.attempt == attempt {
				a.signal(p, syscall.SIGKILL)
				p.stopping, p.killAt = true, now.Add(a.cfg.StopTimeout)
			}
			// Thawed, so that settleHeld does not take it for a
			// migration's held original; the killed tasks exit.
			freeze(dir, false)
		}
		a.mu.Lock()
		if a.fenced[id] == attempt {
			delete(a.fenced, id)
		}
		a.mu.Unlock()
	}
}

// killStrays kills at once the processes left running in this node's
// workload cgroups for an attempt that the state has since brought back
// on another node: a copy that ran on while this node's pclusterd was
// down (a failover; nothing fenced it, no agent ran). Frozen cgroups are
// settleHeld's and the fence's; the attempts this agent watches, migrates
// or receives are left to those paths.
func (a *Agent) killStrays() {
	if a.cg == nil {
		return
	}
	ents, err := os.ReadDir(a.cg.base)
	if err != nil {
		return
	}
	now := time.Now()
	for _, e := range ents {
		i := strings.LastIndexByte(e.Name(), '.')
		if !e.IsDir() || i <= 0 {
			continue
		}
		id := e.Name()[:i]
		attempt, err := strconv.Atoi(e.Name()[i+1:])
		if err != nil {
			continue
		}
		if p := a.procs[id]; p != nil && (p.attempt == attempt || p.stopping) || a.moved[id] == attempt {
			continue
		}
		a.mu.Lock()
		_, held := a.holding[id]
		_, fenced := a.fenced[id]
		busy := held || fenced || a.claimed[id] > 0 || a.incoming[id] != ""
		a.mu.Unlock()
		if busy {
			continue
		}
		stray, to := false, ""
		a.cfg.FSM.Read(func(s *scheduler.State) {
			w, ok := s.Workloads[id]
			stray = ok && attempt < w.Attempt && w.Node != a.cfg.Name && w.DesiredNode != a.cfg.Name && s.ActiveMigration(id) == nil
			if ok {
				to = w.Node
			}
		})
		dir := filepath.Join(a.cg.base, e.Name())
		if !stray || frozen(dir) || len(procsOf(dir)) == 0 {
			continue
		}
		a.log.Warn("workload runs elsewhere now: killing this node's stale copy (left running while no agent ran here)",
			"workload", id, "attempt", attempt, "on", to)
		if err := kill(dir); err != nil {
			a.log.Error("kill stale copy", "workload", id, "err", err)
		}
		if p := a.procs[id]; p != nil && !p.stopping {
			p.stopping, p.killAt = true, now.Add(a.cfg.StopTimeout)
		}
	}
}

// fenceCandidates lists the cgroups the fence would freeze now, for the
// watchdog's lease: the workloads the replica runs here that a failover
// could restore elsewhere, but for those a migration past planned holds
// (their source decides), and until the replica is current those the
// previous agent's lease listed.
func (a *Agent) fenceCandidates() (cgs []leaseCgroup, index uint64) {
	a.mu.Lock()
	out := append([]leaseCgroup(nil), a.inherited...)
	a.mu.Unlock()
	seen := map[string]bool{}
	for _, c := range out {
		seen[c.Dir] = true
	}
	a.cfg.FSM.Read(func(s *scheduler.State) {
		index = s.Index
		for id, w := range s.Workloads {
			if w.Node != a.cfg.Name {
				continue
			}
			if m := s.ActiveMigration(id); m != nil && m.State != scheduler.MigrationPlanned {
				continue
			}
			if dir := a.cg.dir(id, w.Attempt); scheduler.FenceApplies(s, w, a.cfg.Name) && !seen[dir] {
				out = append(out, leaseCgroup{Dir: dir, Workload: id, Attempt: w.Attempt})
			}
		}
	})
	return out, index
}
