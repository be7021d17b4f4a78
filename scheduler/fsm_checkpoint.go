package scheduler

import (
	"fmt"
	"slices"
)

func init() {
	register(CmdCheckpointPolicyUpsert, applyCheckpointPolicyUpsert)
	register(CmdCheckpointPolicyDelete, applyCheckpointPolicyDelete)
	register(CmdCheckpointTaken, applyCheckpointTaken)
	register(CmdCheckpointFailed, applyCheckpointFailed)
	register(CmdCheckpointCopied, applyCheckpointCopied)
	register(CmdCheckpointPrune, applyCheckpointPrune)
	register(CmdCheckpointRequest, applyCheckpointRequest)
	register(CmdWorkloadRestore, applyWorkloadRestore)
	register(CmdCheckpointTarget, applyCheckpointTarget)
}

func applyCheckpointTarget(s *State, idx uint64, c *CheckpointTargetCmd) any {
	var cp *Checkpoint
	if r := s.Checkpoints[c.WorkloadID]; r != nil {
		cp = r.Find(c.Seq)
	}
	if cp == nil {
		return fmt.Errorf("checkpoint target: checkpoint %d of workload %s: %w", c.Seq, c.WorkloadID, ErrNotFound)
	}
	if n, ok := s.Nodes[c.Node]; !ok || n.Status != NodeReady {
		return refused(fmt.Sprintf("checkpoint target (checkpoint %d of workload %s)", c.Seq, c.WorkloadID), "node %s is not ready", c.Node)
	}
	if !slices.Contains(cp.Targets, c.Node) && !cp.Held(c.Node) {
		cp.Targets = append(cp.Targets, c.Node)
	}
	return *cp
}

// applyCheckpointPolicyUpsert records a policy. Its limits are checked
// where the entry is proposed (ValidateCheckpointPolicy), as for workloads.
func applyCheckpointPolicyUpsert(s *State, idx uint64, c *CheckpointPolicyUpsertCmd) any {
	p := c.Policy
	if p.Name == "" {
		return fmt.Errorf("checkpoint policy upsert: empty name")
	}
	s.CheckpointPolicies[p.Name] = &p
	return p
}

func applyCheckpointPolicyDelete(s *State, idx uint64, c *CheckpointPolicyDeleteCmd) any {
	if _, ok := s.CheckpointPolicies[c.Name]; !ok {
		return fmt.Errorf("checkpoint policy %s: %w", c.Name, ErrNotFound)
	}
	delete(s.CheckpointPolicies, c.Name)
	return nil
}

// runningAttempt checks that node runs attempt of workload id now: only
// that node's agent reports its checkpoints.
func runningAttempt(s *State, op, id, node string, attempt int) (*Workload, error) {
	w, ok := s.Workloads[id]
	if !ok {
		return nil, fmt.Errorf("%s: workload %s: %w", op, id, ErrNotFound)
	}
	if w.Node != node || w.Attempt != attempt || w.State != StateRunning {
		return nil, fmt.Errorf("%s: workload %s is %s on %s at attempt %d, not running on %s at attempt %d: %w",
			op, id, w.State, w.Node, w.Attempt, node, attempt, ErrStale)
	}
	return w, nil
}

func checkpointsOf(s *State, id string) *WorkloadCheckpoints {
	r, ok := s.Checkpoints[id]
	if !ok {
		r = &WorkloadCheckpoints{}
		s.Checkpoints[id] = r
	}
	return r
}

func applyCheckpointTaken(s *State, idx uint64, c *CheckpointTakenCmd) any {
	op := "checkpoint taken"
	if _, err := runningAttempt(s, op, c.WorkloadID, c.Node, c.Attempt); err != nil {
		return err
	}
	r := checkpointsOf(s, c.WorkloadID)
	if c.Parent != 0 && !r.ChainHeld(c.Parent, c.Node) {
		return refused(fmt.Sprintf("checkpoint taken (workload %s)", c.WorkloadID),
			"its parent, checkpoint %d, or one it needs is no longer kept or not held by %s", c.Parent, c.Node)
	}
	r.Seq++
	cp := &Checkpoint{WorkloadID: c.WorkloadID, Seq: r.Seq, Node: c.Node, Attempt: c.Attempt, At: c.At, Size: c.Size,
		Targets: slices.Clone(c.Targets), Holders: []string{c.Node}, NSPID: c.NSPID, Parent: c.Parent}
	r.List = append(r.List, cp)
	r.LastAt = max(r.LastAt, c.At)
	r.Failures = 0
	return *cp
}

func applyCheckpointFailed(s *State, idx uint64, c *CheckpointFailedCmd) any {
	if _, err := runningAttempt(s, "checkpoint failed", c.WorkloadID, c.Node, c.Attempt); err != nil {
		return err
	}
	r := checkpointsOf(s, c.WorkloadID)
	r.Failures++
	r.FailedTotal++
	r.LastError = cut(c.Error)
	r.LastErrorAt = c.At
	return nil
}

