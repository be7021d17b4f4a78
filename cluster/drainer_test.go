package cluster_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/cluster"
	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/scheduler"
)

// fsmApplier is the Applier over an FSM alone, as raft would drive it.
type fsmApplier struct {
	f      *scheduler.FSM
	idx    uint64
	fail   error                         // raft failing: every Apply returns it
	before func(t scheduler.CommandType) // runs before each Apply: another writer
}

func (a *fsmApplier) Apply(t scheduler.CommandType, cmd any) (any, error) {
	if a.before != nil {
		a.before(t)
	}
	if a.fail != nil {
		return nil, a.fail
	}
	b, err := scheduler.Encode(t, cmd)
	if err != nil {
		return nil, err
	}
	a.idx++
	res := a.f.Apply(&raft.Log{Index: a.idx, Type: raft.LogCommand, Data: b})
	if err, ok := res.(error); ok {
		return nil, err
	}
	return res, nil
}

func (a *fsmApplier) Read(fn func(*scheduler.State)) { a.f.Read(fn) }

func (a *fsmApplier) must(tb testing.TB, t scheduler.CommandType, cmd any) any {
	tb.Helper()
	res, err := a.Apply(t, cmd)
	if err != nil {
		tb.Fatalf("apply %s: %v", t, err)
	}
	return res
}

// drainFixture: nodes n1..n3, workloads w1..w3 running on n1, and a drain
// of n1 (max-parallel 2, deadline in an hour) started at t0.
func drainFixture(tb testing.TB, t0 time.Time) *fsmApplier {
	a := &fsmApplier{f: scheduler.NewFSM()}
	for _, n := range []string{"n1", "n2", "n3"} {
		a.must(tb, scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: n}, At: 1})
	}
	for i := 1; i <= 3; i++ {
		id := fmt.Sprintf("w%d", i)
		a.must(tb, scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: id, Command: "x",
			UID: -1, GID: -1, DesiredNode: "n1", CreatedAt: int64(i)}})
		a.must(tb, scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: id, Node: "n1", Attempt: 1, PID: 100 + i, At: 2})
	}
	a.must(tb, scheduler.CmdNodeDrain, &scheduler.NodeDrainCmd{Name: "n1",
		Drain: &scheduler.DrainSpec{Deadline: t0.Add(time.Hour).UnixNano(), MaxParallel: 2}, At: t0.UnixNano()})
	return a
}

// agentsStep plays the agents: every active migration takes one step.
func agentsStep(tb testing.TB, a *fsmApplier) {
	tb.Helper()
	var ms []scheduler.Migration
	a.Read(func(s *scheduler.State) {
		for _, m := range s.Migrations {
			if m.State.Active() {
				ms = append(ms, *m)
			}
		}
	})
	for _, m := range ms {
		step := &scheduler.MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Target}
		switch m.State {
		case scheduler.MigrationPlanned:
			step.To, step.Node = scheduler.MigrationTransferring, m.Source
		case scheduler.MigrationTransferring:
			step.To = scheduler.MigrationCommitted
		case scheduler.MigrationCommitted:
			step.To, step.PID = scheduler.MigrationDone, 500
		}
		a.must(tb, scheduler.CmdMigrationStep, step)
	}
}

// nullSink is a raft.SnapshotSink into a buffer.
type nullSink struct{ bytes.Buffer }

