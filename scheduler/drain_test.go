package scheduler

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestNodeDrainFSM: a drain is set and cancelled by one command each;
// setting it makes the node ineligible in the same entry; the last
// eligible node cannot be drained; a drain is done only when the node is
// empty, and the node then stays ineligible.
func TestNodeDrainFSM(t *testing.T) {
	spec := func(d DrainSpec) *DrainSpec { return &d }
	tests := []struct {
		name      string
		setup     func(a *applier)
		ct        CommandType
		cmd       any
		want      error
		eligible  bool // node a's eligibility afterwards
		draining  bool
		completed bool
	}{
		{"start", nil, CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{Deadline: 100}), At: 10}, nil, false, true, false},
		{"unknown node", nil, CmdNodeDrain, &NodeDrainCmd{Name: "q", Drain: spec(DrainSpec{NoDeadline: true}), At: 10}, ErrNotFound, true, false, false},
		{"last eligible node", func(a *applier) {
			a.ok(CmdNodeEligibility, &NodeEligibilityCmd{Name: "c", Eligible: false})
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "b", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 10}, ErrRefused, true, false, false},
		{"only a down node left", func(a *applier) {
			a.ok(CmdNodeEligibility, &NodeEligibilityCmd{Name: "c", Eligible: false})
			a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "b", Status: NodeDown, At: 5})
		}, CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 10}, ErrRefused, true, false, false},
		{"no deadline given", nil, CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{}), At: 10}, ErrInvalid, true, false, false},
		{"max parallel too high", nil, CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true, MaxParallel: MaxDrainParallel + 1}), At: 10},
			ErrInvalid, true, false, false},
		{"max parallel negative", nil, CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true, MaxParallel: -1}), At: 10},
			ErrInvalid, true, false, false},
		{"cancel", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeDrain, &NodeDrainCmd{Name: "a", At: 10}, nil, true, false, false},
		{"cancel, keep ineligible", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeDrain, &NodeDrainCmd{Name: "a", KeepIneligible: true, At: 10}, nil, false, false, false},
		{"cancel a drain set to keep ineligible", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true, KeepIneligible: true}), At: 5})
		}, CmdNodeDrain, &NodeDrainCmd{Name: "a", At: 10}, nil, false, false, false},
		{"cancel without a drain", nil, CmdNodeDrain, &NodeDrainCmd{Name: "a", At: 10}, ErrRefused, true, false, false},
		{"eligible while draining", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeEligibility, &NodeEligibilityCmd{Name: "a", Eligible: true}, ErrRefused, false, true, false},
		{"done while work remains", func(a *applier) {
			a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w", Command: "x", DesiredNode: "a"}})
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeDrainDone, &NodeDrainDoneCmd{Name: "a", StartedAt: 5, At: 10}, ErrRefused, false, true, false},
		{"done for another drain", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeDrainDone, &NodeDrainDoneCmd{Name: "a", StartedAt: 4, At: 10}, ErrStale, false, true, false},
		{"done", func(a *applier) {
			a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: spec(DrainSpec{NoDeadline: true}), At: 5})
		}, CmdNodeDrainDone, &NodeDrainDoneCmd{Name: "a", StartedAt: 5, At: 10}, nil, false, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := &applier{t: t, f: NewFSM()}
			for _, n := range []string{"a", "b", "c"} {
				a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: n}, At: 1})
			}
			if tc.setup != nil {
				tc.setup(a)
			}
			err, _ := a.apply(tc.ct, tc.cmd).(error)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
			var n Node
			a.f.Read(func(s *State) { n = *s.Nodes["a"] })
			if n.Eligible != tc.eligible || n.Drain.Draining() != tc.draining || (n.Drain != nil && n.Drain.CompletedAt != 0) != tc.completed {
				t.Errorf("node a: eligible %v draining %v drain %+v; want eligible %v draining %v completed %v",
					n.Eligible, n.Drain.Draining(), n.Drain, tc.eligible, tc.draining, tc.completed)
			}
		})
	}
}

// drainState: nodes a (draining from t0, deadline t0+1h, max 2), b, c
// (equal, idle); workloads w1..w4 running on a, oldest first.
func drainState(t0 time.Time) *State {
	s := NewState()
	for _, n := range []string{"a", "b", "c"} {
		s.Nodes[n] = node(n, 0, 4, map[string]string{"zone": n})
	}
	s.Nodes["a"].Eligible = false
	s.Nodes["a"].Drain = &DrainSpec{StartedAt: t0.UnixNano(), Deadline: t0.Add(time.Hour).UnixNano(), MaxParallel: 2}
	for i := 1; i <= 4; i++ {
		id := fmt.Sprintf("w%d", i)
		s.Workloads[id] = &Workload{ID: id, Node: "a", DesiredNode: "a", State: StateRunning, Desired: DesiredRunning,
			Attempt: 1, CreatedAt: int64(i)}
	}
	return s
}

