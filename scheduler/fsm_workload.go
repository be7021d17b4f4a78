package scheduler

import (
	"errors"
	"fmt"
)

// Errors returned by FSM commands and decisions.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrStale    = errors.New("stale report")
	ErrNoNode   = errors.New("no eligible node")
	// ErrRefused marks a command the state's rules forbid as things stand
	// (a *RefusedError): a migration of a workload that is not running, a
	// drain of the last eligible node. The API answers it with 409.
	ErrRefused = errors.New("refused")
)

// RefusedError says, in one line, which rule refused an operation.
type RefusedError struct {
	Op  string // "migration plan (workload w1)"
	Why string // "workload is exited, not running"
}

func (e *RefusedError) Error() string        { return e.Op + ": " + e.Why }
func (e *RefusedError) Is(target error) bool { return target == ErrRefused }

func refused(op, format string, args ...any) error {
	return &RefusedError{Op: op, Why: fmt.Sprintf(format, args...)}
}

func init() {
	register(CmdWorkloadCreate, applyWorkloadCreate)
	register(CmdWorkloadStarted, applyWorkloadStarted)
	register(CmdWorkloadExited, applyWorkloadExited)
	register(CmdWorkloadStop, applyWorkloadStop)
	register(CmdWorkloadReschedule, applyWorkloadReschedule)
	register(CmdWorkloadLost, applyWorkloadLost)
}

// applyWorkloadCreate adds a workload as committed. It refuses only what
// the state cannot hold, the rules of this command since its first
// release: no id (the workload's key) or no command, an id already there,
// a node the state does not know, a virtual IP an active workload holds.
// The limits of ValidateWorkload are not applied here but where the entry
// is proposed (CheckCreate): they may tighten in a later version, and an
// FSM that refused on replay what an older one accepted would disagree
// with a server restored from a snapshot that holds it. What could be
// dangerous to run (a uid out of range) is refused by the agent instead.
func applyWorkloadCreate(s *State, idx uint64, c *WorkloadCreateCmd) any {
	w := c.Workload
	if w.ID == "" || w.Command == "" {
		return fmt.Errorf("workload create: id and command are required")
	}
	if _, ok := s.Workloads[w.ID]; ok {
		return fmt.Errorf("workload create %s: %w", w.ID, ErrExists)
	}
	if _, ok := s.Nodes[w.DesiredNode]; !ok {
		return fmt.Errorf("workload create %s: node %q: %w", w.ID, w.DesiredNode, ErrNotFound)
	}
	if w.VIP != "" {
		for _, o := range s.Workloads {
			if SameVIP(o.VIP, w.VIP) && o.State.Active() {
				return fmt.Errorf("workload create %s: virtual IP %s is used by %s: %w", w.ID, w.VIP, o.ID, ErrExists)
			}
		}
	}
	if w.Restart.Mode == "" {
		w.Restart.Mode = RestartNever
	}
	w.Desired = DesiredRunning
	w.State = StatePending
	w.Attempt = 1
	w.ModifyIndex = idx
	s.Workloads[w.ID] = &w
	return w
}

// applyWorkloadStarted and applyWorkloadExited apply a report as
// committed: its fields were checked where it was proposed (CheckReport),
// for the reason applyWorkloadCreate gives.
func applyWorkloadStarted(s *State, idx uint64, c *WorkloadStartedCmd) any {
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("workload started %s: %w", c.ID, ErrNotFound)
	}
	if c.Attempt != w.Attempt || c.Node != w.DesiredNode {
		return fmt.Errorf("workload started %s: attempt %d on %s, want attempt %d on %s: %w",
			c.ID, c.Attempt, c.Node, w.Attempt, w.DesiredNode, ErrStale)
	}
	// A target that reports its start as a plain report ends the move as
	// its done step would.
	if m := s.ActiveMigration(w.ID); m != nil && m.State == MigrationCommitted && m.Target == c.Node && m.Attempt+1 == c.Attempt {
		m.State, m.UpdatedAt, m.EndedAt, m.ModifyIndex = MigrationDone, c.At, c.At, idx
	}
	w.State = StateRunning
	w.LostAt = 0
	w.Node = c.Node
	w.PID, w.StartTicks = c.PID, c.StartTicks
	w.NSPID, w.InitPID = c.NSPID, c.InitPID
	w.StartedAt = c.At
	w.Message = ""
	w.ModifyIndex = idx
	return *w
}

