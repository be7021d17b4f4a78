package scheduler

import (
	"errors"
	"reflect"
	"testing"
	"time"
)

// checkpointLab is two nodes and a running workload w1 labelled app=db on a.
func checkpointLab(t *testing.T) *applier {
	a := &applier{t: t, f: NewFSM()}
	for _, n := range []string{"a", "b", "c"} {
		a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: n}, At: 1})
	}
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w1", Command: "/bin/sleep", UID: -1, GID: -1,
		Labels: map[string]string{"app": "db"}, DesiredNode: "a", CreatedAt: 1}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 100, At: 10e9})
	return a
}

func TestCheckpointDue(t *testing.T) {
	sec := int64(time.Second)
	cases := []struct {
		name     string
		policies []CheckpointPolicy
		rec      *WorkloadCheckpoints
		now      int64
		due      bool
		wait     time.Duration
	}{
		{name: "no policy, no request", now: 100 * sec},
		{name: "selector does not match", policies: []CheckpointPolicy{{Name: "p", Selector: map[string]string{"app": "web"}, Interval: 5 * sec}}, now: 100 * sec},
		{name: "interval from the start", policies: []CheckpointPolicy{{Name: "p", Selector: map[string]string{"app": "db"}, Interval: 5 * sec}}, now: 12 * sec, wait: 3 * time.Second},
		{name: "due at start+interval", policies: []CheckpointPolicy{{Name: "p", Interval: 5 * sec}}, now: 15 * sec, due: true},
		{name: "interval from the last success", policies: []CheckpointPolicy{{Name: "p", Interval: 5 * sec}},
			rec: &WorkloadCheckpoints{LastAt: 20 * sec}, now: 21 * sec, wait: 4 * time.Second},
		{name: "shortest interval of two", policies: []CheckpointPolicy{{Name: "p", Interval: 50 * sec}, {Name: "q", Selector: map[string]string{"app": "db"}, Interval: 5 * sec}},
			rec: &WorkloadCheckpoints{LastAt: 20 * sec}, now: 25 * sec, due: true},
		{name: "failure backs off 1s", policies: []CheckpointPolicy{{Name: "p", Interval: 60 * sec}},
			rec: &WorkloadCheckpoints{LastAt: 20 * sec, Failures: 1, LastErrorAt: 80 * sec}, now: 80 * sec, wait: time.Second},
		{name: "third failure backs off 4s", policies: []CheckpointPolicy{{Name: "p", Interval: 60 * sec}},
			rec: &WorkloadCheckpoints{LastAt: 20 * sec, Failures: 3, LastErrorAt: 90 * sec}, now: 91 * sec, wait: 3 * time.Second},
		{name: "backoff bounded by the interval", policies: []CheckpointPolicy{{Name: "p", Interval: 5 * sec}},
			rec: &WorkloadCheckpoints{Failures: 10, LastErrorAt: 90 * sec}, now: 95 * sec, due: true},
		{name: "request without policy", rec: &WorkloadCheckpoints{RequestedAt: 30 * sec}, now: 31 * sec, due: true},
		{name: "request already served", rec: &WorkloadCheckpoints{RequestedAt: 30 * sec, LastAt: 31 * sec}, now: 32 * sec},
		{name: "failed request retried after backoff", rec: &WorkloadCheckpoints{RequestedAt: 30 * sec, Failures: 2, LastErrorAt: 31 * sec},
			now: 32 * sec, wait: time.Second},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := checkpointLab(t)
			for _, p := range c.policies {
				a.ok(CmdCheckpointPolicyUpsert, &CheckpointPolicyUpsertCmd{Policy: p})
			}
			a.f.Read(func(s *State) {
				if c.rec != nil {
					s.Checkpoints["w1"] = c.rec
				}
				due, wait := CheckpointDue(s, s.Workloads["w1"], time.Unix(0, c.now))
				if due != c.due || wait != c.wait {
					t.Errorf("got due %v wait %v, want %v %v", due, wait, c.due, c.wait)
				}
			})
		})
	}
}