// describe renders a plan's commands as short strings.
func describe(cs []Command) []string {
	var out []string
	for _, c := range cs {
		switch p := c.Payload.(type) {
		case *MigrationPlanCmd:
			m := "move " + p.WorkloadID + " → " + p.Target
			if p.Origin != OriginDrain {
				m += " (origin " + p.Origin + ", want drain)"
			}
			out = append(out, m)
		case *WorkloadStopCmd:
			out = append(out, "stop "+p.ID)
		case *NodeDrainDoneCmd:
			out = append(out, "done "+p.Name)
		case *WorkloadRescheduleCmd:
			out = append(out, "restart "+p.ID+" → "+p.Node)
		default:
			out = append(out, c.Type.String())
		}
	}
	return out
}

// TestPlanDrain is the drain planner on a fake clock.
func TestPlanDrain(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	inflight := func(st MigrationState, ids ...string) func(s *State) {
		return func(s *State) {
			for _, id := range ids {
				s.Migrations["m-"+id] = &Migration{ID: "m-" + id, WorkloadID: id, Source: "a", Target: "c", State: st}
			}
		}
	}
	// aborted records n aborted moves of id since the drain started.
	aborted := func(n int, id string) func(s *State) {
		return func(s *State) {
			for i := range n {
				mid := fmt.Sprintf("m-%s-%d", id, i)
				s.Migrations[mid] = &Migration{ID: mid, WorkloadID: id, Source: "a", Target: "b", State: MigrationAborted,
					PlannedAt: t0.Add(time.Duration(i) * time.Second).UnixNano(), PlanIndex: uint64(i + 1), Error: "engine: fd 3: pipe"}
			}
		}
	}
	tests := []struct {
		name    string
		now     time.Duration // after t0
		change  func(s *State)
		want    []string
		blocked []string
	}{
		{"max parallel, spread over targets", time.Minute, nil, []string{"move w1 → b", "move w2 → c"}, nil},
		{"one in flight", time.Minute, inflight(MigrationTransferring, "w1"), []string{"move w2 → b"}, nil},
		{"two in flight", time.Minute, inflight(MigrationPlanned, "w1", "w2"), nil, nil},
		{"a committed move still counts", time.Minute, inflight(MigrationCommitted, "w1", "w2"), nil, nil},
		{"ended moves do not count", time.Minute, inflight(MigrationAborted, "w1", "w2"), []string{"move w1 → b", "move w2 → c"}, nil},
		{"deadline passed", time.Hour, inflight(MigrationTransferring, "w1"), []string{"stop w1", "stop w2", "stop w3", "stop w4"}, nil},
		{"force", time.Second, func(s *State) { s.Nodes["a"].Drain.Force = true }, []string{"stop w1", "stop w2", "stop w3", "stop w4"}, nil},
		{"stop already asked", 2 * time.Hour, func(s *State) {
			for _, w := range s.Workloads {
				w.Desired = DesiredStopped
			}
			s.Workloads["w4"].Desired = DesiredRunning
		}, []string{"stop w4"}, nil},
		{"no deadline", 1000 * time.Hour, func(s *State) { s.Nodes["a"].Drain.NoDeadline, s.Nodes["a"].Drain.Deadline = true, 0 },
			[]string{"move w1 → b", "move w2 → c"}, nil},
		{"empty: done", time.Minute, func(s *State) {
			for _, w := range s.Workloads {
				w.State = StateExited
			}
		}, []string{"done a"}, nil},
		{"empty but a move not done", time.Minute, func(s *State) {
			for _, w := range s.Workloads {
				w.State = StateExited
			}
			inflight(MigrationCommitted, "w1")(s)
		}, nil, nil},
		{"pending workloads wait", time.Minute, func(s *State) {
			for _, w := range s.Workloads {
				w.State, w.Node = StatePending, ""
			}
		}, nil, nil},
		{"down node: its lost workloads do not hold the drain", time.Minute, func(s *State) {
			s.Nodes["a"].Status = NodeDown
			for _, w := range s.Workloads {
				w.State = StateLost
			}
		}, []string{"done a"}, nil},
		{"down node with a pending workload moves nothing", time.Minute, func(s *State) {
			s.Nodes["a"].Status = NodeDown
			for _, w := range s.Workloads {
				w.State, w.Node = StatePending, ""
			}
		}, nil, nil},
		{"no place for one", time.Minute, func(s *State) { s.Workloads["w1"].Constraints = map[string]string{"zone": "a"} },
			[]string{"move w2 → b", "move w3 → c"}, []string{"w1"}},
		{"target counts moves on their way", time.Minute, func(s *State) {
			s.Nodes["a"].Drain.MaxParallel = 3
			s.Migrations["m-x"] = &Migration{ID: "m-x", WorkloadID: "x", Source: "q", Target: "b", State: MigrationTransferring}
		}, []string{"move w1 → c", "move w2 → b", "move w3 → c"}, nil},
		{"failed moves are retried", time.Minute, aborted(MaxDrainAttempts-1, "w1"), []string{"move w1 → b", "move w2 → c"}, nil},
		{"a workload that failed every attempt stays", time.Minute, aborted(MaxDrainAttempts, "w1"),
			[]string{"move w2 → b", "move w3 → c"}, []string{"w1"}},
		{"a workload whose moves failed restarts elsewhere if its policy allows", time.Minute, func(s *State) {
			aborted(MaxDrainAttempts, "w1")(s)
			s.Workloads["w1"].Restart = RestartPolicy{Mode: RestartOnFailure}
		}, []string{"restart w1 → b", "move w2 → c"}, nil},
		{"its restarts used up, it stays", time.Minute, func(s *State) {
			aborted(MaxDrainAttempts, "w1")(s)
			s.Workloads["w1"].Restart = RestartPolicy{Mode: RestartAlways, Max: 2}
			s.Workloads["w1"].Restarts = 2
		}, []string{"move w2 → b", "move w3 → c"}, []string{"w1"}},
		{"a workload being restarted elsewhere waits", time.Minute, func(s *State) {
			s.Workloads["w1"].DesiredNode = "b"
		}, []string{"move w2 → c", "move w3 → b"}, nil},
		{"aborts before the drain do not count", time.Minute, func(s *State) {
			aborted(MaxDrainAttempts, "w1")(s)
			for _, m := range s.Migrations {
				m.PlannedAt = t0.Add(-time.Second).UnixNano()
			}
		}, []string{"move w1 → b", "move w2 → c"}, nil},
		{"not draining", time.Minute, func(s *State) { s.Nodes["a"].Drain.CompletedAt = 1 }, nil, nil},
		{"ineligible targets", time.Minute, func(s *State) { s.Nodes["b"].Eligible, s.Nodes["c"].Drain = false, &DrainSpec{NoDeadline: true} },
			[]string{"done c"}, []string{"w1", "w2", "w3", "w4"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := drainState(t0)
			if tc.change != nil {
				tc.change(s)
			}
			p := PlanDrain(s, t0.Add(tc.now), nil)
			if got := describe(p.Commands); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("commands: got %q, want %q", got, tc.want)
			}
			var blocked []string
			for _, b := range p.Blocked {
				blocked = append(blocked, b.Workload)
			}
			if !reflect.DeepEqual(blocked, tc.blocked) {
				t.Errorf("blocked: got %v, want %v", p.Blocked, tc.blocked)
			}
			if again := PlanDrain(s, t0.Add(tc.now), nil); !reflect.DeepEqual(again, p) {
				t.Errorf("not deterministic: %v then %v", describe(p.Commands), describe(again.Commands))
			}
		})
	}
}