func applyWorkloadExited(s *State, idx uint64, c *WorkloadExitedCmd) any {
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("workload exited %s: %w", c.ID, ErrNotFound)
	}
	if c.Attempt != w.Attempt || c.Node != w.Node {
		return fmt.Errorf("workload exited %s: attempt %d on %s, want attempt %d on %s: %w",
			c.ID, c.Attempt, c.Node, w.Attempt, w.Node, ErrStale)
	}
	w.ExitCode, w.Signal, w.Message = c.ExitCode, c.Signal, c.Message
	w.EndedAt = c.At
	w.PID, w.StartTicks = 0, 0
	w.NSPID, w.InitPID = 0, 0
	w.ModifyIndex = idx
	failed := c.ExitCode != 0 || c.Signal != ""
	endMigration(s, idx, c.At, w.ID, fmt.Sprintf("workload ended on %s", c.Node))
	switch {
	case w.Desired == DesiredStopped:
		w.State = StateStopped
	case w.Restore != nil && w.Restore.Replaces == c.Attempt:
		// Stopped to be rolled back (applyWorkloadRestore): restored
		// from the checkpoint on its node, whatever its restart policy.
		w.Node = w.Restore.Node
		w.Attempt++
		w.State = StatePending
	case w.DesiredNode != w.Node:
		// Rescheduled: the process it had here was stopped for it to
		// start on its desired node, whatever its restart policy.
		w.Node = w.DesiredNode
		w.Restarts++
		w.Attempt++
		w.State = StatePending
	case restartDue(w, failed):
		w.Restarts++
		w.Attempt++
		w.State = StatePending
	case failed:
		w.State = StateFailed
	default:
		w.State = StateExited
	}
	return *w
}

// applyWorkloadLost records that the workload's current attempt, running
// on its node by the state's word, has no process there and never had one
// (WorkloadLostCmd). Only the node the attempt belongs to may say so, and
// only while the state has no process of it (PID 0): a started process
// ends by an exit report. It ends the workload's migration as an exit
// does; then its restart policy applies as for a failure (a restart
// starts it from its command on the same node), else it is lost.
func applyWorkloadLost(s *State, idx uint64, c *WorkloadLostCmd) any {
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("workload lost %s: %w", c.ID, ErrNotFound)
	}
	if c.Attempt != w.Attempt || c.Node != w.Node || w.State != StateRunning || w.PID != 0 {
		return fmt.Errorf("workload lost %s: attempt %d on %s, the state has attempt %d %s on %s with pid %d: %w",
			c.ID, c.Attempt, c.Node, w.Attempt, w.State, w.Node, w.PID, ErrStale)
	}
	w.ExitCode, w.Signal, w.Message = -1, "", c.Message
	w.EndedAt = c.At
	w.StartTicks = 0
	w.ModifyIndex = idx
	endMigration(s, idx, c.At, w.ID, c.Message)
	switch {
	case w.Desired == DesiredStopped:
		w.State = StateStopped
	case restartDue(w, true):
		w.Restarts++
		w.Attempt++
		w.State = StatePending
	default:
		w.State = StateLost
		w.LostAt = c.At
	}
	return *w
}

func restartDue(w *Workload, failed bool) bool {
	if w.Restart.Max > 0 && w.Restarts >= w.Restart.Max {
		return false
	}
	switch w.Restart.Mode {
	case RestartAlways:
		return true
	case RestartOnFailure:
		return failed
	}
	return false
}

// applyWorkloadReschedule points a running workload at another node, to be
// restarted there from its command (see WorkloadRescheduleCmd). Refused: a
// workload that is not running on a ready node or is being stopped or
// moved, a restart policy that would not restart it, a target that could
// not take a migration (CheckMigration's target rules).
func applyWorkloadReschedule(s *State, idx uint64, c *WorkloadRescheduleCmd) any {
	op := "workload reschedule " + c.ID
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("%s: %w", op, ErrNotFound)
	}
	if err := checkString("reason", c.Reason, MaxMessageLen); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if !restartable(w) {
		return refused(op, "restart policy %s (%d of %d restarts) does not restart it", w.Restart.Mode, w.Restarts, w.Restart.Max)
	}
	if w.DesiredNode != w.Node {
		return refused(op, "already rescheduled to %s", w.DesiredNode)
	}
	if err := CheckMigration(s, w, c.Node); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	w.DesiredNode = c.Node
	w.Message = c.Reason
	w.ModifyIndex = idx
	return *w
}

func applyWorkloadStop(s *State, idx uint64, c *WorkloadStopCmd) any {
	w, ok := s.Workloads[c.ID]
	if !ok {
		return fmt.Errorf("workload stop %s: %w", c.ID, ErrNotFound)
	}
	w.Desired = DesiredStopped
	abortMigration(s, idx, c.At, w.ID, "workload stop requested")
	// Nothing to signal when it never started or its node is gone.
	if w.State == StatePending || w.State == StateLost {
		w.State = StateStopped
		w.EndedAt = c.At
	}
	w.ModifyIndex = idx
	return *w
}
