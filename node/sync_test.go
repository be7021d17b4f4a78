package node

import (
	"context"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// TestAgentActsOnlyWhenCurrent: an agent whose replica is behind the
// leader's index (a restarted daemon replaying an old state in which a
// workload is still pending here) starts nothing until it has caught up,
// and nothing while there is no leader. Here the replica shows w1
// pending; the leader's state, at the index Sync names, has it stopped.
func TestAgentActsOnlyWhenCurrent(t *testing.T) {
	l := &fakeLeader{fsm: scheduler.NewFSM()}
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	create := func(id string) {
		t.Helper()
		err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{
			ID: id, Command: "sleep", Args: []string{"30"}, UID: -1, GID: -1, DesiredNode: "a"}})
		if err != nil {
			t.Fatal(err)
		}
	}
	create("w1")
	var mu sync.Mutex
	var started []string
	var pids []int
	t.Cleanup(func() {
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
	})
	report := func(ctx context.Context, r api.Report) error {
		if r.Kind == api.ReportStarted {
			mu.Lock()
			started, pids = append(started, r.ID), append(pids, r.PID)
			mu.Unlock()
		}
		return l.report(ctx, r)
	}
	var leader atomic.Value
	leader.Store("")
	var loops atomic.Int64
	synced := make(chan struct{})
	var syncCalls atomic.Int64
	a := New(Config{Name: "a", DataDir: t.TempDir(), FSM: l.fsm, Report: report, StopTimeout: 2 * time.Second,
		Leader: func() string { loops.Add(1); return leader.Load().(string) },
		Sync: func(context.Context) (uint64, error) {
			if syncCalls.Add(1) == 1 {
				close(synced)
			}
			return 3, nil // w1's stop, not applied here yet
		}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	// Without a leader: not even asked.
	waitLoops := func(n int64) {
		t.Helper()
		at := loops.Load()
		deadline := time.Now().Add(15 * time.Second)
		for loops.Load() < at+n {
			if time.Now().After(deadline) {
				t.Fatalf("agent loop: %d rounds, want %d more", loops.Load()-at, n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitLoops(2)
	if n := syncCalls.Load(); n != 0 {
		t.Fatalf("Sync called %d times without a leader, want 0", n)
	}
	leader.Store("L")
	<-synced
	waitLoops(2) // whole rounds after Sync: behind, so no reconcile
	mu.Lock()
	got := append([]string(nil), started...)
	mu.Unlock()
	if len(got) != 0 {
		t.Fatalf("started %v on a replica behind the leader's index, want nothing", got)
	}
	// The replica catches up: w1 is stopped there; w2 shows the agent acts.
	if err := l.apply(scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w1", At: 1}); err != nil {
		t.Fatal(err)
	}
	create("w2")
	l.wait(t, "w2", scheduler.StateRunning)
	mu.Lock()
	defer mu.Unlock()
	if len(started) != 1 || started[0] != "w2" {
		t.Errorf("started %v, want [w2]", started)
	}
	if w := l.get("w1"); w.State != scheduler.StateStopped {
		t.Errorf("w1: %s, want stopped", w.State)
	}
}

// TestAgentKillsStartRefusedAsStale: a process whose "started" report the
// state refuses as stale is a copy no one sees: the agent kills it.
func TestAgentKillsStartRefusedAsStale(t *testing.T) {
	l := &fakeLeader{fsm: scheduler.NewFSM()}
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{
		ID: "w1", Command: "sleep", Args: []string{"30"}, UID: -1, GID: -1, DesiredNode: "a"}}); err != nil {
		t.Fatal(err)
	}
	exited := make(chan api.Report, 1)
	var pid atomic.Int64
	t.Cleanup(func() {
		if p := pid.Load(); p > 0 {
			syscall.Kill(int(p), syscall.SIGKILL)
		}
	})
	report := func(_ context.Context, r api.Report) error {
		switch r.Kind {
		case api.ReportStarted:
			pid.Store(int64(r.PID))
			return &api.Error{Status: 409, Message: "workload started w1: attempt 1 on a, want attempt 2 on b: " + scheduler.ErrStale.Error()}
		case api.ReportExited:
			select {
			case exited <- r:
			default:
			}
		}
		return nil
	}
	a := New(Config{Name: "a", DataDir: t.TempDir(), FSM: l.fsm, Report: report, StopTimeout: 2 * time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	select {
	case r := <-exited:
		if r.Signal != "killed" {
			t.Errorf("exit of the refused start: signal %q (code %d), want killed", r.Signal, r.ExitCode)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the process of a start refused as stale was not killed")
	}
}
