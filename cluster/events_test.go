package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// eventApplier drives an eventFSM with raft entries, as raft would.
type eventApplier struct {
	t    testing.TB
	f    eventFSM
	idx  uint64
	logs []*raft.Log // every entry applied
}

func newEventApplier(t *testing.T, max int) *eventApplier {
	return &eventApplier{t: t, f: eventFSM{scheduler.NewFSM(), newEventLog(max)}}
}

func (a *eventApplier) apply(ct scheduler.CommandType, cmd any) uint64 {
	a.t.Helper()
	b, err := scheduler.Encode(ct, cmd)
	if err != nil {
		a.t.Fatal(err)
	}
	a.idx++
	l := &raft.Log{Index: a.idx, Type: raft.LogCommand, Data: b, AppendedAt: time.Unix(1000, int64(a.idx))}
	a.logs = append(a.logs, l)
	res := a.f.Apply(l)
	if err, ok := res.(error); ok {
		a.t.Fatalf("apply %s at %d: %v", ct, a.idx, err)
	}
	return a.idx
}

func (a *eventApplier) all() []api.Event {
	a.t.Helper()
	evs, _, _, err := a.f.ev.since(0)
	if err != nil {
		a.t.Fatal(err)
	}
	return evs
}

func types(evs []api.Event) string {
	var b []string
	for _, e := range evs {
		b = append(b, fmt.Sprintf("%d.%d %s", e.Index, e.Seq, e.Type))
	}
	return strings.Join(b, ", ")
}

// lifecycle applies the commands of a workload's life with a migration,
// a drain and a node going down.
func lifecycle(a *eventApplier) {
	for _, n := range []string{"a", "b"} {
		a.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: n}, At: 1}) // 1, 2
	}
	a.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: "w1", Name: "one",
		Command: "x", DesiredNode: "a", UID: -1, GID: -1, Restart: scheduler.RestartPolicy{Mode: scheduler.RestartOnFailure}}}) // 3
	a.apply(scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 10, At: 2})      // 4
	a.apply(scheduler.CmdNodeLoads, &scheduler.NodeLoadsCmd{})                                                                 // 5: nothing
	a.apply(scheduler.CmdWorkloadExited, &scheduler.WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, ExitCode: 3, At: 3})    // 6
	a.apply(scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 2, PID: 11, At: 4})      // 7
	a.apply(scheduler.CmdMigrationPlan, &scheduler.MigrationPlanCmd{WorkloadID: "w1", Target: "b", Reason: "operator", At: 5}) // 8
	m := "m8"
	for i, to := range []scheduler.MigrationState{scheduler.MigrationTransferring, scheduler.MigrationCommitted} { // 9, 10
		node := "a"
		if i == 1 {
			node = "b"
		}
		a.apply(scheduler.CmdMigrationStep, &scheduler.MigrationStepCmd{ID: m, Attempt: 2, Node: node, To: to, At: 6})
	}
	a.apply(scheduler.CmdMigrationStep, &scheduler.MigrationStepCmd{ID: m, Attempt: 2, Node: "b", To: scheduler.MigrationDone, PID: 10, At: 7}) // 11
	a.apply(scheduler.CmdNodeDrain, &scheduler.NodeDrainCmd{Name: "a", Drain: &scheduler.DrainSpec{NoDeadline: true, StartedAt: 8}, At: 8})     // 12
	a.apply(scheduler.CmdNodeDrainDone, &scheduler.NodeDrainDoneCmd{Name: "a", StartedAt: 8, At: 9})                                            // 13
	a.apply(scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: "b", Status: scheduler.NodeDown, At: 10})                                   // 14
	a.apply(scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w1", At: 11})                                                            // 15
}

