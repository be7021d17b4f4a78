package scheduler

import (
	"errors"
	"fmt"
	"testing"
)

// migrationFixture: nodes a, b, c ready and eligible, d ineligible, f down;
// workload "run" running on a (attempt 1, pid 100), "picky" running on a
// and needing zone=a, "pend" pending on a, "ended" exited.
func migrationFixture(t *testing.T) *applier {
	t.Helper()
	a := &applier{t: t, f: NewFSM()}
	for _, n := range []string{"a", "b", "c", "d", "f"} {
		a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: n, Labels: map[string]string{"zone": n}}, At: 1})
	}
	a.ok(CmdNodeEligibility, &NodeEligibilityCmd{Name: "d", Eligible: false})
	a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "f", Status: NodeDown, At: 1})
	for i, w := range []Workload{
		{ID: "run", Command: "x", DesiredNode: "a"},
		{ID: "picky", Command: "x", DesiredNode: "a", Constraints: map[string]string{"zone": "a"}},
		{ID: "pend", Command: "x", DesiredNode: "a"},
		{ID: "ended", Command: "x", DesiredNode: "a"},
	} {
		w.UID, w.GID, w.CreatedAt = -1, -1, int64(i)
		a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: w})
		if w.ID != "pend" {
			a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: w.ID, Node: "a", Attempt: 1, PID: 100 + i, StartTicks: 7, At: 2})
		}
	}
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "ended", Node: "a", Attempt: 1, At: 3})
	return a
}

func (a *applier) workload(id string) Workload {
	var w Workload
	a.f.Read(func(s *State) { w = *s.Workloads[id] })
	return w
}

func (a *applier) migration(id string) Migration {
	var m Migration
	a.f.Read(func(s *State) { m = *s.Migrations[id] })
	return m
}

func (a *applier) plan(id, target string) Migration {
	a.t.Helper()
	return a.ok(CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: id, Target: target, Reason: "test", At: 10}).(Migration)
}

// TestMigrationPlanRefusals: only a running workload on a ready node can be
// planned, to another ready, eligible node that is not draining and meets
// its constraints, and only when it has no active migration.
func TestMigrationPlanRefusals(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(a *applier)
		workload string
		target   string
		want     error
	}{
		{"planned", nil, "run", "b", nil},
		{"unknown workload", nil, "nope", "b", ErrNotFound},
		{"pending workload", nil, "pend", "b", ErrRefused},
		{"ended workload", nil, "ended", "b", ErrRefused},
		{"stop requested", func(a *applier) { a.ok(CmdWorkloadStop, &WorkloadStopCmd{ID: "run", At: 5}) }, "run", "b", ErrRefused},
		{"same node", nil, "run", "a", ErrRefused},
		{"no target", nil, "run", "", ErrInvalid},
		{"unknown target", nil, "run", "q", ErrNotFound},
		{"ineligible target", nil, "run", "d", ErrRefused},
		{"down target", nil, "run", "f", ErrRefused},
		{"draining target", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "c", Drain: &DrainSpec{NoDeadline: true}, At: 5})
		}, "run", "c", ErrRefused},
		{"constraint unmet", nil, "picky", "b", ErrRefused},
		{"already migrating", func(a *applier) { a.plan("run", "b") }, "run", "c", ErrRefused},
		{"source not ready", func(a *applier) {
			a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "a", Status: NodeDraining, At: 5})
		}, "run", "b", ErrRefused},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := migrationFixture(t)
			if tc.setup != nil {
				tc.setup(a)
			}
			n := len(a.f.state.Migrations)
			res := a.apply(CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: tc.workload, Target: tc.target, At: 10})
			err, _ := res.(error)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			if err != nil {
				if len(a.f.state.Migrations) != n {
					t.Errorf("refused plan recorded a migration")
				}
				return
			}
			m := res.(Migration)
			if m.State != MigrationPlanned || m.Source != "a" || m.Target != "b" || m.Attempt != 1 || m.ID != fmt.Sprintf("m%d", a.idx) {
				t.Errorf("got %+v, want planned a → b attempt 1 id m%d", m, a.idx)
			}
			if w := a.workload("run"); w.Node != "a" || w.State != StateRunning || w.PID != 100 {
				t.Errorf("plan changed the workload: %+v", w)
			}
		})
	}
}

type step struct {
	node    string
	to      MigrationState
	attempt int // added to the migration's attempt
	pid     int
	want    error
}