// TestPlanDrainExclude: a node the leader cannot reach now (given by the
// caller, as for a new workload's placement) gets no migration.
func TestPlanDrainExclude(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	p := PlanDrain(drainState(t0), t0.Add(time.Minute), map[string]string{"b": "not seen by gossip"})
	if got, want := describe(p.Commands), []string{"move w1 → c", "move w2 → c"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
	p = PlanDrain(drainState(t0), t0.Add(time.Minute), map[string]string{"b": "x", "c": "y"})
	if len(p.Commands) != 0 || len(p.Blocked) != 4 {
		t.Errorf("no reachable target: got %q, blocked %v; want nothing, 4 blocked", describe(p.Commands), p.Blocked)
	}
}

// TestPlanDrainThroughFSM runs the planner against the FSM round after
// round, with the agents' steps played by the test, until the drain is
// done: every workload moves exactly once, never more than max-parallel at
// a time, and the node stays ineligible.
func TestPlanDrainThroughFSM(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	for _, n := range []string{"a", "b", "c"} {
		a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: n}, At: 1})
	}
	for i := 1; i <= 5; i++ {
		id := fmt.Sprintf("w%d", i)
		a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: id, Command: "x", UID: -1, GID: -1, DesiredNode: "a", CreatedAt: int64(i)}})
		a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: id, Node: "a", Attempt: 1, PID: 10 + i, At: 2})
	}
	now := time.Unix(100, 0)
	a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "a", Drain: &DrainSpec{Deadline: now.Add(time.Hour).UnixNano(), MaxParallel: 2}, At: now.UnixNano()})
	moved := map[string]int{}
	for round := 0; ; round++ {
		if round > 20 {
			t.Fatal("drain not done after 20 rounds")
		}
		now = now.Add(time.Second)
		var p DrainPlan
		a.f.Read(func(s *State) { p = PlanDrain(s, now, nil) })
		for _, c := range p.Commands {
			a.ok(c.Type, c.Payload)
		}
		var todo []Migration
		done := false
		a.f.Read(func(s *State) {
			done = !s.Nodes["a"].Drain.Draining()
			n := 0
			for _, m := range s.Migrations {
				if m.State.Active() {
					n++
					todo = append(todo, *m)
				}
			}
			if n > 2 {
				t.Errorf("round %d: %d migrations in flight, max-parallel 2", round, n)
			}
		})
		if done {
			break
		}
		// The agents: each migration advances one step per round.
		for _, m := range todo {
			switch m.State {
			case MigrationPlanned:
				a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Source, To: MigrationTransferring})
			case MigrationTransferring:
				a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Target, To: MigrationCommitted})
			case MigrationCommitted:
				a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: m.Target, To: MigrationDone, PID: 99})
				moved[m.WorkloadID]++
			}
		}
	}
	a.f.Read(func(s *State) {
		if n := s.Nodes["a"]; n.Eligible || n.Drain == nil || n.Drain.CompletedAt == 0 {
			t.Errorf("node a after the drain: eligible %v drain %+v; want ineligible, completed", n.Eligible, n.Drain)
		}
		for _, w := range s.Workloads {
			if w.Node == "a" || w.State != StateRunning || moved[w.ID] != 1 {
				t.Errorf("%s: %s on %s, moved %d times; want running elsewhere, moved once", w.ID, w.State, w.Node, moved[w.ID])
			}
		}
	})
}

