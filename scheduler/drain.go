package scheduler

import (
	"fmt"
	"time"
)

// DrainPlan is what the drain planner proposes in one round: the commands
// for the leader to apply, and the workloads it could not find a place for
// this round (retried next round; stopped at the deadline).
type DrainPlan struct {
	Commands []Command
	Blocked  []DrainBlocked
}

// DrainBlocked is a workload of a draining node that no other node can take.
type DrainBlocked struct {
	Node, Workload, Why string
}

// MaxDrainAttempts is how many migrations of one workload a drain tries: a
// move aborted by a failure of the moment (the target went down, the
// stream broke) is tried again, one the engine refuses fails the same way
// every time, so after this many aborts the drain leaves the workload where
// it is and reports it (DrainStuck).
const MaxDrainAttempts = 3

// DrainStuck returns the workloads still on node n that its drain can
// neither move nor restart elsewhere: each had MaxDrainAttempts migrations
// out of n aborted since the drain started, and its restart policy would
// not restart it. The value is the last abort's reason.
func DrainStuck(s *State, n *Node) map[string]string {
	out := drainFailed(s, n)
	for id := range out {
		if restartable(s.Workloads[id]) {
			delete(out, id)
		}
	}
	return out
}

// restartable reports whether w's restart policy would restart it now.
func restartable(w *Workload) bool {
	return (w.Restart.Mode == RestartAlways || w.Restart.Mode == RestartOnFailure) && (w.Restart.Max == 0 || w.Restarts < w.Restart.Max)
}

// drainFailed returns the workloads still on node n whose moves failed
// MaxDrainAttempts times since its drain started, with the last reason.
func drainFailed(s *State, n *Node) map[string]string {
	return drainAborts(s, n, func(w *Workload) bool { return w.Node == n.Name })
}

// DrainRestarted returns the workloads the drain of node n restarted from
// their command elsewhere (their moves failed MaxDrainAttempts times), with
// the node each went to.
func DrainRestarted(s *State, n *Node) map[string]string {
	out := drainAborts(s, n, func(w *Workload) bool { return w.DesiredNode != n.Name })
	for id := range out {
		out[id] = s.Workloads[id].DesiredNode
	}
	return out
}

// drainAborts returns the workloads that had MaxDrainAttempts migrations
// out of n aborted since its drain started, are still active and pass
// keep, with the last abort's reason.
func drainAborts(s *State, n *Node, keep func(*Workload) bool) map[string]string {
	d := n.Drain
	if d == nil {
		return nil
	}
	type tally struct {
		aborts int
		last   *Migration
	}
	byWorkload := map[string]*tally{}
	for _, m := range s.Migrations {
		if m.Source != n.Name || m.State != MigrationAborted || m.PlannedAt < d.StartedAt {
			continue
		}
		t := byWorkload[m.WorkloadID]
		if t == nil {
			t = &tally{}
			byWorkload[m.WorkloadID] = t
		}
		t.aborts++
		if t.last == nil || m.PlanIndex > t.last.PlanIndex {
			t.last = m
		}
	}
	var out map[string]string
	for id, t := range byWorkload {
		w, ok := s.Workloads[id]
		if t.aborts < MaxDrainAttempts || !ok || !w.State.Active() || !keep(w) {
			continue
		}
		if out == nil {
			out = map[string]string{}
		}
		out[id] = t.last.Error
	}
	return out
}

// PlanDrain is the drain decision, a pure function of the state and the
// clock (Nomad's drainer, with migrations where Nomad restarts). For every
// node with a drain in progress, in name order:
//
//   - nothing left on it (no active workload, no migration from it in
//     flight): the drain is done (node-drain-done); the node stays
//     ineligible;
//   - the deadline passed (or force): every workload still on it is stopped
//     (a stop aborts a migration that has not committed);
//   - otherwise, while fewer than MaxParallel migrations from it are in
//     flight, its running workloads (oldest first) are planned to move to
//     the node placement picks among the others, counting the ones planned
//     in this round, and skipping the nodes in exclude (the leader's view
//     of nodes it cannot reach now, as for a new workload); a workload
//     whose moves failed MaxDrainAttempts times is restarted from its
//     command on the node placement picks (workload-reschedule) if its
//     restart policy allows it, else it stays and is reported
//     (DrainStuck).
//
// A node that is not ready moves nothing (its workloads are lost with it).
// Applying the commands may refuse some (the state changed meanwhile): the
// next round decides again from the new state.
func PlanDrain(s *State, now time.Time, exclude map[string]string) DrainPlan {
	var p DrainPlan
	at := now.UnixNano()
	busy := map[string]bool{} // workloads with an active migration
	inflight := map[string]int{}
	for _, m := range s.Migrations {
		if m.State.Active() {
			busy[m.WorkloadID] = true
			inflight[m.Source]++
		}
	}
	extra := map[string]int{}
	workloads := s.SortedWorkloads()
	for _, n := range s.SortedNodes() {
		d := n.Drain
		if !d.Draining() {
			continue
		}
		var on []*Workload
		for _, w := range workloads {
			if w.State.Active() && (w.Node == n.Name || w.DesiredNode == n.Name) {
				on = append(on, w)
			}
		}
		if len(on) == 0 && inflight[n.Name] == 0 {
			p.Commands = append(p.Commands, Command{CmdNodeDrainDone, &NodeDrainDoneCmd{Name: n.Name, StartedAt: d.StartedAt, At: at}})
			continue
		}
		if d.Force || !d.NoDeadline && d.Deadline != 0 && at >= d.Deadline {
			for _, w := range on {
				if w.Desired != DesiredStopped {
					p.Commands = append(p.Commands, Command{CmdWorkloadStop, &WorkloadStopCmd{ID: w.ID, At: at}})
				}
			}
			continue
		}
		if n.Status != NodeReady {
			continue
		}
		slots := max(d.MaxParallel, 1) - inflight[n.Name]
		failed := drainFailed(s, n)
		for _, w := range on {
			if slots <= 0 {
				break
			}
			if w.State != StateRunning || w.Node != n.Name || w.DesiredNode != n.Name || w.Desired != DesiredRunning || busy[w.ID] {
				continue
			}
			why, moveFailed := failed[w.ID]
			if moveFailed && !restartable(w) {
				p.Blocked = append(p.Blocked, DrainBlocked{Node: n.Name, Workload: w.ID,
					Why: fmt.Sprintf("%d moves failed, the last: %s", MaxDrainAttempts, why)})
				continue
			}
			ex := map[string]string{n.Name: "is draining"}
			for k, v := range exclude {
				ex[k] = v
			}
			target, err := Place(s, PlacementRequest{Constraints: w.Constraints, Resources: w.Resources, Exclude: ex, Extra: extra, VIP: w.VIP != ""})
			if err != nil {
				p.Blocked = append(p.Blocked, DrainBlocked{Node: n.Name, Workload: w.ID, Why: err.Error()})
				continue
			}
			extra[target]++
			slots--
			if moveFailed {
				p.Commands = append(p.Commands, Command{CmdWorkloadReschedule, &WorkloadRescheduleCmd{ID: w.ID, Node: target,
					Reason: fmt.Sprintf("drain of node %s: restarted from its command after %d failed moves", n.Name, MaxDrainAttempts),
					At:     at}})
				continue
			}
			p.Commands = append(p.Commands, Command{CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: w.ID, Target: target,
				Reason: "drain of node " + n.Name, Origin: OriginDrain, At: at}})
		}
	}
	return p
}
