package scheduler

// Fencing (docs/cluster.md, "Fencing"): a node cut off from the raft
// majority for longer than its fence time freezes the workloads that a
// failover could bring back elsewhere, so that two copies never serve at
// once; when it is back in contact its agent thaws those it still owns
// and kills the others. Which workloads, is decided here from the node's
// replica.

// Fence modes of a workload or a checkpoint policy.
const (
	FenceFreeze = "freeze"
	FenceOff    = "off"
)

func validFence(f string) error {
	if f != "" && f != FenceFreeze && f != FenceOff {
		return invalid("fence", "%.32q: want freeze or off", f)
	}
	return nil
}

// EffectiveFence is w's fence mode: its own when set, else FenceOff when
// a checkpoint policy that applies to it says off, else FenceFreeze.
func EffectiveFence(s *State, w *Workload) string {
	if w.Fence != "" {
		return w.Fence
	}
	for _, p := range s.CheckpointPolicies {
		if p.Fence == FenceOff && p.Matches(w) {
			return FenceOff
		}
	}
	return FenceFreeze
}

// FenceApplies reports whether node, cut off from the majority, must
// freeze w: w runs there (running, or lost while the node was away),
// should run, its fence mode is freeze, and a failover could bring it
// back elsewhere — a checkpoint with a copy on another node, or a restart
// policy that restarts it after a failure (PlanFailover's two ways). A
// workload no failover could replace keeps running: freezing it would
// only stop the one copy there is.
//
// The node decides from its own replica, which may lag the leader's by
// the entries committed just before the cut: a copy counts as soon as
// the leader chose its node as a target (the taker pushes only once its
// replica lists the checkpoint, targets included), not only once the
// copy's entry (holders) reached this replica.
func FenceApplies(s *State, w *Workload, node string) bool {
	if w.Node != node || w.Desired != DesiredRunning || w.State != StateRunning && w.State != StateLost ||
		EffectiveFence(s, w) != FenceFreeze {
		return false
	}
	if restartDue(w, true) {
		return true
	}
	if r := s.Checkpoints[w.ID]; r != nil {
		for _, c := range r.List {
			for _, h := range append(c.Holders[:len(c.Holders):len(c.Holders)], c.Targets...) {
				if h != node {
					return true
				}
			}
		}
	}
	return false
}

// FenceVerdict is what an agent back in contact with the majority does
// with a workload it froze while cut off.
type FenceVerdict int

const (
	FenceWait FenceVerdict = iota // still undecided (lost here): stay frozen
	FenceThaw                     // still this node's, at this attempt: resume
	FenceKill                     // brought back elsewhere, or gone: kill
)

// AfterFence decides the fate of attempt of workload id, frozen by node
// while it was cut off, from a replica that is current again.
func AfterFence(s *State, id string, attempt int, node string) FenceVerdict {
	w, ok := s.Workloads[id]
	if m := s.ActiveMigration(id); ok && m != nil && m.Source == node && m.Attempt == attempt && m.State != MigrationPlanned {
		// Its migration decides (the source resumes the original on an
		// abort, kills it on a commit); a thaw now could let it run
		// while the target starts its copy.
		return FenceWait
	}
	switch {
	case !ok || w.Node != node || w.Attempt != attempt:
		return FenceKill
	case w.State == StateRunning || w.Desired == DesiredStopped:
		// Running here: resume it. Stopped meanwhile: resume it so that
		// the stop's SIGTERM is handled.
		return FenceThaw
	case w.State == StateLost:
		// Lost here at this attempt: the agent reports it running again,
		// or the leader fails it over first; whichever commits decides.
		return FenceWait
	}
	return FenceKill // ended or pending at this attempt: not a process to resume
}