// applyCheckpointCopied records a copy, only from a node the leader chose
// for it.
func applyCheckpointCopied(s *State, idx uint64, c *CheckpointCopiedCmd) any {
	r, ok := s.Checkpoints[c.WorkloadID]
	var cp *Checkpoint
	if ok {
		cp = r.Find(c.Seq)
	}
	if cp == nil {
		return fmt.Errorf("checkpoint copied: checkpoint %d of workload %s: %w", c.Seq, c.WorkloadID, ErrNotFound)
	}
	if !slices.Contains(cp.Targets, c.Node) {
		return refused(fmt.Sprintf("checkpoint copied (checkpoint %d of workload %s)", c.Seq, c.WorkloadID),
			"node %s is not one of its targets %v", c.Node, cp.Targets)
	}
	if !cp.Held(c.Node) {
		cp.Holders = append(cp.Holders, c.Node)
	}
	return nil
}

func applyCheckpointPrune(s *State, idx uint64, c *CheckpointPruneCmd) any {
	r, ok := s.Checkpoints[c.WorkloadID]
	if !ok {
		return 0
	}
	n := len(r.List)
	r.List = slices.DeleteFunc(r.List, func(cp *Checkpoint) bool { return slices.Contains(c.Seqs, cp.Seq) })
	return n - len(r.List)
}

func applyCheckpointRequest(s *State, idx uint64, c *CheckpointRequestCmd) any {
	w, ok := s.Workloads[c.WorkloadID]
	if !ok {
		return fmt.Errorf("checkpoint request: workload %s: %w", c.WorkloadID, ErrNotFound)
	}
	if w.State != StateRunning {
		return refused("checkpoint request (workload "+w.ID+")", "workload is %s, not running", w.State)
	}
	checkpointsOf(s, c.WorkloadID).RequestedAt = c.At
	return nil
}

// applyWorkloadRestore rolls a workload back to a checkpoint
// (WorkloadRestoreCmd). Refused: a checkpoint not kept, a node that holds
// no copy or is not ready, a workload not started yet or being moved.
func applyWorkloadRestore(s *State, idx uint64, c *WorkloadRestoreCmd) any {
	op := "workload restore " + c.ID
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("%s: %w", op, ErrNotFound)
	}
	var cp *Checkpoint
	if r := s.Checkpoints[c.ID]; r != nil {
		cp = r.Find(c.Seq)
	}
	if cp == nil {
		return fmt.Errorf("%s: checkpoint %d: %w", op, c.Seq, ErrNotFound)
	}
	if !cp.Held(c.Node) {
		return refused(op, "node %s holds no copy of checkpoint %d (held by %v)", c.Node, c.Seq, cp.Holders)
	}
	if !s.Checkpoints[c.ID].ChainHeld(c.Seq, c.Node) {
		return refused(op, "node %s does not hold every checkpoint incremental checkpoint %d needs", c.Node, c.Seq)
	}
	if n, ok := s.Nodes[c.Node]; !ok || n.Status != NodeReady {
		return refused(op, "node %s is not ready", c.Node)
	}
	if m := s.ActiveMigration(c.ID); m != nil {
		return refused(op, "migration %s is in flight", m.ID)
	}
	if c.Failover && w.State != StateLost {
		return refused(op, "failover of a workload that is %s, not lost", w.State)
	}
	if c.Failover {
		w.Failover = &FailoverInfo{At: c.At, From: w.Node, To: c.Node, Seq: c.Seq, Age: max(w.LostAt-cp.At, 0)}
	}
	spec := &RestoreSpec{Seq: c.Seq, Node: c.Node, NSPID: cp.NSPID, At: c.At}
	switch w.State {
	case StatePending:
		return refused(op, "workload is pending: not started yet")
	case StateRunning:
		if w.Restore != nil && w.Restore.Replaces == w.Attempt {
			return refused(op, "a restore (checkpoint %d) is already under way", w.Restore.Seq)
		}
		spec.Replaces, spec.Attempt = w.Attempt, w.Attempt+1
		w.DesiredNode = c.Node
		w.Desired = DesiredRunning
	default:
		spec.Attempt = w.Attempt + 1
		w.Attempt++
		w.Node, w.DesiredNode = c.Node, c.Node
		w.Desired = DesiredRunning
		w.State = StatePending
		w.PID, w.StartTicks, w.NSPID, w.InitPID = 0, 0, 0, 0
		w.LostAt = 0
	}
	w.Restore = spec
	w.Message = fmt.Sprintf("restore from checkpoint %d on %s", c.Seq, c.Node)
	w.ModifyIndex = idx
	return *w
}