// TestEventsFromEntries: each change of the state is one event, in raft
// order, stamped with the entry's index and time; an entry that changes
// nothing an event speaks of makes none.
func TestEventsFromEntries(t *testing.T) {
	a := newEventApplier(t, DefaultEventBuffer)
	lifecycle(a)
	want := "1.0 node-joined, 2.0 node-joined, 3.0 workload-placed, 4.0 workload-started, " +
		"6.0 workload-restarting, 7.0 workload-started, 8.0 migration-planned, 9.0 migration-transferring, " +
		"10.0 migration-committed, 11.0 migration-done, 12.0 node-eligibility, 12.1 drain-started, " +
		"13.0 drain-done, 14.0 node-status, 14.1 workload-lost, 15.0 workload-stop, 15.1 workload-stopped"
	evs := a.all()
	if got := types(evs); got != want {
		t.Fatalf("events:\n got %s\nwant %s", got, want)
	}
	for _, e := range evs {
		if e.Time != time.Unix(1000, int64(e.Index)).UTC() {
			t.Errorf("event %d.%d: time %v, want the entry's", e.Index, e.Seq, e.Time)
		}
	}
	if e := evs[4]; e.Workload != "w1" || !strings.Contains(e.Message, "exit code 3") || !strings.Contains(e.Message, "restart 1 of no limit on a") {
		t.Errorf("restart event: %+v", e)
	}
	if e := evs[9]; e.Migration != "m8" || e.Node != "b" || e.Message != "migration m8 of w1 from a to b done" {
		t.Errorf("migration done event: %+v", e)
	}
	// Resuming at an index gives the rest, from any index.
	for from := uint64(1); from <= a.idx+1; from++ {
		got, _, next, err := a.f.ev.since(from)
		if err != nil {
			t.Fatal(err)
		}
		var rest []api.Event
		for _, e := range evs {
			if e.Index >= from {
				rest = append(rest, e)
			}
		}
		if types(got) != types(rest) || next != a.idx+1 {
			t.Fatalf("since(%d): %s (next %d), want %s (next %d)", from, types(got), next, types(rest), a.idx+1)
		}
	}
}

// TestEventsSameOnEveryReplica: a replica restored from a snapshot taken
// midway derives the same events after it as one that applied everything,
// and refuses indexes at or below the snapshot's as no longer kept.
func TestEventsSameOnEveryReplica(t *testing.T) {
	full := newEventApplier(t, DefaultEventBuffer)
	lifecycle(full)

	half := newEventApplier(t, DefaultEventBuffer)
	for _, l := range full.logs[:2] {
		half.f.Apply(l)
	}
	snap, err := half.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.Persist(&bufSink{&buf}); err != nil {
		t.Fatal(err)
	}
	replica := newEventApplier(t, DefaultEventBuffer)
	if err := replica.f.Restore(nopCloser{&buf}); err != nil {
		t.Fatal(err)
	}
	for _, l := range full.logs[2:] {
		replica.f.Apply(l)
	}
	var want []api.Event
	for _, e := range full.all() {
		if e.Index > 2 {
			want = append(want, e)
		}
	}
	if got := replica.all(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("restored replica's events:\n got %v\nwant %v", got, want)
	}
	_, _, _, err = replica.f.ev.since(2)
	var gone *errEventsGone
	if !errors.As(err, &gone) || !strings.Contains(err.Error(), "index 2 is no longer kept here") || !strings.Contains(err.Error(), "resume with -index 3") {
		t.Fatalf("since(2) after a restore at 2: %v, want no longer kept", err)
	}
}

// TestEventsBounded: past its size, the log drops the oldest entries whole
// and then refuses their indexes in one line.
func TestEventsBounded(t *testing.T) {
	a := newEventApplier(t, 4)
	lifecycle(a)
	evs := a.all()
	if len(evs) > 4 || len(evs) == 0 {
		t.Fatalf("kept %d events, want 1..4: %s", len(evs), types(evs))
	}
	// Index 15 has two events; 14 has two: whole entries are kept.
	if got := types(evs); got != "14.0 node-status, 14.1 workload-lost, 15.0 workload-stop, 15.1 workload-stopped" {
		t.Fatalf("kept %s", got)
	}
	if _, _, _, err := a.f.ev.since(13); err == nil || strings.Count(err.Error(), "\n") != 0 ||
		!strings.Contains(err.Error(), "events: index 13 is no longer kept here (events up to index 13 are gone, the oldest kept is at 14)") {
		t.Fatalf("since(13): %v", err)
	}
	if got, _, _, err := a.f.ev.since(14); err != nil || len(got) != 4 {
		t.Fatalf("since(14): %d events, %v", len(got), err)
	}
}

type bufSink struct{ *bytes.Buffer }

func (bufSink) ID() string    { return "test" }
func (bufSink) Cancel() error { return nil }
func (bufSink) Close() error  { return nil }

type nopCloser struct{ *bytes.Buffer }

func (nopCloser) Close() error { return nil }

// BenchmarkEventsObserve: the cost added to each raft entry, with 1000
// workloads on 10 nodes and nothing that makes an event.
func BenchmarkEventsObserve(b *testing.B) {
	a := &eventApplier{t: b, f: eventFSM{scheduler.NewFSM(), newEventLog(DefaultEventBuffer)}}
	for i := 0; i < 10; i++ {
		a.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: fmt.Sprintf("n%d", i)}, At: 1})
	}
	for i := 0; i < 1000; i++ {
		a.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: fmt.Sprintf("w%04d", i),
			Command: "x", DesiredNode: fmt.Sprintf("n%d", i%10), UID: -1, GID: -1}})
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		a.f.FSM.Read(func(st *scheduler.State) { a.f.ev.observe(a.idx, time.Time{}, st) })
	}
}

