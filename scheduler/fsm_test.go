package scheduler

import (
	"errors"
	"reflect"
	"testing"

	"github.com/hashicorp/raft"
)

// applier feeds commands to an FSM with increasing raft indexes.
type applier struct {
	t   *testing.T
	f   *FSM
	idx uint64
}

func (a *applier) apply(ct CommandType, payload any) any {
	a.t.Helper()
	b, err := Encode(ct, payload)
	if err != nil {
		a.t.Fatal(err)
	}
	a.idx++
	return a.f.Apply(&raft.Log{Index: a.idx, Type: raft.LogCommand, Data: b})
}

func (a *applier) ok(ct CommandType, payload any) any {
	a.t.Helper()
	res := a.apply(ct, payload)
	if err, isErr := res.(error); isErr {
		a.t.Fatalf("apply %s: %v", ct, err)
	}
	return res
}

// allCommands applies every command type at least once.
func allCommands(a *applier) {
	for _, n := range []string{"a", "b"} {
		a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: n, RaftAddr: n + ":1", APIAddr: n + ":2", Labels: map[string]string{"zone": n}}, At: 1})
	}
	a.ok(CmdNodeLoads, &NodeLoadsCmd{Loads: map[string]Load{"a": {CPULoad1: 0.5, NumCPU: 2, MemUsed: 1 << 30, MemFree: 3 << 30, Workloads: 1}}, At: 2})
	a.ok(CmdNodeEligibility, &NodeEligibilityCmd{Name: "b", Eligible: false})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w1", Name: "sleeper", Command: "/bin/sleep", Args: []string{"10"},
		Env: []string{"A=1"}, UID: -1, GID: -1, Labels: map[string]string{"app": "x"}, VIP: "198.18.0.10", DesiredNode: "a",
		Restart: RestartPolicy{Mode: RestartOnFailure, Max: 2}, CreatedAt: 3}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 100, StartTicks: 7, At: 4})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, ExitCode: 1, At: 5})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 2, PID: 101, At: 6})
	a.ok(CmdWorkloadStop, &WorkloadStopCmd{ID: "w1", At: 7})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 2, Signal: "terminated", At: 8})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w2", Command: "/bin/true", DesiredNode: "b", CreatedAt: 9}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w2", Node: "b", Attempt: 1, PID: 200, At: 10})
	m := a.ok(CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: "w2", Target: "a", Reason: "operator", At: 10}).(Migration)
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: "b", To: MigrationTransferring, At: 10})
	a.ok(CmdCheckpointPolicyUpsert, &CheckpointPolicyUpsertCmd{Policy: CheckpointPolicy{Name: "hourly", Selector: map[string]string{"app": "x"}, Interval: 3600e9, Keep: 3}})
	a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "b", Status: NodeDown, At: 11})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w3", Command: "/bin/true", UID: -1, GID: -1, DesiredNode: "a", CreatedAt: 12}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w3", Node: "a", Attempt: 1, PID: 300, At: 13})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w3", Node: "a", Attempt: 1, At: 14})
	a.ok(CmdWorkloadGC, &WorkloadGCCmd{IDs: []string{"w3"}, Before: 14})
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "c"}, At: 15})
	a.ok(CmdNodeDrain, &NodeDrainCmd{Name: "c", Drain: &DrainSpec{NoDeadline: true, MaxParallel: 2}, At: 16})
	a.ok(CmdNodeDrainDone, &NodeDrainDoneCmd{Name: "c", StartedAt: 16, At: 17})
}

func TestFSMSnapshotRestoreEqual(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	allCommands(a)
	seen := map[CommandType]bool{}
	for ct := range handlers {
		seen[ct] = false
	}
	// Every registered type must be exercised by allCommands.
	b := &applier{t: t, f: NewFSM()}
	orig := handlers
	handlers = map[CommandType]handler{}
	for ct, h := range orig {
		h2 := h
		ct2 := ct
		handlers[ct] = handler{decode: h2.decode, apply: func(s *State, idx uint64, c any) any {
			seen[ct2] = true
			return h2.apply(s, idx, c)
		}}
	}
	allCommands(b)
	handlers = orig
	for ct, ok := range seen {
		if !ok {
			t.Errorf("command %s not exercised", ct)
		}
	}

	store := raft.NewInmemSnapshotStore()
	snap, err := a.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink, err := store.Create(raft.SnapshotVersionMax, a.idx, 1, raft.Configuration{}, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	_, rc, err := store.Open(sink.ID())
	if err != nil {
		t.Fatal(err)
	}
	fresh := NewFSM()
	if err := fresh.Restore(rc); err != nil {
		t.Fatal(err)
	}
	got, _ := fresh.Copy()
	want, _ := a.f.Copy()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("restored state differs:\ngot  %+v\nwant %+v", got, want)
	}
	if got.Index != a.idx {
		t.Fatalf("restored index: got %d, want %d", got.Index, a.idx)
	}
}

