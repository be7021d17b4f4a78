package scheduler

import (
	"fmt"
	"time"
)

// Failover (docs/cluster.md, "Failover"): when gossip declares a node
// dead its active workloads become lost; the leader then brings each back
// on another node, from its newest checkpoint with a copy on a ready node
// (restored there), otherwise from its command if its restart policy
// restarts it after a failure (Nomad's behaviour), else it stays lost.

func init() {
	register(CmdWorkloadFailover, applyWorkloadFailover)
}

// PlanFailover returns the failover of every lost workload that wants to
// run and has been lost for at least after: a workload-restore from its
// newest checkpoint held on a ready node (the first such holder), or a
// workload-failover from its command on the node placement picks.
func PlanFailover(s *State, now time.Time, after time.Duration) []Command {
	var out []Command
	for _, w := range s.SortedWorkloads() {
		if w.State != StateLost || w.Desired != DesiredRunning || now.UnixNano()-w.LostAt < int64(after) ||
			s.ActiveMigration(w.ID) != nil {
			continue
		}
		if seq, node, ok := failoverCheckpoint(s, w); ok {
			out = append(out, Command{Type: CmdWorkloadRestore, Payload: &WorkloadRestoreCmd{ID: w.ID, Seq: seq, Node: node,
				At: now.UnixNano(), Failover: true}})
			continue
		}
		if !restartDue(w, true) {
			continue
		}
		node, err := Place(s, PlacementRequest{Constraints: w.Constraints, Resources: w.Resources, VIP: w.VIP != "",
			Exclude: map[string]string{w.Node: "lost the workload"}})
		if err != nil {
			continue // nowhere to go now; the next round tries again
		}
		out = append(out, Command{Type: CmdWorkloadFailover, Payload: &WorkloadFailoverCmd{ID: w.ID, Node: node, At: now.UnixNano()}})
	}
	return out
}

// failoverCheckpoint finds the newest checkpoint of w with a copy on a
// ready node other than w's, which holds every checkpoint it needs too.
func failoverCheckpoint(s *State, w *Workload) (uint64, string, bool) {
	r := s.Checkpoints[w.ID]
	if r == nil {
		return 0, "", false
	}
	for i := len(r.List) - 1; i >= 0; i-- {
		c := r.List[i]
		for _, h := range c.Holders {
			if n, ok := s.Nodes[h]; ok && h != w.Node && n.Status == NodeReady && r.ChainHeld(c.Seq, h) {
				return c.Seq, h, true
			}
		}
	}
	return 0, "", false
}

func applyWorkloadFailover(s *State, idx uint64, c *WorkloadFailoverCmd) any {
	op := "workload failover " + c.ID
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("%s: %w", op, ErrNotFound)
	}
	if w.State != StateLost {
		return refused(op, "workload is %s, not lost", w.State)
	}
	if !restartDue(w, true) {
		return refused(op, "restart policy %s (%d of %d restarts) does not restart it", w.Restart.Mode, w.Restarts, w.Restart.Max)
	}
	if n, ok := s.Nodes[c.Node]; !ok || n.Status != NodeReady {
		return refused(op, "node %s is not ready", c.Node)
	}
	w.Failover = &FailoverInfo{At: c.At, From: w.Node, To: c.Node}
	w.Node, w.DesiredNode = c.Node, c.Node
	w.Restarts++
	w.Attempt++
	w.State = StatePending
	w.PID, w.StartTicks, w.NSPID, w.InitPID = 0, 0, 0, 0
	w.LostAt = 0
	w.Message = fmt.Sprintf("failover from %s: restarted from its command", w.Failover.From)
	w.ModifyIndex = idx
	return *w
}

// NextFailover returns the earliest time after now at which a lost
// workload becomes due for PlanFailover (lost for after), so that the
// leader can plan it then rather than at its next reconcile tick; ok is
// false when none is waiting. Workloads already due are PlanFailover's
// (and stay lost if nothing can replace them): not counted.
func NextFailover(s *State, now time.Time, after time.Duration) (next time.Time, ok bool) {
	for _, w := range s.Workloads {
		if w.State != StateLost || w.Desired != DesiredRunning {
			continue
		}
		due := time.Unix(0, w.LostAt).Add(after)
		if due.After(now) && (!ok || due.Before(next)) {
			next, ok = due, true
		}
	}
	return next, ok
}
