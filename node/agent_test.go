package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// fakeLeader applies agent reports straight to an FSM, standing in for
// raft and the leader's API.
type fakeLeader struct {
	mu  sync.Mutex
	fsm *scheduler.FSM
	idx uint64
}

// index is the index the fake leader applied last (Config.Sync).
func (l *fakeLeader) index(context.Context) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.idx, nil
}

// startRun runs a's loop until stop, which waits for it to end.
func startRun(a *Agent) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	return func() { cancel(); <-done }
}

func (l *fakeLeader) apply(t scheduler.CommandType, cmd any) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, err := scheduler.Encode(t, cmd)
	if err != nil {
		return err
	}
	l.idx++
	if err, ok := l.fsm.Apply(&raft.Log{Index: l.idx, Type: raft.LogCommand, Data: b}).(error); ok {
		return err
	}
	return nil
}

func (l *fakeLeader) report(_ context.Context, r api.Report) error {
	var err error
	switch r.Kind {
	case api.ReportStarted:
		err = l.apply(scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: r.ID, Node: r.Node, Attempt: r.Attempt,
			PID: r.PID, StartTicks: r.StartTicks, NSPID: r.NSPID, InitPID: r.InitPID, At: r.At.UnixNano()})
	case api.ReportExited:
		err = l.apply(scheduler.CmdWorkloadExited, &scheduler.WorkloadExitedCmd{ID: r.ID, Node: r.Node, Attempt: r.Attempt,
			ExitCode: r.ExitCode, Signal: r.Signal, Message: r.Message, At: r.At.UnixNano()})
	}
	if errors.Is(err, scheduler.ErrStale) {
		return &api.Error{Status: 409, Message: err.Error()}
	}
	return err
}

func (l *fakeLeader) get(id string) scheduler.Workload {
	var w scheduler.Workload
	l.fsm.Read(func(s *scheduler.State) {
		if p := s.Workloads[id]; p != nil {
			w = *p
		}
	})
	return w
}

func (l *fakeLeader) wait(t *testing.T, id string, state scheduler.WorkloadState) scheduler.Workload {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		w := l.get(id)
		if w.State == state {
			return w
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %s: state %s (%s), want %s", id, w.State, w.Message, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runAgent starts an agent and returns a function that stops it and waits.
func runAgent(t *testing.T, l *fakeLeader, dir string) (*Agent, func()) {
	a := New(Config{Name: "a", DataDir: dir, FSM: l.fsm, Report: l.report, StopTimeout: 2 * time.Second})
	run := startRun(a)
	var once sync.Once
	stop := func() { once.Do(run) }
	t.Cleanup(stop)
	return a, stop
}

func TestAgent(t *testing.T) {
	l := &fakeLeader{fsm: scheduler.NewFSM()}
	dir := t.TempDir()
	var pids []int
	t.Cleanup(func() {
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
	})
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	create := func(id, cmd string, args ...string) {
		t.Helper()
		err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{
			ID: id, Command: cmd, Args: args, Env: []string{"GREETING=hi"}, UID: -1, GID: -1, DesiredNode: "a"}})
		if err != nil {
			t.Fatal(err)
		}
	}
	a, stopA := runAgent(t, l, dir)

	// Output goes to the log files; the exit status to the state.
	create("w1", "sh", "-c", `echo "$GREETING $PCLUSTER_WORKLOAD_ID"; echo err >&2; exit 7`)
	w := l.wait(t, "w1", scheduler.StateFailed)
	if w.ExitCode != 7 {
		t.Errorf("w1 exit: got %d, want 7", w.ExitCode)
	}
	for stream, want := range map[string]string{"stdout": "hi w1\n", "stderr": "err\n"} {
		p, _ := a.LogPath("w1", stream)
		if b, _ := os.ReadFile(p); string(b) != want {
			t.Errorf("w1 %s: got %q, want %q", stream, b, want)
		}
	}

	// A missing command fails with 127 and says why.
	create("w0", "no-such-command-xyz")
	if w := l.wait(t, "w0", scheduler.StateFailed); w.ExitCode != 127 || !strings.Contains(w.Message, "not found") {
		t.Errorf("missing command: exit %d %q", w.ExitCode, w.Message)
	}

	// Stop: SIGTERM to the process group.
	create("w2", "sleep", "300")
	w = l.wait(t, "w2", scheduler.StateRunning)
	pids = append(pids, w.PID)
	if err := l.apply(scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w2"}); err != nil {
		t.Fatal(err)
	}
	if w := l.wait(t, "w2", scheduler.StateStopped); w.Signal != "terminated" || w.ExitCode != 128+15 {
		t.Errorf("stopped w2: signal %q exit %d, want terminated 143", w.Signal, w.ExitCode)
	}

	// A workload outlives its agent and the next agent adopts it; its
	// real end reaches the state still, through its init's status file.
	create("w3", "sleep", "300")
	w = l.wait(t, "w3", scheduler.StateRunning)
	pids = append(pids, w.PID)
	stopA()
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", w.PID)); err != nil {
		t.Fatalf("workload died with its agent: %v", err)
	}
	b, stopB := runAgent(t, l, dir)
	deadline := time.Now().Add(5 * time.Second)
	for b.Workloads() != 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if b.Workloads() != 1 {
		t.Fatalf("new agent watches %d workloads, want the adopted one", b.Workloads())
	}
	if err := l.apply(scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w3"}); err != nil {
		t.Fatal(err)
	}
	if w := l.wait(t, "w3", scheduler.StateStopped); w.Signal != "terminated" || w.ExitCode != 128+15 {
		t.Errorf("adopted w3: signal %q exit %d (%s), want terminated 143", w.Signal, w.ExitCode, w.Message)
	}

	// Stopped while its node was down: the next agent still stops it.
	create("w4", "sleep", "300")
	w = l.wait(t, "w4", scheduler.StateRunning)
	pids = append(pids, w.PID)
	stopB()
	for _, c := range []struct {
		t   scheduler.CommandType
		cmd any
	}{
		{scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: "a", Status: scheduler.NodeDown}},
		{scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w4"}},
		{scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}},
	} {
		if err := l.apply(c.t, c.cmd); err != nil {
			t.Fatal(err)
		}
	}
	runAgent(t, l, dir)
	deadline = time.Now().Add(10 * time.Second)
	for l.get("w4").PID != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if w := l.get("w4"); w.PID != 0 || w.State != scheduler.StateStopped {
		t.Errorf("w4 stopped while its node was down: pid %d state %s, want its process ended", w.PID, w.State)
	}
}

func TestSampleLoad(t *testing.T) {
	l, err := SampleLoad()
	if err != nil {
		t.Fatal(err)
	}
	if l.NumCPU < 1 || l.MemFree == 0 || l.MemUsed == 0 {
		t.Errorf("load: got %+v", l)
	}
}

func TestRestartDelay(t *testing.T) {
	for n, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 5: 16 * time.Second, 6: 30 * time.Second, 50: 30 * time.Second} {
		if got := RestartDelay(n); got != want {
			t.Errorf("RestartDelay(%d): got %v, want %v", n, got, want)
		}
	}
}