// TestMigrationSteps: transitions only forward, each written by the node it
// belongs to and naming the migration's attempt; the commit moves the
// workload (node, attempt) in one entry; an abort leaves it on the source.
func TestMigrationSteps(t *testing.T) {
	tr := step{node: "a", to: MigrationTransferring}
	co := step{node: "b", to: MigrationCommitted}
	tests := []struct {
		name      string
		steps     []step
		wantState MigrationState
		wantNode  string
		wantAtt   int
		wantPID   int
	}{
		{"to the end", []step{tr, co, {node: "b", to: MigrationDone, pid: 500}}, MigrationDone, "b", 2, 500},
		{"committed: on the target, not started", []step{tr, co}, MigrationCommitted, "b", 2, 0},
		{"source aborts before transfer", []step{{node: "a", to: MigrationAborted}}, MigrationAborted, "a", 1, 100},
		{"target aborts mid-transfer", []step{tr, {node: "b", to: MigrationAborted}}, MigrationAborted, "a", 1, 100},
		{"leader aborts", []step{tr, {node: "", to: MigrationAborted}}, MigrationAborted, "a", 1, 100},
		{"abort after commit", []step{tr, co, {node: "a", to: MigrationAborted, want: ErrStale}, {node: "", to: MigrationAborted, want: ErrStale}},
			MigrationCommitted, "b", 2, 0},
		{"source resumes after commit", []step{tr, co, {node: "a", to: MigrationTransferring, want: ErrStale}}, MigrationCommitted, "b", 2, 0},
		{"repeated step", []step{tr, {node: "a", to: MigrationTransferring, want: ErrStale}}, MigrationTransferring, "a", 1, 100},
		{"commit before transfer", []step{{node: "b", to: MigrationCommitted, want: ErrStale}}, MigrationPlanned, "a", 1, 100},
		{"done before commit", []step{tr, {node: "b", to: MigrationDone, pid: 5, want: ErrStale}}, MigrationTransferring, "a", 1, 100},
		{"no step after abort", []step{{node: "a", to: MigrationAborted}, {node: "a", to: MigrationTransferring, want: ErrStale}},
			MigrationAborted, "a", 1, 100},
		{"transfer written by the target", []step{{node: "b", to: MigrationTransferring, want: ErrStale}}, MigrationPlanned, "a", 1, 100},
		{"commit written by the source", []step{tr, {node: "a", to: MigrationCommitted, want: ErrStale}}, MigrationTransferring, "a", 1, 100},
		{"commit written by a third node", []step{tr, {node: "c", to: MigrationCommitted, want: ErrStale}}, MigrationTransferring, "a", 1, 100},
		{"abort written by a third node", []step{{node: "c", to: MigrationAborted, want: ErrStale}}, MigrationPlanned, "a", 1, 100},
		{"done written by the source", []step{tr, co, {node: "a", to: MigrationDone, pid: 5, want: ErrStale}}, MigrationCommitted, "b", 2, 0},
		{"old attempt", []step{{node: "a", to: MigrationTransferring, attempt: -1, want: ErrStale}}, MigrationPlanned, "a", 1, 100},
		{"future attempt", []step{tr, {node: "b", to: MigrationCommitted, attempt: 1, want: ErrStale}}, MigrationTransferring, "a", 1, 100},
		{"unknown state", []step{{node: "a", to: "frozen", want: ErrInvalid}}, MigrationPlanned, "a", 1, 100},
		{"done without a pid", []step{tr, co, {node: "b", to: MigrationDone, want: ErrInvalid}}, MigrationCommitted, "b", 2, 0},
		{"pid out of range", []step{tr, co, {node: "b", to: MigrationDone, pid: -1, want: ErrInvalid}}, MigrationCommitted, "b", 2, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := migrationFixture(t)
			m := a.plan("run", "b")
			for i, st := range tc.steps {
				res := a.apply(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt + st.attempt, Node: st.node, To: st.to, PID: st.pid, At: int64(20 + i)})
				err, _ := res.(error)
				if !errors.Is(err, st.want) || (st.want == nil) != (err == nil) {
					t.Fatalf("step %d (%s by %q): got %v, want %v", i, st.to, st.node, err, st.want)
				}
			}
			got, w := a.migration(m.ID), a.workload("run")
			if got.State != tc.wantState {
				t.Errorf("migration: got %s, want %s", got.State, tc.wantState)
			}
			if w.State != StateRunning || w.Node != tc.wantNode || w.DesiredNode != tc.wantNode || w.Attempt != tc.wantAtt || w.PID != tc.wantPID {
				t.Errorf("workload: got %s on %s (desired %s) attempt %d pid %d, want running on %s attempt %d pid %d",
					w.State, w.Node, w.DesiredNode, w.Attempt, w.PID, tc.wantNode, tc.wantAtt, tc.wantPID)
			}
		})
	}
	a := migrationFixture(t)
	if err, _ := a.apply(CmdMigrationStep, &MigrationStepCmd{ID: "m999", Node: "a", To: MigrationAborted}).(error); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown migration: got %v, want ErrNotFound", err)
	}
}