// TestWorkloadReschedule: the FSM side of a restart elsewhere. Refused
// while the restart policy would not restart the workload, for a target a
// migration could not go to, twice; accepted, the workload stays running
// where it is until its process's exit is reported, which makes it pending
// on the new node (attempt+1), after which the old node's reports are
// stale; a migration meanwhile is refused.
func TestWorkloadReschedule(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	for _, n := range []string{"a", "b"} {
		a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: n}, At: 1})
	}
	for i, mode := range []string{RestartNever, RestartOnFailure} {
		id := fmt.Sprintf("w%d", i)
		a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: id, Command: "/bin/sleep", UID: -1, GID: -1, DesiredNode: "a",
			Restart: RestartPolicy{Mode: mode}, CreatedAt: 2}})
		a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: id, Node: "a", Attempt: 1, PID: 100 + i, At: 3})
	}
	err, _ := a.apply(CmdWorkloadReschedule, &WorkloadRescheduleCmd{ID: "w0", Node: "b", Reason: "drain", At: 4}).(error)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "restart policy never") {
		t.Fatalf("restart policy never: got %v, want refused naming the policy", err)
	}
	resched := func(node string) error {
		err, _ := a.apply(CmdWorkloadReschedule, &WorkloadRescheduleCmd{ID: "w1", Node: node, Reason: "drain", At: 4}).(error)
		return err
	}
	for _, tc := range []struct {
		node string
		want error
	}{{"a", ErrRefused}, {"nowhere", ErrNotFound}} {
		if err := resched(tc.node); !errors.Is(err, tc.want) {
			t.Errorf("reschedule to %s: got %v, want %v", tc.node, err, tc.want)
		}
	}
	if err := resched("b"); err != nil {
		t.Fatal(err)
	}
	if err := resched("b"); !errors.Is(err, ErrRefused) {
		t.Errorf("a second reschedule: got %v, want refused", err)
	}
	if err, _ := a.apply(CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: "w1", Target: "b", At: 5}).(error); !errors.Is(err, ErrRefused) {
		t.Errorf("a migration of a workload being restarted elsewhere: got %v, want refused", err)
	}
	var w Workload
	a.f.Read(func(s *State) { w = *s.Workloads["w1"] })
	if w.State != StateRunning || w.Node != "a" || w.DesiredNode != "b" || w.PID != 101 {
		t.Fatalf("rescheduled, before the exit: %s on %s desired %s pid %d; want running on a, desired b, pid 101",
			w.State, w.Node, w.DesiredNode, w.PID)
	}
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, Signal: "terminated", At: 6})
	a.f.Read(func(s *State) { w = *s.Workloads["w1"] })
	if w.State != StatePending || w.Node != "b" || w.DesiredNode != "b" || w.Attempt != 2 || w.Restarts != 1 {
		t.Fatalf("after the exit: %s on %s desired %s attempt %d restarts %d; want pending on b, attempt 2, 1 restart",
			w.State, w.Node, w.DesiredNode, w.Attempt, w.Restarts)
	}
	if err, _ := a.apply(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 101, At: 7}).(error); !errors.Is(err, ErrStale) {
		t.Errorf("the old node's report: got %v, want stale", err)
	}
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "b", Attempt: 2, PID: 200, At: 8})
}