func (*nullSink) ID() string    { return "test" }
func (*nullSink) Cancel() error { return nil }
func (*nullSink) Close() error  { return nil }

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestDrainerLeaderChange: the leader's drainer moves at most max-parallel
// workloads at a time; the leader dies mid-drain, and a new leader, whose
// state is the replicated one (here: a fresh FSM restored from a snapshot)
// and whose Drainer has never seen the drain, carries it to the end.
func TestDrainerLeaderChange(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	a := drainFixture(t, t0)
	d := cluster.NewDrainer(a, nil, quiet())
	r, err := d.Round(t0.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Applied) != 2 || r.Applied[0].Type != scheduler.CmdMigrationPlan || r.Applied[1].Type != scheduler.CmdMigrationPlan {
		t.Fatalf("first round: applied %v, want two migration plans (max-parallel 2)", r.Applied)
	}
	agentsStep(t, a) // both transferring

	// The leader dies. The new one has the replicated state.
	snap, err := a.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink nullSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	b := &fsmApplier{f: scheduler.NewFSM(), idx: a.idx}
	if err := b.f.Restore(io.NopCloser(&sink)); err != nil {
		t.Fatal(err)
	}
	d2 := cluster.NewDrainer(b, nil, quiet())
	now := t0.Add(time.Second)
	for round := 0; ; round++ {
		if round > 10 {
			t.Fatal("drain not done after 10 rounds of the new leader")
		}
		now = now.Add(time.Second)
		if _, err := d2.Round(now); err != nil {
			t.Fatal(err)
		}
		done, inflight := false, 0
		b.Read(func(s *scheduler.State) {
			done = !s.Nodes["n1"].Drain.Draining()
			for _, m := range s.Migrations {
				if m.State.Active() {
					inflight++
				}
			}
		})
		if inflight > 2 {
			t.Fatalf("round %d: %d migrations in flight, max-parallel 2", round, inflight)
		}
		if done {
			break
		}
		agentsStep(t, b)
	}
	b.Read(func(s *scheduler.State) {
		if n := s.Nodes["n1"]; n.Eligible || n.Drain.CompletedAt == 0 {
			t.Errorf("n1 after the drain: eligible %v, drain %+v; want ineligible, completed", n.Eligible, n.Drain)
		}
		for _, w := range s.Workloads {
			if w.State != scheduler.StateRunning || w.Node == "n1" || w.Attempt != 2 {
				t.Errorf("%s: %s on %s attempt %d; want running elsewhere, moved once (attempt 2)", w.ID, w.State, w.Node, w.Attempt)
			}
		}
		if len(s.Migrations) != 3 {
			t.Errorf("migrations: got %d, want 3 (one per workload)", len(s.Migrations))
		}
	})
	if r, _ := d2.Round(now.Add(time.Second)); len(r.Applied)+len(r.Refused) != 0 {
		t.Errorf("round after the drain: applied %v refused %v, want nothing", r.Applied, r.Refused)
	}
}

// TestDrainerRound: a command the state refuses because it changed between
// the plan and the apply is skipped (decided again next round) and the rest
// still apply; nodes the leader cannot reach get no migration; a raft
// failure ends the round with an error naming it.
func TestDrainerRound(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	a := drainFixture(t, t0)
	once := false
	a.before = func(scheduler.CommandType) {
		if !once {
			once = true // an operator stops w1 right after the plan
			a.must(t, scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w1", At: 5})
		}
	}
	r, err := cluster.NewDrainer(a, nil, quiet()).Round(t0.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Refused) != 1 || !errors.Is(r.Refused[0], scheduler.ErrRefused) || len(r.Applied) != 1 {
		t.Fatalf("got applied %v refused %v, want w1's plan refused and w2's applied", r.Applied, r.Refused)
	}
	if p := r.Applied[0].Payload.(*scheduler.MigrationPlanCmd); p.WorkloadID != "w2" {
		t.Errorf("applied a plan for %s, want w2", p.WorkloadID)
	}

	// Nodes the leader cannot reach get nothing.
	e := drainFixture(t, t0)
	r, err = cluster.NewDrainer(e, func(*scheduler.State) map[string]string { return map[string]string{"n2": "not seen by gossip"} }, quiet()).
		Round(t0.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range r.Applied {
		if p := c.Payload.(*scheduler.MigrationPlanCmd); p.Target != "n3" {
			t.Errorf("plan for %s to %s, which the leader cannot reach", p.WorkloadID, p.Target)
		}
	}
	if len(r.Applied) != 2 {
		t.Errorf("with n2 unreachable: applied %d plans, want 2 (to n3)", len(r.Applied))
	}

	b := drainFixture(t, t0)
	b.fail = errors.New("no quorum")
	r, err = cluster.NewDrainer(b, nil, quiet()).Round(t0.Add(time.Second))
	if !errors.Is(err, b.fail) || len(r.Applied) != 0 {
		t.Errorf("raft failing: got %v (applied %v), want the failure", err, r.Applied)
	}
}

// TestServerApplier: the leader's Applier commits through raft and reads
// the replicated state; the FSM's refusals come back as scheduler errors.
func TestServerApplier(t *testing.T) {
	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	s, err := cluster.Start(cluster.Config{Name: "applier", BindAddr: "127.0.0.1:0", DataDir: dir, Key: key, BootstrapExpect: 1, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown()
	a := s.Applier()
	deadline := time.Now().Add(15 * time.Second)
	for {
		ready := false
		a.Read(func(st *scheduler.State) { _, ready = st.Nodes["applier"] })
		if ready && s.IsLeader() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("single server not leading with its node in the state after 15 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := a.Apply(scheduler.CmdNodeEligibility, &scheduler.NodeEligibilityCmd{Name: "applier", Eligible: false}); err != nil {
		t.Fatal(err)
	}
	a.Read(func(st *scheduler.State) {
		if st.Nodes["applier"].Eligible {
			t.Error("eligibility applied through the Applier not in the state")
		}
	})
	if _, err := a.Apply(scheduler.CmdNodeEligibility, &scheduler.NodeEligibilityCmd{Name: "nope"}); !errors.Is(err, scheduler.ErrNotFound) {
		t.Errorf("unknown node: got %v, want ErrNotFound", err)
	}
}