// move runs a whole migration of workload id to target.
func (a *applier) move(id, target string) Migration {
	a.t.Helper()
	m := a.plan(id, target)
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Source, To: MigrationTransferring})
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Target, To: MigrationCommitted})
	return a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Target, To: MigrationDone, PID: 200 + int(a.idx)}).(Migration)
}

// TestMigrationFencing: after a commit the source's reports never apply,
// even when the workload comes back to the source later (A → B → A): the
// attempt each move bumps tells its copies apart.
func TestMigrationFencing(t *testing.T) {
	a := migrationFixture(t)
	a.move("run", "b")
	if err, _ := a.apply(CmdWorkloadExited, &WorkloadExitedCmd{ID: "run", Node: "a", Attempt: 1, Signal: "killed", At: 30}).(error); !errors.Is(err, ErrStale) {
		t.Errorf("source's exit report after the commit: got %v, want ErrStale", err)
	}
	if err, _ := a.apply(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "run", Node: "a", Attempt: 1, PID: 100, At: 30}).(error); !errors.Is(err, ErrStale) {
		t.Errorf("source's start report after the commit: got %v, want ErrStale", err)
	}
	a.move("run", "a")
	if w := a.workload("run"); w.Node != "a" || w.Attempt != 3 {
		t.Fatalf("after a → b → a: got %s attempt %d, want a attempt 3", w.Node, w.Attempt)
	}
	if err, _ := a.apply(CmdWorkloadExited, &WorkloadExitedCmd{ID: "run", Node: "a", Attempt: 1, Signal: "killed", At: 31}).(error); !errors.Is(err, ErrStale) {
		t.Errorf("first copy's late exit report after a → b → a: got %v, want ErrStale", err)
	}
	if w := a.workload("run"); w.State != StateRunning {
		t.Errorf("workload after stale reports: %s, want running", w.State)
	}
	// The copy now on a reports with the new attempt.
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "run", Node: "a", Attempt: 3, At: 32})
	if w := a.workload("run"); w.State != StateExited {
		t.Errorf("exit of the current copy: got %s, want exited", w.State)
	}
}

// TestMigrationEndsWithItsWorkload: whatever ends the workload or takes
// part of the migration down ends the migration in the same entry —
// aborted before the commit (the workload stays on the source), done after
// it (a target lost after the commit makes the workload lost).
func TestMigrationEndsWithItsWorkload(t *testing.T) {
	tests := []struct {
		name      string
		commit    bool
		cmd       CommandType
		payload   any
		wantM     MigrationState
		wantW     WorkloadState
		wantNode  string
		wantError string
	}{
		{"stop before commit", false, CmdWorkloadStop, &WorkloadStopCmd{ID: "run", At: 40}, MigrationAborted, StateRunning, "a", "workload stop requested"},
		{"exit on the source", false, CmdWorkloadExited, &WorkloadExitedCmd{ID: "run", Node: "a", Attempt: 1, ExitCode: 2, At: 40},
			MigrationAborted, StateFailed, "a", "workload ended on a"},
		{"source down", false, CmdNodeStatus, &NodeStatusCmd{Name: "a", Status: NodeDown, At: 40}, MigrationAborted, StateLost, "a", "node a down"},
		{"target down", false, CmdNodeStatus, &NodeStatusCmd{Name: "b", Status: NodeDown, At: 40}, MigrationAborted, StateRunning, "a", "node b down"},
		{"target down after commit", true, CmdNodeStatus, &NodeStatusCmd{Name: "b", Status: NodeDown, At: 40}, MigrationDone, StateLost, "b",
			"target b down before it started the workload: workload lost"},
		{"source down after commit", true, CmdNodeStatus, &NodeStatusCmd{Name: "a", Status: NodeDown, At: 40}, MigrationCommitted, StateRunning, "b", ""},
		{"exit on the target after commit", true, CmdWorkloadExited, &WorkloadExitedCmd{ID: "run", Node: "b", Attempt: 2, At: 40},
			MigrationDone, StateExited, "b", "workload ended on b"},
		{"stop after commit", true, CmdWorkloadStop, &WorkloadStopCmd{ID: "run", At: 40}, MigrationCommitted, StateRunning, "b", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := migrationFixture(t)
			m := a.plan("run", "b")
			a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "a", To: MigrationTransferring})
			if tc.commit {
				a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "b", To: MigrationCommitted})
			}
			a.ok(tc.cmd, tc.payload)
			got, w := a.migration(m.ID), a.workload("run")
			if got.State != tc.wantM || got.Error != tc.wantError {
				t.Errorf("migration: got %s (%q), want %s (%q)", got.State, got.Error, tc.wantM, tc.wantError)
			}
			if w.State != tc.wantW || w.Node != tc.wantNode {
				t.Errorf("workload: got %s on %s, want %s on %s", w.State, w.Node, tc.wantW, tc.wantNode)
			}
			if got.State.Active() != (tc.wantM == MigrationCommitted) {
				t.Errorf("migration active: %v", got.State.Active())
			}
		})
	}
}

