package scheduler

import (
	"fmt"
	"sort"
	"strconv"
)

// The migration state machine. The raft log alone decides where a workload
// runs; a migration moves it in these steps, each one raft entry:
//
//	planned       the leader (an operator's request or the drain planner)
//	transferring  the source: it froze the process and streams it
//	committed     the leader, on the target's word that the process is built:
//	              the workload's node becomes the target and its attempt +1
//	done          the target: it started the process (PID, start time)
//	aborted       the source, the target or the leader, before the commit
//
// Only forward steps apply, and each names the migration's attempt and is
// written by the node the step belongs to, so a step from an earlier
// attempt, or from a node cut off and come back, is refused (stale).
// After the commit the workload's node is the target: the source's reports
// for it are refused, and it never resumes its copy. Whatever ends the
// workload or its node before the commit aborts the migration in the same
// entry (stop, exit, node down); the source then resumes the original.

func init() {
	register(CmdMigrationPlan, applyMigrationPlan)
	register(CmdMigrationStep, applyMigrationStep)
}

// MaxMigrationHistory bounds the migrations kept per workload, the active
// one included (the oldest ended ones go when a new one is planned); all go
// with the workload's GC.
const MaxMigrationHistory = 8

// ActiveMigration returns the workload's active migration, or nil.
func (s *State) ActiveMigration(workloadID string) *Migration {
	for _, m := range s.Migrations {
		if m.WorkloadID == workloadID && m.State.Active() {
			return m
		}
	}
	return nil
}

// CheckMigration says why workload w cannot be moved to target now, or
// returns nil. The FSM applies it to every plan; the API calls it first to
// answer at once.
func CheckMigration(s *State, w *Workload, target string) error {
	op := fmt.Sprintf("migrate %s", w.ID)
	if w.State != StateRunning {
		return refused(op, "workload is %s, not running", w.State)
	}
	if w.Desired != DesiredRunning {
		return refused(op, "workload is being stopped")
	}
	if w.DesiredNode != w.Node {
		return refused(op, "workload is being restarted on %s", w.DesiredNode)
	}
	if m := s.ActiveMigration(w.ID); m != nil {
		return refused(op, "workload already has migration %s (%s, %s → %s)", m.ID, m.State, m.Source, m.Target)
	}
	if src, ok := s.Nodes[w.Node]; !ok || src.Status != NodeReady {
		st := "unknown"
		if ok {
			st = string(src.Status)
		}
		return refused(op, "its node %s is %s", w.Node, st)
	}
	if target == "" {
		return fmt.Errorf("%s: %w", op, invalid("target", "empty"))
	}
	if err := checkString("target", target, MaxNameLen); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if target == w.Node {
		return refused(op, "target %s is the node it runs on", target)
	}
	t, ok := s.Nodes[target]
	if !ok {
		return fmt.Errorf("%s: node %s: %w", op, target, ErrNotFound)
	}
	if why := unfit(t, PlacementRequest{Constraints: w.Constraints, Resources: w.Resources, VIP: w.VIP != ""}); why != "" {
		return refused(op, "target %s: %s", target, why)
	}
	return nil
}

func applyMigrationPlan(s *State, idx uint64, c *MigrationPlanCmd) any {
	if err := CheckWorkloadID(c.WorkloadID); err != nil {
		return fmt.Errorf("migration plan: %w", err)
	}
	if err := checkString("reason", c.Reason, MaxMessageLen); err != nil {
		return fmt.Errorf("migration plan: %w", err)
	}
	w, ok := s.Workloads[c.WorkloadID]
	if !ok {
		return fmt.Errorf("migrate %s: %w", c.WorkloadID, ErrNotFound)
	}
	if err := CheckMigration(s, w, c.Target); err != nil {
		return err
	}
	m := &Migration{ID: "m" + strconv.FormatUint(idx, 10), WorkloadID: w.ID, Source: w.Node, Target: c.Target,
		State: MigrationPlanned, Attempt: w.Attempt, Reason: c.Reason, Origin: c.Origin, PlannedAt: c.At, UpdatedAt: c.At,
		PlanIndex: idx, ModifyIndex: idx}
	s.Migrations[m.ID] = m
	pruneMigrations(s, w.ID)
	return *m
}

// forward lists the steps each state may take.
var forward = map[MigrationState][]MigrationState{
	MigrationPlanned:      {MigrationTransferring, MigrationAborted},
	MigrationTransferring: {MigrationCommitted, MigrationAborted},
	MigrationCommitted:    {MigrationDone},
}

// writers says which nodes may write a step: the source, the target, or
// the leader ("").
func writers(m *Migration, to MigrationState) []string {
	switch to {
	case MigrationTransferring:
		return []string{m.Source}
	case MigrationCommitted, MigrationDone:
		return []string{m.Target}
	case MigrationAborted:
		return []string{m.Source, m.Target, ""}
	}
	return nil
}