func TestCheckpointRecords(t *testing.T) {
	a := checkpointLab(t)
	a.ok(CmdCheckpointPolicyUpsert, &CheckpointPolicyUpsertCmd{Policy: CheckpointPolicy{Name: "p", Interval: 5e9, Keep: 2, Replicas: 1}})
	var targets []string
	a.f.Read(func(s *State) { targets = ReplicaTargets(s, "a", 1) })
	if !reflect.DeepEqual(targets, []string{"b"}) {
		t.Fatalf("targets: got %v, want [b]", targets)
	}
	// Only the node running the attempt reports.
	if err, _ := a.apply(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "b", Attempt: 1, At: 20e9}).(error); !errors.Is(err, ErrStale) {
		t.Fatalf("taken from another node: got %v, want ErrStale", err)
	}
	a.ok(CmdCheckpointFailed, &CheckpointFailedCmd{WorkloadID: "w1", Node: "a", Attempt: 1, Error: "no space", At: 15e9})
	for i := 1; i <= 3; i++ {
		cp := a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: int64(i) * 20e9, Size: 10, Targets: targets}).(Checkpoint)
		if cp.Seq != uint64(i) {
			t.Fatalf("seq: got %d, want %d", cp.Seq, i)
		}
	}
	if err, _ := a.apply(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 3, Node: "c"}).(error); !errors.Is(err, ErrRefused) {
		t.Fatalf("copy on a node not chosen: got %v, want ErrRefused", err)
	}
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 3, Node: "b"})
	var plan []Command
	a.f.Read(func(s *State) {
		r := s.Checkpoints["w1"]
		if r.Failures != 0 || r.FailedTotal != 1 || r.LastError != "no space" {
			t.Errorf("failures: got %d/%d %q, want 0/1 \"no space\"", r.Failures, r.FailedTotal, r.LastError)
		}
		if h := r.Find(3).Holders; !reflect.DeepEqual(h, []string{"a", "b"}) {
			t.Errorf("holders: got %v, want [a b]", h)
		}
		plan = PlanCheckpointPrune(s)
		// Replicas go to the node holding fewest copies: c now.
		if got := ReplicaTargets(s, "a", 1); !reflect.DeepEqual(got, []string{"c"}) {
			t.Errorf("targets after a copy on b: got %v, want [c]", got)
		}
	})
	want := []Command{{Type: CmdCheckpointPrune, Payload: &CheckpointPruneCmd{WorkloadID: "w1", Seqs: []uint64{1}}}}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("prune plan: got %+v, want %+v", plan, want)
	}
	a.ok(plan[0].Type, plan[0].Payload)
	a.f.Read(func(s *State) {
		if p := PlanCheckpointPrune(s); len(p) != 0 {
			t.Errorf("prune after prune: got %+v, want none", p)
		}
		if n := len(s.Checkpoints["w1"].List); n != 2 {
			t.Errorf("kept: got %d, want 2", n)
		}
	})
	// A workload collected takes its checkpoints with it.
	a.ok(CmdWorkloadStop, &WorkloadStopCmd{ID: "w1", At: 90e9})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, Signal: "terminated", At: 91e9})
	a.ok(CmdWorkloadGC, &WorkloadGCCmd{IDs: []string{"w1"}, Before: 100e9})
	a.f.Read(func(s *State) {
		if _, ok := s.Checkpoints["w1"]; ok {
			t.Errorf("checkpoints of a collected workload still in the state")
		}
	})
}

func TestValidateCheckpointPolicy(t *testing.T) {
	for _, c := range []struct {
		p  CheckpointPolicy
		ok bool
	}{
		{CheckpointPolicy{Name: "p", Interval: 5e9, Keep: 3, Replicas: 1}, true},
		{CheckpointPolicy{Name: "", Interval: 5e9}, false},
		{CheckpointPolicy{Name: "p", Interval: 1e6}, false},
		{CheckpointPolicy{Name: "p", Interval: 5e9, Keep: -1}, false},
		{CheckpointPolicy{Name: "p", Interval: 5e9, Replicas: 99}, false},
		{CheckpointPolicy{Name: "p", Interval: 5e9, FullEvery: 1}, true},
		{CheckpointPolicy{Name: "p", Interval: 5e9, FullEvery: -1}, false},
		{CheckpointPolicy{Name: "p", Interval: 5e9, FullEvery: 257}, false},
	} {
		err := ValidateCheckpointPolicy(&c.p)
		if (err == nil) != c.ok || err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v: got %v, want ok=%v", c.p, err, c.ok)
		}
	}
}