// TestMigrationDoneByStartReport: after the commit, the target's ordinary
// started report (its node, the new attempt) ends the migration like its
// done step; the source's is refused.
func TestMigrationDoneByStartReport(t *testing.T) {
	a := migrationFixture(t)
	m := a.plan("run", "b")
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "a", To: MigrationTransferring})
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "b", To: MigrationCommitted})
	if err, _ := a.apply(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "run", Node: "a", Attempt: 1, PID: 100, At: 50}).(error); !errors.Is(err, ErrStale) {
		t.Errorf("source's start report after the commit: got %v, want ErrStale", err)
	}
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "run", Node: "b", Attempt: 2, PID: 600, StartTicks: 9, At: 51})
	if got, w := a.migration(m.ID), a.workload("run"); got.State != MigrationDone || w.PID != 600 || w.Node != "b" {
		t.Errorf("after the target's start report: migration %s, workload pid %d on %s; want done, 600 on b", got.State, w.PID, w.Node)
	}
	a.plan("run", "c") // no longer blocked by the finished move
}

// TestMigrationHistoryBounded: a workload moved again and again keeps its
// MaxMigrationHistory newest ended migrations, so the state stays bounded.
func TestMigrationHistoryBounded(t *testing.T) {
	a := migrationFixture(t)
	var last Migration
	for i := range 3 * MaxMigrationHistory {
		last = a.move("run", []string{"b", "a"}[i%2])
	}
	a.f.Read(func(s *State) {
		n := 0
		for _, m := range s.Migrations {
			if m.WorkloadID == "run" {
				n++
			}
		}
		if n != MaxMigrationHistory {
			t.Errorf("migrations kept: got %d, want %d", n, MaxMigrationHistory)
		}
		if _, ok := s.Migrations[last.ID]; !ok {
			t.Errorf("newest migration %s pruned", last.ID)
		}
	})
}

// TestWorkloadLostAfterCommit: a target that lost the restored process
// with its agent (after the commit, before the start) says so; the
// migration is done, and the restart policy decides: lost without a
// restart due, pending again on the target with one. Any other node, an
// old attempt, or a workload whose process started is refused.
func TestWorkloadLostAfterCommit(t *testing.T) {
	commit := func(a *applier) Migration {
		m := a.plan("run", "b")
		a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "a", To: MigrationTransferring})
		a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "b", To: MigrationCommitted})
		return m
	}
	const why = "lost with the agent before it started"
	t.Run("never", func(t *testing.T) {
		a := migrationFixture(t)
		m := commit(a)
		for _, bad := range []*WorkloadLostCmd{
			{ID: "run", Node: "a", Attempt: 2, Message: why, At: 40},
			{ID: "run", Node: "b", Attempt: 1, Message: why, At: 40},
		} {
			if err, _ := a.apply(CmdWorkloadLost, bad).(error); !errors.Is(err, ErrStale) {
				t.Errorf("lost from %s attempt %d: got %v, want ErrStale", bad.Node, bad.Attempt, err)
			}
		}
		a.ok(CmdWorkloadLost, &WorkloadLostCmd{ID: "run", Node: "b", Attempt: 2, Message: why, At: 40})
		if got := a.migration(m.ID); got.State != MigrationDone || got.Error != why {
			t.Errorf("migration: got %s (%q), want done (%q)", got.State, got.Error, why)
		}
		if w := a.workload("run"); w.State != StateLost || w.Node != "b" || w.Message != why || w.LostAt != 40 {
			t.Errorf("workload: got %s on %s (%q, lost at %d), want lost on b (%q, 40)", w.State, w.Node, w.Message, w.LostAt, why)
		}
	})
	t.Run("always", func(t *testing.T) {
		a := migrationFixture(t)
		a.f.Read(func(s *State) { s.Workloads["run"].Restart.Mode = RestartAlways })
		commit(a)
		a.ok(CmdWorkloadLost, &WorkloadLostCmd{ID: "run", Node: "b", Attempt: 2, Message: why, At: 40})
		if w := a.workload("run"); w.State != StatePending || w.DesiredNode != "b" || w.Attempt != 3 || w.Restarts != 1 {
			t.Errorf("workload: got %s on %s attempt %d restarts %d, want pending on b attempt 3 restarts 1", w.State, w.DesiredNode, w.Attempt, w.Restarts)
		}
	})
	t.Run("started", func(t *testing.T) {
		a := migrationFixture(t)
		if err, _ := a.apply(CmdWorkloadLost, &WorkloadLostCmd{ID: "run", Node: "a", Attempt: 1, Message: why, At: 40}).(error); !errors.Is(err, ErrStale) {
			t.Errorf("lost of a workload with a process: got %v, want ErrStale", err)
		}
	})
}