func applyMigrationStep(s *State, idx uint64, c *MigrationStepCmd) any {
	for _, pid := range []int{c.PID, c.InitPID} {
		if pid < 0 || pid > MaxPID {
			return fmt.Errorf("migration step %.64q: %w", c.ID, invalid(fmt.Sprintf("pid %d", pid), "out of range 0..%d", MaxPID))
		}
	}
	if err := checkString("node", c.Node, MaxNameLen); err != nil {
		return fmt.Errorf("migration step %.64q: %w", c.ID, err)
	}
	m, ok := s.Migrations[c.ID]
	if !ok {
		return fmt.Errorf("migration %.64q: %w", c.ID, ErrNotFound)
	}
	op := fmt.Sprintf("migration %s (workload %s) %s → %s", m.ID, m.WorkloadID, m.State, c.To)
	switch c.To {
	case MigrationTransferring, MigrationCommitted, MigrationAborted:
	case MigrationDone:
		if c.PID == 0 {
			return fmt.Errorf("%s: %w", op, invalid("pid", "done needs the target's process"))
		}
	default:
		return fmt.Errorf("%s: %w", op, invalid("to", "%.32q: want transferring, committed, done or aborted", c.To))
	}
	if c.Attempt != m.Attempt {
		return fmt.Errorf("%s: attempt %d, the migration's is %d: %w", op, c.Attempt, m.Attempt, ErrStale)
	}
	allowed := false
	for _, to := range forward[m.State] {
		allowed = allowed || to == c.To
	}
	if !allowed {
		return fmt.Errorf("%s: not a forward step: %w", op, ErrStale)
	}
	named := false
	for _, n := range writers(m, c.To) {
		named = named || n == c.Node
	}
	if !named {
		who := c.Node
		if who == "" {
			who = "the leader"
		}
		return fmt.Errorf("%s: written by %s, not by the node the step belongs to (source %s, target %s): %w",
			op, who, m.Source, m.Target, ErrStale)
	}
	w, ok := s.Workloads[m.WorkloadID]
	if !ok {
		return fmt.Errorf("%s: workload: %w", op, ErrNotFound)
	}
	// What the migration was planned on must still hold: the FSM aborts it in
	// the entry that changes any of this, so a mismatch is a stale step.
	wantNode, wantAttempt := m.Source, m.Attempt
	if m.State == MigrationCommitted {
		wantNode, wantAttempt = m.Target, m.Attempt+1
	}
	if w.State != StateRunning || w.Node != wantNode || w.Attempt != wantAttempt {
		return fmt.Errorf("%s: workload is %s on %s at attempt %d, want running on %s at attempt %d: %w",
			op, w.State, w.Node, w.Attempt, wantNode, wantAttempt, ErrStale)
	}
	m.State, m.UpdatedAt, m.ModifyIndex = c.To, c.At, idx
	switch c.To {
	case MigrationTransferring:
		m.TransferAt = c.At
	case MigrationCommitted:
		m.Bytes = max(c.Bytes, 0)
		m.Rounds, m.PrecopyBytes, m.StoppedAt = max(c.Rounds, 0), max(c.PrecopyBytes, 0), max(c.StoppedAt, 0)
		// The move itself. The process exists on no node until the target
		// starts it (done): PID 0, which no agent adopts.
		w.Node, w.DesiredNode = m.Target, m.Target
		w.Attempt++
		// NSPID stays: the namespace keeps its numbers.
		w.PID, w.StartTicks, w.InitPID = 0, 0, 0
		w.ModifyIndex = idx
	case MigrationDone:
		w.PID, w.StartTicks, w.InitPID = c.PID, c.StartTicks, c.InitPID
		w.ModifyIndex = idx
		m.EndedAt = c.At
	case MigrationAborted:
		m.Error = cut(c.Error)
		m.EndedAt = c.At
	}
	return *m
}

// abortMigration aborts the workload's migration if it has not committed:
// the workload stays where it is.
func abortMigration(s *State, idx uint64, at int64, workloadID, why string) {
	if m := s.ActiveMigration(workloadID); m != nil && m.State != MigrationCommitted {
		m.State, m.Error, m.UpdatedAt, m.EndedAt, m.ModifyIndex = MigrationAborted, cut(why), at, at, idx
	}
}

// endMigration ends the workload's migration when the workload itself
// ends: aborted before the commit, done (with why) after it.
func endMigration(s *State, idx uint64, at int64, workloadID, why string) {
	m := s.ActiveMigration(workloadID)
	if m == nil {
		return
	}
	if m.State != MigrationCommitted {
		abortMigration(s, idx, at, workloadID, why)
		return
	}
	m.State, m.Error, m.UpdatedAt, m.EndedAt, m.ModifyIndex = MigrationDone, cut(why), at, at, idx
}

// nodeDownMigrations ends the migrations a dead node takes part in: those
// not committed abort (the source resumes, or, if the source is the dead
// one, its workload is lost like any other there); a committed one whose
// target died is done, its workload lost with the node.
func nodeDownMigrations(s *State, idx uint64, at int64, name string) {
	for _, m := range s.Migrations {
		switch {
		case !m.State.Active():
		case m.State != MigrationCommitted && (m.Source == name || m.Target == name):
			m.State, m.Error, m.UpdatedAt, m.EndedAt, m.ModifyIndex = MigrationAborted, "node "+name+" down", at, at, idx
		case m.State == MigrationCommitted && m.Target == name:
			m.State, m.Error, m.UpdatedAt, m.EndedAt, m.ModifyIndex = MigrationDone,
				"target "+name+" down before it started the workload: workload lost", at, at, idx
		}
	}
}

// pruneMigrations keeps the MaxMigrationHistory−1 newest ended migrations
// of a workload, beside the one just planned.
func pruneMigrations(s *State, workloadID string) {
	var ended []*Migration
	for _, m := range s.Migrations {
		if m.WorkloadID == workloadID && !m.State.Active() {
			ended = append(ended, m)
		}
	}
	if len(ended) < MaxMigrationHistory {
		return
	}
	sort.Slice(ended, func(i, j int) bool { return ended[i].PlanIndex < ended[j].PlanIndex })
	for _, m := range ended[:len(ended)-(MaxMigrationHistory-1)] {
		delete(s.Migrations, m.ID)
	}
}

// MigratedFrom reports whether a migration of the workload left node
// at attempt (any state): its process there is the migration's business.
func (s *State) MigratedFrom(workloadID, node string, attempt int) bool {
	for _, m := range s.Migrations {
		if m.WorkloadID == workloadID && m.Source == node && m.Attempt == attempt {
			return true
		}
	}
	return false
}