func TestWorkloadRestore(t *testing.T) {
	a := checkpointLab(t)
	cp := a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 20e9, Targets: []string{"b"}, NSPID: 6}).(Checkpoint)
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: cp.Seq, Node: "b"})
	for _, c := range []struct {
		cmd  WorkloadRestoreCmd
		want error
	}{
		{WorkloadRestoreCmd{ID: "w1", Seq: 9, Node: "a"}, ErrNotFound},
		{WorkloadRestoreCmd{ID: "w1", Seq: 1, Node: "c"}, ErrRefused}, // no copy there
		{WorkloadRestoreCmd{ID: "nope", Seq: 1, Node: "a"}, ErrNotFound},
	} {
		if err, _ := a.apply(CmdWorkloadRestore, &c.cmd).(error); !errors.Is(err, c.want) {
			t.Errorf("%+v: got %v, want %v", c.cmd, err, c.want)
		}
	}
	// Running on a: rolled back on b, the copy's node. The process on a
	// is stopped first; its exit makes the workload pending on b.
	w := a.ok(CmdWorkloadRestore, &WorkloadRestoreCmd{ID: "w1", Seq: 1, Node: "b", At: 30e9}).(Workload)
	if w.State != StateRunning || w.DesiredNode != "b" || w.Restore == nil || w.Restore.Replaces != 1 || w.Restore.Attempt != 2 || w.Restore.NSPID != 6 {
		t.Fatalf("after restore: %s desired on %s, restore %+v", w.State, w.DesiredNode, w.Restore)
	}
	if err, _ := a.apply(CmdWorkloadRestore, &WorkloadRestoreCmd{ID: "w1", Seq: 1, Node: "b"}).(error); !errors.Is(err, ErrRefused) {
		t.Errorf("second restore while the first is under way: got %v, want ErrRefused", err)
	}
	w = a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, Signal: "terminated", At: 31e9}).(Workload)
	if w.State != StatePending || w.Node != "b" || w.Attempt != 2 || w.Restarts != 0 {
		t.Fatalf("after the exit: %s on %s attempt %d restarts %d, want pending on b attempt 2, no restart counted", w.State, w.Node, w.Attempt, w.Restarts)
	}
	// Ended (failed): brought back at once.
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "b", Attempt: 2, PID: 7, At: 32e9})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "b", Attempt: 2, ExitCode: 1, At: 33e9})
	w = a.ok(CmdWorkloadRestore, &WorkloadRestoreCmd{ID: "w1", Seq: 1, Node: "a", At: 34e9}).(Workload)
	if w.State != StatePending || w.Node != "a" || w.Attempt != 3 || w.Restore.Attempt != 3 || w.Restore.Replaces != 0 {
		t.Fatalf("bring back: %s on %s attempt %d restore %+v", w.State, w.Node, w.Attempt, w.Restore)
	}
}

func TestPlanFailover(t *testing.T) {
	a := checkpointLab(t)
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w2", Command: "/bin/sleep", UID: -1, GID: -1, DesiredNode: "a",
		Restart: RestartPolicy{Mode: RestartOnFailure}, CreatedAt: 2}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w2", Node: "a", Attempt: 1, PID: 200, At: 10e9})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w3", Command: "/bin/sleep", UID: -1, GID: -1, DesiredNode: "a", CreatedAt: 3}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w3", Node: "a", Attempt: 1, PID: 300, At: 10e9})
	// w1: checkpoints 1 (copy on c) and 2 (copy on b, which goes down too).
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 20e9, Targets: []string{"c"}, NSPID: 6})
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 1, Node: "c"})
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 25e9, Targets: []string{"b"}, NSPID: 6})
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 2, Node: "b"})
	a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "b", Status: NodeDown, At: 29e9})
	a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "a", Status: NodeDown, At: 30e9})
	var plan []Command
	a.f.Read(func(s *State) {
		if p := PlanFailover(s, time.Unix(0, 30e9), time.Second); len(p) != 0 {
			t.Errorf("before the failover delay: got %+v, want nothing", p)
		}
		if next, ok := NextFailover(s, time.Unix(0, 30e9), time.Second); !ok || !next.Equal(time.Unix(0, 31e9)) {
			t.Errorf("next failover before the delay: got %v %v, want %v", next, ok, time.Unix(0, 31e9))
		}
		if next, ok := NextFailover(s, time.Unix(0, 31e9), time.Second); ok {
			t.Errorf("next failover once due: got %v, want none (PlanFailover's now)", next)
		}
		plan = PlanFailover(s, time.Unix(0, 31e9), time.Second)
	})
	want := []Command{
		{Type: CmdWorkloadRestore, Payload: &WorkloadRestoreCmd{ID: "w1", Seq: 1, Node: "c", At: 31e9, Failover: true}},
		{Type: CmdWorkloadFailover, Payload: &WorkloadFailoverCmd{ID: "w2", Node: "c", At: 31e9}},
	}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("plan: got %+v, want %+v (w3: no checkpoint, restart never: stays lost)", plan, want)
	}
	for _, c := range plan {
		a.ok(c.Type, c.Payload)
	}
	a.f.Read(func(s *State) {
		w := s.Workloads["w1"]
		if w.State != StatePending || w.Node != "c" || w.Attempt != 2 || w.Failover == nil || w.Failover.Seq != 1 ||
			w.Failover.Age != 10e9 || w.Failover.From != "a" {
			t.Errorf("w1: %s on %s attempt %d failover %+v", w.State, w.Node, w.Attempt, w.Failover)
		}
		if w := s.Workloads["w2"]; w.State != StatePending || w.Node != "c" || w.Failover == nil || w.Failover.Seq != 0 {
			t.Errorf("w2: %s on %s failover %+v", w.State, w.Node, w.Failover)
		}
		if w := s.Workloads["w3"]; w.State != StateLost {
			t.Errorf("w3: %s, want lost", w.State)
		}
		if p := PlanFailover(s, time.Unix(0, 40e9), time.Second); len(p) != 0 {
			t.Errorf("after the failover: got %+v, want nothing", p)
		}
	})
}

