package node

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// syncBuffer is a log sink the agent's goroutines share with the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFence cuts an agent off from the majority (its Contact goes stale
// and it sees no leader) with three workloads: w1 a failover could
// restart elsewhere (fenced), w2 the same with fence off, w3 one that no
// failover could replace (restart never, no checkpoint). Only w1 is
// frozen. Back in contact with w1 still its own: thawed. Cut off again
// and declared down (w1 lost): back in contact it stays frozen until its
// report makes it running again, then thawed. Cut off a third time while
// the leader fails w1 over to another node: back in contact, the agent
// kills it.
func TestFence(t *testing.T) {
	l, cfg, logs := fenceSetup(t, "fence")
	name, dir := cfg.Name, cfg.DataDir
	var cut atomic.Bool
	cfg.Contact = func() time.Time {
		if cut.Load() {
			return time.Now().Add(-time.Hour)
		}
		return time.Now()
	}
	cfg.Leader = func() string {
		if cut.Load() {
			return ""
		}
		return "leader"
	}
	a := New(cfg)
	if a.cg == nil {
		t.Skip("no cgroup v2 freezer here")
	}
	stop := startRun(a)
	t.Cleanup(func() {
		stop()
		if err := RemoveCgroups(name, dir); err != nil {
			t.Error(err)
		}
	})
	for _, w := range []scheduler.Workload{
		{ID: "w1", Restart: scheduler.RestartPolicy{Mode: scheduler.RestartOnFailure}},
		{ID: "w2", Restart: scheduler.RestartPolicy{Mode: scheduler.RestartOnFailure}, Fence: scheduler.FenceOff},
		{ID: "w3"},
	} {
		w.Command, w.Args, w.UID, w.GID, w.DesiredNode = "sleep", []string{"1000"}, -1, -1, name
		if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: w}); err != nil {
			t.Fatal(err)
		}
		l.wait(t, w.ID, scheduler.StateRunning)
	}
	isFrozen := func(id string, attempt int) bool {
		b, err := os.ReadFile(filepath.Join(a.cg.dir(id, attempt), "cgroup.events"))
		return err == nil && bytes.Contains(b, []byte("frozen 1"))
	}
	fencedOnly := func() {
		t.Helper()
		waitLogged(t, logs, "w1 frozen", func() bool { return isFrozen("w1", 1) })
		if isFrozen("w2", 1) || isFrozen("w3", 1) {
			t.Fatalf("frozen: w2 (fence off) %v, w3 (no failover could replace it) %v; want neither", isFrozen("w2", 1), isFrozen("w3", 1))
		}
	}

	cut.Store(true)
	fencedOnly()
	cut.Store(false)
	waitLogged(t, logs, "w1 thawed (still this node's)", func() bool { return !isFrozen("w1", 1) })

	cut.Store(true)
	fencedOnly()
	if err := l.apply(scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: name, Status: scheduler.NodeDown, At: 1}); err != nil {
		t.Fatal(err)
	}
	if w := l.get("w1"); w.State != scheduler.StateLost {
		t.Fatalf("w1 %s after its node went down, want lost", w.State)
	}
	// Seen again: the leader makes the node ready; the agent's report
	// brings w1 back to running, and only then is it thawed.
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: name}, At: 2}); err != nil {
		t.Fatal(err)
	}
	cut.Store(false)
	l.wait(t, "w1", scheduler.StateRunning)
	waitLogged(t, logs, "w1 thawed (running here again)", func() bool { return !isFrozen("w1", 1) })

	cut.Store(true)
	fencedOnly()
	for _, c := range []struct {
		t   scheduler.CommandType
		cmd any
	}{
		{scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: name, Status: scheduler.NodeDown, At: 3}},
		{scheduler.CmdWorkloadFailover, &scheduler.WorkloadFailoverCmd{ID: "w1", Node: "b", At: 4}},
	} {
		if err := l.apply(c.t, c.cmd); err != nil {
			t.Fatal(err)
		}
	}
	pids := procsOf(a.cg.dir("w1", 1))
	if len(pids) == 0 {
		t.Fatal("w1's cgroup holds no process")
	}
	time.Sleep(3 * fenceCheckEvery) // cut off, the agent has nothing to decide
	if !isFrozen("w1", 1) || len(procsOf(a.cg.dir("w1", 1))) == 0 {
		t.Fatalf("w1 not frozen and alive while cut off (frozen %v)", isFrozen("w1", 1))
	}
	cut.Store(false)
	waitLogged(t, logs, "w1's stale copy killed", func() bool { return len(procsOf(a.cg.dir("w1", 1))) == 0 })
	// Killed by the fence's settling or, when the agent's reconcile gets
	// to the current replica first, by its stale-copy rule: either way
	// killed, never thawed to run beside the copy on b.
	if s := logs.String(); !strings.Contains(s, "killing this node's stale copy") {
		t.Errorf("the agent's log does not say the fence's copy was killed:\n%s", s)
	} else if i := strings.LastIndex(s, "fenced: workload frozen"); strings.Contains(s[i:], "thawing") {
		t.Errorf("the fence's copy was thawed after the failover:\n%s", s[i:])
	}
	for _, id := range []string{"w2", "w3"} {
		if w := l.get(id); w.State != scheduler.StateLost && w.State != scheduler.StateRunning || isFrozen(id, 1) {
			t.Errorf("%s: %s, frozen %v; want it left running", id, w.State, isFrozen(id, 1))
		}
	}

	// A new agent (pclusterd restarted) while the node is cut off: it has
	// adopted nothing, yet fences what its replica runs here.
	if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: "w4", Command: "sleep",
		Args: []string{"1000"}, UID: -1, GID: -1, DesiredNode: name, Restart: scheduler.RestartPolicy{Mode: scheduler.RestartAlways}}}); err != nil {
		t.Fatal(err)
	}
	w4 := l.wait(t, "w4", scheduler.StateRunning)
	stop()
	cut.Store(true)
	b := New(cfg)
	stop = startRun(b)
	waitLogged(t, logs, "w4 frozen by the new agent", func() bool { return isFrozen("w4", 1) })
	if isFrozen("w2", 1) || isFrozen("w3", 1) {
		t.Errorf("the new agent froze w2 %v, w3 %v; want neither", isFrozen("w2", 1), isFrozen("w3", 1))
	}
	cut.Store(false)
	waitLogged(t, logs, "w4 thawed and adopted", func() bool { return !isFrozen("w4", 1) && b.Workloads() >= 3 })
	if got := l.get("w4"); got.State != scheduler.StateRunning || got.PID != w4.PID {
		t.Errorf("w4 after the new agent's return: %s pid %d, want running pid %d", got.State, got.PID, w4.PID)
	}
}

