package scheduler

import (
	"reflect"
	"testing"
	"time"
)

// TestWorkloadsToCollect is the GC decision on a fake clock: ended
// workloads (exited, failed, stopped) older than the retention go, oldest
// first, in batches; active ones and recent ones stay, and lost ones stay
// however old (their node may come back with the process running) until
// an operator stops them.
func TestWorkloadsToCollect(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	ago := func(d time.Duration) int64 { return now.Add(-d).UnixNano() }
	s := NewState()
	for _, w := range []*Workload{
		{ID: "exited-2h", State: StateExited, CreatedAt: ago(3 * time.Hour), EndedAt: ago(2 * time.Hour)},
		{ID: "failed-61m", State: StateFailed, CreatedAt: ago(3 * time.Hour), EndedAt: ago(61 * time.Minute)},
		{ID: "stopped-59m", State: StateStopped, CreatedAt: ago(3 * time.Hour), EndedAt: ago(59 * time.Minute)},
		{ID: "lost-90m", State: StateLost, CreatedAt: ago(3 * time.Hour), StartedAt: ago(2 * time.Hour), LostAt: ago(90 * time.Minute)},
		{ID: "lost-10m", State: StateLost, CreatedAt: ago(3 * time.Hour), StartedAt: ago(2 * time.Hour), LostAt: ago(10 * time.Minute)},
		{ID: "lost-30h-pending", State: StateLost, CreatedAt: ago(31 * time.Hour), LostAt: ago(30 * time.Hour)},
		{ID: "lost-then-stopped-70m", State: StateStopped, Desired: DesiredStopped, CreatedAt: ago(3 * time.Hour), StartedAt: ago(2 * time.Hour),
			LostAt: ago(90 * time.Minute), EndedAt: ago(70 * time.Minute), PID: 42},
		{ID: "running-old", State: StateRunning, CreatedAt: ago(30 * time.Hour), EndedAt: ago(29 * time.Hour)},
		{ID: "pending-restart", State: StatePending, CreatedAt: ago(30 * time.Hour), EndedAt: ago(29 * time.Hour)},
		{ID: "exited-exactly-1h", State: StateExited, EndedAt: ago(time.Hour)},
	} {
		s.Workloads[w.ID] = w
	}
	cutoff := now.Add(-DefaultGCAfter).UnixNano()
	for _, c := range []struct {
		limit int
		want  []string
	}{
		{MaxGCBatch, []string{"exited-2h", "lost-then-stopped-70m", "failed-61m", "exited-exactly-1h"}},
		{2, []string{"exited-2h", "lost-then-stopped-70m"}},
	} {
		if got := WorkloadsToCollect(s, cutoff, c.limit); !reflect.DeepEqual(got, c.want) {
			t.Errorf("limit %d: got %v, want %v", c.limit, got, c.want)
		}
	}
}

// TestFSMWorkloadGC applies workload-gc directly: it removes only what is
// still ended before the cutoff when it applies (a workload restarted
// since the leader decided stays), with its migrations.
func TestFSMWorkloadGC(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "a"}})
	for _, id := range []string{"w1", "w2", "w3"} {
		a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: id, Command: "x", UID: -1, GID: -1, DesiredNode: "a",
			Restart: RestartPolicy{Mode: RestartOnFailure}}})
		a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: id, Node: "a", Attempt: 1, PID: 1, At: 10})
	}
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "b"}})
	a.ok(CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: "w1", Target: "b"})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, At: 20})              // exited
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w2", Node: "a", Attempt: 1, ExitCode: 1, At: 20}) // restarting: pending
	n := a.ok(CmdWorkloadGC, &WorkloadGCCmd{IDs: []string{"w1", "w2", "w3", "gone"}, Before: 25})
	if n != 1 {
		t.Errorf("removed %v, want 1", n)
	}
	a.f.Read(func(s *State) {
		if _, ok := s.Workloads["w1"]; ok {
			t.Error("w1 (exited at 20, cutoff 25) kept")
		}
		for _, id := range []string{"w2", "w3"} {
			if _, ok := s.Workloads[id]; !ok {
				t.Errorf("%s (active) removed", id)
			}
		}
		if len(s.Migrations) != 0 {
			t.Errorf("migrations of removed workloads kept: %v", s.Migrations)
		}
	})
	a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w3", Node: "a", Attempt: 1, At: 30})
	if n := a.ok(CmdWorkloadGC, &WorkloadGCCmd{IDs: []string{"w3"}, Before: 25}); n != 0 {
		t.Errorf("w3 ended at 30 removed with cutoff 25")
	}

	// A lost workload is never removed, whoever lists it: its node may
	// come back with the process. Stopped by an operator, it goes.
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w4", Command: "x", UID: -1, GID: -1, DesiredNode: "b"}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w4", Node: "b", Attempt: 1, PID: 4, At: 40})
	a.ok(CmdNodeStatus, &NodeStatusCmd{Name: "b", Status: NodeDown, At: 41})
	if n := a.ok(CmdWorkloadGC, &WorkloadGCCmd{IDs: []string{"w4"}, Before: 1 << 62}); n != 0 {
		t.Errorf("lost w4 removed by the GC")
	}
	a.ok(CmdWorkloadStop, &WorkloadStopCmd{ID: "w4", At: 50})
	if n := a.ok(CmdWorkloadGC, &WorkloadGCCmd{IDs: []string{"w4"}, Before: 50}); n != 1 {
		t.Errorf("w4 lost then stopped at 50: removed %v with cutoff 50, want 1", n)
	}
}
