package scheduler

import (
	"errors"
	"reflect"
	"strings"
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
	a.ok(CmdNodeLoads, &NodeLoadsCmd{Loads: map[string]Load{"a": {CPULoad1: 0.5, NumCPU: 2, MemUsed: 1 << 30, MemFree: 3 << 30, Workloads: 1,
		WCPU: 300, WRSS: 1 << 20, Use: map[string]Use{"w1": {CPU: 300, RSS: 1 << 20}}}}, At: 2})
	a.ok(CmdBalanceSet, &BalanceSetCmd{Mode: BalanceConservative, At: 2})
	a.ok(CmdNodeEligibility, &NodeEligibilityCmd{Name: "b", Eligible: false})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w1", Name: "sleeper", Command: "/bin/sleep", Args: []string{"10"},
		Env: []string{"A=1"}, UID: -1, GID: -1, Labels: map[string]string{"app": "x"}, VIP: "198.18.0.10", DesiredNode: "a",
		Restart: RestartPolicy{Mode: RestartOnFailure, Max: 2}, CreatedAt: 3}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 100, StartTicks: 7, At: 4})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, ExitCode: 1, At: 5})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 2, PID: 101, At: 6})
	a.ok(CmdWorkloadStop, &WorkloadStopCmd{ID: "w1", At: 7})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 2, Signal: "terminated", At: 8})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w2", Command: "/bin/true", DesiredNode: "b", Migrate: MigrateNever, CreatedAt: 9}})
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
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "d"}, At: 18})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w4", Command: "/bin/sleep", UID: -1, GID: -1, DesiredNode: "a",
		Restart: RestartPolicy{Mode: RestartAlways}, CreatedAt: 19}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w4", Node: "a", Attempt: 1, PID: 400, At: 20})
	a.ok(CmdWorkloadReschedule, &WorkloadRescheduleCmd{ID: "w4", Node: "d", Reason: "drain", At: 21})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w5", Command: "/bin/sleep", UID: -1, GID: -1, DesiredNode: "a", CreatedAt: 22}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w5", Node: "a", Attempt: 1, PID: 500, At: 23})
	m = a.ok(CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: "w5", Target: "d", Reason: "operator", At: 24}).(Migration)
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: "a", To: MigrationTransferring, At: 25})
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, Node: "d", To: MigrationCommitted, At: 26})
	a.ok(CmdWorkloadLost, &WorkloadLostCmd{ID: "w5", Node: "d", Attempt: 2, Message: "lost with the agent before it started", At: 27})
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
	if err, _ := a.apply(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w5", Command: "x", DesiredNode: "a", VIP: "198.18.0.10/24"}}).(error); !errors.Is(err, ErrExists) {
		t.Errorf("duplicate active VIP with a prefix: got %v, want ErrExists", err)
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

// restored returns a fresh FSM restored from a snapshot of f, as a server
// that installs it from its leader.
func restored(t *testing.T, f *FSM) *FSM {
	t.Helper()
	store := raft.NewInmemSnapshotStore()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var idx uint64
	f.Read(func(s *State) { idx = s.Index })
	sink, err := store.Create(raft.SnapshotVersionMax, idx, 1, raft.Configuration{}, 1, nil)
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
	return fresh
}

// TestFSMReplayEqualsSnapshot is the upgrade case: an older pclusterd
// committed a workload over today's limits (max_restarts -1, 257
// arguments, over 16 KiB of strings) and reported its exit with a 2 KiB
// message. A server restored from the older version's snapshot and one
// that replays the log must hold the same state, and go on agreeing. The
// FSM applies what was committed; the limits bind where commands are
// proposed (TestValidateWorkload, TestReportLimits).
func TestFSMReplayEqualsSnapshot(t *testing.T) {
	args := make([]string, MaxArgs+1)
	for i := range args {
		args[i] = strings.Repeat("a", 100)
	}
	spec := Workload{ID: "wold", Command: "/bin/sh", Args: args, UID: -1, GID: -1, DesiredNode: "a",
		Restart: RestartPolicy{Mode: RestartOnFailure, Max: -1}, CreatedAt: 2}
	long := strings.Repeat("m", 2048)
	log := []struct {
		t   CommandType
		cmd any
	}{
		{CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "a"}, At: 1}},
		{CmdWorkloadCreate, &WorkloadCreateCmd{Workload: spec}},
		{CmdWorkloadStarted, &WorkloadStartedCmd{ID: "wold", Node: "a", Attempt: 1, PID: 100, StartTicks: 7, At: 3}},
		{CmdWorkloadExited, &WorkloadExitedCmd{ID: "wold", Node: "a", Attempt: 1, ExitCode: 1, Message: long, At: 4}},
		{CmdWorkloadStarted, &WorkloadStartedCmd{ID: "wold", Node: "a", Attempt: 2, PID: 101, StartTicks: 8, At: 5}},
	}
	const snapAt = 4 // the older version's snapshot covers entries 1..4

	// Server B replays the whole log.
	b := &applier{t: t, f: NewFSM()}
	for _, e := range log {
		b.apply(e.t, e.cmd)
	}

	// Server A restores the older version's snapshot, which holds the
	// workload as that version applied entries 2..4, then applies entry 5.
	old := &applier{t: t, f: NewFSM()}
	old.ok(log[0].t, log[0].cmd)
	w := spec
	w.Desired, w.State, w.Node, w.ModifyIndex = DesiredRunning, StatePending, "a", 4 // pending its restart
	w.Attempt, w.Restarts, w.ExitCode, w.Message, w.StartedAt, w.EndedAt = 2, 1, 1, long, 3, 4
	old.f.mu.Lock()
	old.f.state.Workloads[w.ID] = &w
	old.f.state.Index = snapAt
	old.f.mu.Unlock()
	a := &applier{t: t, f: restored(t, old.f), idx: snapAt}
	for _, e := range log[snapAt:] {
		a.apply(e.t, e.cmd)
	}

	got, _ := b.f.Copy()
	want, _ := a.f.Copy()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("replayed state differs from the restored one:\nreplay   %d workloads %+v\nsnapshot %d workloads %+v",
			len(got.Workloads), got.Workloads, len(want.Workloads), want.Workloads)
	}
	if w := got.Workloads["wold"]; w == nil || w.State != StateRunning || w.PID != 101 {
		t.Errorf("workload after both: %+v, want running with PID 101", w)
	}
}