// TestCheckpointChains: an incremental checkpoint names a kept parent
// held by its taker; the retention keeps what a kept checkpoint needs;
// a restore or failover goes only to a node holding the whole chain.
func TestCheckpointChains(t *testing.T) {
	a := checkpointLab(t)
	a.ok(CmdCheckpointPolicyUpsert, &CheckpointPolicyUpsertCmd{Policy: CheckpointPolicy{Name: "p", Interval: 5e9, Keep: 2, Replicas: 1}})
	if err, _ := a.apply(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 20e9, Parent: 7}).(error); !errors.Is(err, ErrRefused) {
		t.Fatalf("a parent never taken: got %v, want ErrRefused", err)
	}
	// 1 full (copies on b and c), 2 on 1 (copy on b only), 3 on 2, 4 full.
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 20e9, Targets: []string{"b", "c"}})
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 1, Node: "b"})
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 1, Node: "c"})
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 21e9, Targets: []string{"b"}, Parent: 1})
	a.ok(CmdCheckpointCopied, &CheckpointCopiedCmd{WorkloadID: "w1", Seq: 2, Node: "b"})
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 22e9, Targets: []string{"b"}, Parent: 2})
	a.f.Read(func(s *State) {
		r := s.Checkpoints["w1"]
		if c := r.Chain(3); len(c) != 3 || c[0].Seq != 3 || c[1].Seq != 2 || c[2].Seq != 1 {
			t.Errorf("chain of 3: got %d checkpoints", len(c))
		}
		for _, tc := range []struct {
			seq  uint64
			node string
			want bool
		}{{3, "a", true}, {3, "b", false}, {2, "b", true}, {2, "c", false}, {1, "c", true}} {
			if got := r.ChainHeld(tc.seq, tc.node); got != tc.want {
				t.Errorf("chain of %d held by %s: got %v, want %v", tc.seq, tc.node, got, tc.want)
			}
		}
		// Keep 2 of 3: checkpoint 1 is the oldest, but 2 and 3 need it.
		if p := PlanCheckpointPrune(s); len(p) != 0 {
			t.Errorf("prune: got %+v, want nothing (1 is needed)", p)
		}
	})
	if err, _ := a.apply(CmdWorkloadRestore, &WorkloadRestoreCmd{ID: "w1", Seq: 2, Node: "c", At: 23e9}).(error); !errors.Is(err, ErrRefused) {
		t.Errorf("restore of 2 on c, which lacks 2: got %v, want ErrRefused", err)
	}
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 24e9, Targets: []string{"c"}})
	var plan []Command
	a.f.Read(func(s *State) { plan = PlanCheckpointPrune(s) })
	// Kept: 3 and 4; 3 needs 2 and 1.
	if len(plan) != 0 {
		t.Errorf("prune with 4 full: got %+v, want nothing (3 needs 1 and 2)", plan)
	}
	a.ok(CmdCheckpointTaken, &CheckpointTakenCmd{WorkloadID: "w1", Node: "a", Attempt: 1, At: 25e9, Targets: []string{"c"}, Parent: 4})
	a.f.Read(func(s *State) { plan = PlanCheckpointPrune(s) })
	want := []Command{{Type: CmdCheckpointPrune, Payload: &CheckpointPruneCmd{WorkloadID: "w1", Seqs: []uint64{1, 2, 3}}}}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("prune with 4 and 5 kept: got %+v, want %+v", plan, want)
	}
	// a goes down: b holds 3's chain but c only 1 (and 4, 5 are not
	// copied yet): the failover takes 2 from b, the newest whole chain.
	a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "a", Status: NodeDown, At: 30e9})
	a.f.Read(func(s *State) { plan = PlanFailover(s, time.Unix(0, 40e9), time.Second) })
	want = []Command{{Type: CmdWorkloadRestore, Payload: &WorkloadRestoreCmd{ID: "w1", Seq: 2, Node: "b", At: 40e9, Failover: true}}}
	if !reflect.DeepEqual(plan, want) {
		t.Fatalf("failover: got %+v, want %+v", plan, want)
	}
}