func TestFSMWorkloadLifecycle(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	allCommands(a)
	var w1, w2 Workload
	a.f.Read(func(s *State) { w1, w2 = *s.Workloads["w1"], *s.Workloads["w2"] })
	if w1.State != StateStopped || w1.Restarts != 1 || w1.Attempt != 2 {
		t.Errorf("w1: got state %s restarts %d attempt %d, want stopped 1 2", w1.State, w1.Restarts, w1.Attempt)
	}
	if w2.State != StateLost || w2.Message != "node b down" {
		t.Errorf("w2 after its node died: got %s (%q), want lost", w2.State, w2.Message)
	}
	// A node that comes back is ready again; its lost workload stays recorded.
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "b"}, At: 12})
	a.f.Read(func(s *State) {
		if s.Nodes["b"].Status != NodeReady {
			t.Errorf("node b after upsert: got %s, want ready", s.Nodes["b"].Status)
		}
		if s.Workloads["w2"].State != StateLost {
			t.Errorf("w2 after node return: got %s, want lost", s.Workloads["w2"].State)
		}
	})
	// Stale and unknown reports are refused without changing anything.
	if err, _ := a.apply(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1}).(error); !errors.Is(err, ErrStale) {
		t.Errorf("stale start: got %v, want ErrStale", err)
	}
	if err, _ := a.apply(CmdWorkloadStop, &WorkloadStopCmd{ID: "nope"}).(error); !errors.Is(err, ErrNotFound) {
		t.Errorf("stop unknown: got %v, want ErrNotFound", err)
	}
	if err, _ := a.apply(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w3", Command: "x", DesiredNode: "a", VIP: "198.18.0.10"}}).(error); err != nil {
		t.Errorf("reuse of a stopped workload's VIP: %v", err)
	}
	if err, _ := a.apply(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w4", Command: "x", DesiredNode: "a", VIP: "198.18.0.10"}}).(error); !errors.Is(err, ErrExists) {
		t.Errorf("duplicate active VIP: got %v, want ErrExists", err)
	}
}

func TestFSMRestartPolicy(t *testing.T) {
	tests := []struct {
		mode   string
		max    int
		exits  []int
		states []WorkloadState
	}{
		{RestartNever, 0, []int{0}, []WorkloadState{StateExited}},
		{RestartNever, 0, []int{3}, []WorkloadState{StateFailed}},
		{RestartOnFailure, 0, []int{0}, []WorkloadState{StateExited}},
		{RestartOnFailure, 2, []int{1, 1, 1}, []WorkloadState{StatePending, StatePending, StateFailed}},
		{RestartAlways, 1, []int{0, 0}, []WorkloadState{StatePending, StateExited}},
	}
	for _, tc := range tests {
		a := &applier{t: t, f: NewFSM()}
		a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "a"}})
		a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w", Command: "x", DesiredNode: "a", Restart: RestartPolicy{Mode: tc.mode, Max: tc.max}}})
		for i, code := range tc.exits {
			a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w", Node: "a", Attempt: i + 1, PID: 10 + i})
			got := a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w", Node: "a", Attempt: i + 1, ExitCode: code}).(Workload)
			if got.State != tc.states[i] {
				t.Errorf("%s max %d exit #%d (%d): got %s, want %s", tc.mode, tc.max, i+1, code, got.State, tc.states[i])
			}
		}
	}
}

func TestFSMUnknownCommand(t *testing.T) {
	f := NewFSM()
	if res := f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: []byte{byte(SkippableFlag | 0x7f)}}); res != nil {
		t.Errorf("skippable unknown command: got %v, want nil", res)
	}
	defer func() {
		if recover() == nil {
			t.Error("unknown command without the skippable flag: got no panic")
		}
	}()
	f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: []byte{0x7f}})
}