// fenceSetup is what the fence and watchdog tests share: root, a fake
// leader that knows this node (prefix and the test's pid: cgroups of its
// own) and node "b", and an agent config in contact with a leader, with a
// 1 s fence and its log in logs.
func fenceSetup(t *testing.T, prefix string) (l *fakeLeader, cfg Config, logs *syncBuffer) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: workloads in cgroups of their own")
	}
	l = &fakeLeader{fsm: scheduler.NewFSM()}
	name := fmt.Sprintf("%s%d", prefix, os.Getpid())
	for _, n := range []string{name, "b"} {
		if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: n}}); err != nil {
			t.Fatal(err)
		}
	}
	logs = &syncBuffer{}
	cfg = Config{Name: name, DataDir: t.TempDir(), FSM: l.fsm, Report: l.report, StopTimeout: 2 * time.Second, Cgroups: true,
		Logger: slog.New(slog.NewTextHandler(logs, nil)), FenceAfter: time.Second,
		Contact: time.Now,
		Leader:  func() string { return "leader" },
		Sync:    l.index,
	}
	return l, cfg, logs
}

// waitLogged waits up to 15 s for f, then fails naming what, with the
// agent's log.
func waitLogged(t *testing.T, logs *syncBuffer, what string, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); !f(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waiting 15s for %s; agent log:\n%s", what, logs.String())
		}
	}
}