// TestEventsBalanceAndOrigin: setting the balancer's mode is an event
// (each time it is set, the same mode too), a planned migration says who
// planned it and why, and a committed one its size for a reader.
func TestEventsBalanceAndOrigin(t *testing.T) {
	a := newEventApplier(t, DefaultEventBuffer)
	for _, n := range []string{"a", "b"} {
		a.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: n}, At: 1}) // 1, 2
	}
	a.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: "w1", Name: "one",
		Command: "x", DesiredNode: "a", UID: -1, GID: -1}}) // 3
	a.apply(scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 10, At: 2}) // 4
	a.apply(scheduler.CmdBalanceSet, &scheduler.BalanceSetCmd{Mode: scheduler.BalanceAggressive, At: 3})                  // 5
	a.apply(scheduler.CmdBalanceSet, &scheduler.BalanceSetCmd{Mode: scheduler.BalanceAggressive, At: 4})                  // 6
	a.apply(scheduler.CmdMigrationPlan, &scheduler.MigrationPlanCmd{WorkloadID: "w1", Target: "b",
		Reason: "balance (aggressive): node a 0.60 → b 0.00", Origin: scheduler.OriginBalancer, At: 5}) // 7
	a.apply(scheduler.CmdMigrationStep, &scheduler.MigrationStepCmd{ID: "m7", Attempt: 1, Node: "a", To: scheduler.MigrationTransferring, At: 6}) // 8
	a.apply(scheduler.CmdMigrationStep, &scheduler.MigrationStepCmd{ID: "m7", Attempt: 1, Node: "b", To: scheduler.MigrationCommitted,
		Bytes: 3 << 20, At: 7}) // 9
	a.apply(scheduler.CmdBalanceSet, &scheduler.BalanceSetCmd{Mode: scheduler.BalanceOff, At: 8}) // 10
	want := map[uint64]string{
		5:  "balance-mode: balance mode set to aggressive (was off)",
		6:  "balance-mode: balance mode set to aggressive (was aggressive)",
		7:  "migration-planned: migration m7 of w1 from a to b planned by balancer (balance (aggressive): node a 0.60 → b 0.00)",
		9:  "migration-committed: migration m7 of w1 from a to b committed (3.0 MiB)",
		10: "balance-mode: balance mode set to off (was aggressive)",
	}
	got := map[uint64]string{}
	for _, e := range a.all() {
		if _, ok := want[e.Index]; ok {
			got[e.Index] = e.Type + ": " + e.Message
		}
	}
	for idx, w := range want {
		if got[idx] != w {
			t.Errorf("event at %d: got %q, want %q", idx, got[idx], w)
		}
	}
}

// TestEventsCheckpointsAndFailover: a checkpoint taken, copied to another
// node and one that failed are events, once each, and so is a failover
// (from the checkpoint, with the work it rolled back).
func TestEventsCheckpointsAndFailover(t *testing.T) {
	l := newEventLog(100)
	st := scheduler.NewState()
	st.Workloads["w1"] = &scheduler.Workload{ID: "w1", State: scheduler.StateRunning, Node: "a", DesiredNode: "a"}
	l.diff(st)
	step := func(what string, want ...string) {
		t.Helper()
		var got []string
		for _, e := range l.diff(st) {
			got = append(got, e.Type+": "+e.Message)
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("%s: events\n%s\nwant\n%s", what, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	r := &scheduler.WorkloadCheckpoints{Seq: 1, List: []*scheduler.Checkpoint{{WorkloadID: "w1", Seq: 1, Node: "a", Size: 3 << 20, Holders: []string{"a"}}}}
	st.Checkpoints["w1"] = r
	step("taken", "checkpoint-taken: checkpoint 1 of workload w1 taken on a (3.0 MiB)")
	step("nothing new")
	r.List[0].Holders = append(r.List[0].Holders, "b")
	step("copied", "checkpoint-copied: checkpoint 1 of workload w1 copied to b (2 copies)")
	r.FailedTotal, r.LastError = 1, "disk reserve"
	step("failed", "checkpoint-failed: checkpoint of workload w1 failed: disk reserve")
	w := st.Workloads["w1"]
	w.Failover = &scheduler.FailoverInfo{At: 5, From: "a", To: "b", Seq: 1, Age: int64(2 * time.Second)}
	step("failover", "workload-failover: workload w1 failed over from a to b, from checkpoint 1 (2s of work rolled back)")
}
