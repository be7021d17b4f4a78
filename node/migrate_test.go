package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// migLab is two agents, a (source) and b (target), on one fake leader,
// migrating over loopback TCP: the cluster's protocol without raft, TLS
// or network namespaces, so that a fault can be put at an exact point of
// the wire.
type migLab struct {
	t      *testing.T
	l      *fakeLeader
	a, b   *Agent
	logs   *syncBuffer
	ln     net.Listener
	wrap   func(net.Conn) net.Conn // the source's end of each transfer
	recvWG sync.WaitGroup
	mu     sync.Mutex
	served []net.Conn
}

// step is the leader's side of Config.Step.
func (l *fakeLeader) step(_ context.Context, st api.MigrationStep) error {
	err := l.apply(scheduler.CmdMigrationStep, &scheduler.MigrationStepCmd{ID: st.ID, Attempt: st.Attempt, Node: st.Node,
		To: scheduler.MigrationState(st.To), Error: st.Error, PID: st.PID, StartTicks: st.StartTicks, InitPID: st.InitPID,
		Bytes: st.Bytes, Rounds: st.Rounds, PrecopyBytes: st.PrecopyBytes, At: st.At.UnixNano()})
	if errors.Is(err, scheduler.ErrStale) {
		return &api.Error{Status: 409, Message: err.Error()}
	}
	return err
}

func (l *fakeLeader) migration(id string) scheduler.Migration {
	var m scheduler.Migration
	l.fsm.Read(func(s *scheduler.State) {
		if p := s.Migrations[id]; p != nil {
			m = *p
		}
	})
	return m
}

// newMigLab starts agents a and b; cgroups says whether the source puts
// its workloads in cgroups (without, its ptrace alone holds a migrating
// original).
func newMigLab(t *testing.T, cgroups bool) *migLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace, PID namespaces")
	}
	ml := &migLab{t: t, l: &fakeLeader{fsm: scheduler.NewFSM()}, logs: &syncBuffer{}}
	for _, n := range []string{"a", "b"} {
		if err := ml.l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: n}}); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ml.ln = ln
	logger := slog.New(slog.NewTextHandler(ml.logs, nil))
	cfg := func(name string) Config {
		return Config{Name: name, DataDir: t.TempDir(), FSM: ml.l.fsm, Report: ml.l.report, Step: ml.l.step,
			StopTimeout: 2 * time.Second, Logger: logger.With("node", name), DialTarget: ml.dial}
	}
	ac := cfg("a")
	ac.Cgroups = cgroups
	ml.a, ml.b = New(ac), New(cfg("b"))
	stopA, stopB := startRun(ml.a), startRun(ml.b)
	go ml.serve()
	t.Cleanup(func() {
		ln.Close()
		// Every process the agents watch (a namespace's init: its end
		// ends the namespace), whatever the state recorded.
		var inits []int
		for _, ag := range []*Agent{ml.a, ml.b} {
			ag.mu.Lock()
			for _, p := range ag.procs {
				inits = append(inits, p.pid)
			}
			ag.mu.Unlock()
		}
		stopA()
		stopB()
		for _, pid := range inits {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		ml.mu.Lock()
		for _, c := range ml.served {
			c.Close()
		}
		ml.mu.Unlock()
		ml.recvWG.Wait()
	})
	return ml
}

// serve hands every transfer connection to b: the first line names the
// migration and its attempt (the cluster's transfer request).
func (ml *migLab) serve() {
	for {
		c, err := ml.ln.Accept()
		if err != nil {
			return
		}
		ml.mu.Lock()
		ml.served = append(ml.served, c)
		ml.mu.Unlock()
		ml.recvWG.Add(1)
		go func() {
			defer ml.recvWG.Done()
			var id string
			var attempt int
			buf := make([]byte, 64)
			n := 0
			for n < len(buf) {
				k, err := c.Read(buf[n : n+1])
				if err != nil {
					c.Close()
					return
				}
				n += k
				if buf[n-1] == '\n' {
					break
				}
			}
			if _, err := fmt.Sscanf(string(buf[:n]), "%s %d\n", &id, &attempt); err != nil {
				c.Close()
				return
			}
			ml.b.Receive(context.Background(), c, id, attempt)
		}()
	}
}

func (ml *migLab) dial(ctx context.Context, m scheduler.Migration) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", ml.ln.Addr().String())
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "%s %d\n", m.ID, m.Attempt); err != nil {
		c.Close()
		return nil, err
	}
	if ml.wrap != nil {
		return ml.wrap(c), nil
	}
	return c, nil
}

// run starts workload id (sleep) on a and returns it running.
func (ml *migLab) run(id string) scheduler.Workload {
	ml.t.Helper()
	err := ml.l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: id,
		Command: "sleep", Args: []string{"1000"}, UID: -1, GID: -1, DesiredNode: "a"}})
	if err != nil {
		ml.t.Fatal(err)
	}
	w := ml.l.wait(ml.t, id, scheduler.StateRunning)
	ml.t.Cleanup(func() {
		if w.InitPID > 0 {
			syscall.Kill(w.InitPID, syscall.SIGKILL)
		}
		if got := ml.l.get(id); got.InitPID > 0 && got.InitPID != w.InitPID {
			syscall.Kill(got.InitPID, syscall.SIGKILL)
		}
	})
	return w
}

// migrate plans the move of id from a to b.
func (ml *migLab) migrate(id string) scheduler.Migration {
	ml.t.Helper()
	if err := ml.l.apply(scheduler.CmdMigrationPlan, &scheduler.MigrationPlanCmd{WorkloadID: id, Target: "b",
		At: time.Now().UnixNano()}); err != nil {
		ml.t.Fatal(err)
	}
	var m scheduler.Migration
	ml.l.fsm.Read(func(s *scheduler.State) {
		if a := s.ActiveMigration(id); a != nil {
			m = *a
		}
	})
	return m
}

func (ml *migLab) waitLogged(what string, f func() bool) {
	ml.t.Helper()
	waitLogged(ml.t, ml.logs, what, f)
}

// alive says whether pid runs (neither gone nor a zombie).
func alive(pid int) bool {
	st := procStateOf(pid)
	return st != 0 && st != 'Z' && st != 'X'
}

// cutAfterSnapshot is the source's end of a link cut once the whole
// snapshot is written: the target's "built" never arrives, and the read
// fails once the state shows the commit (so the target certainly built
// and committed the copy: the worst moment).
type cutAfterSnapshot struct {
	net.Conn
	committed func() bool
	wrote     atomic.Bool
	turns     atomic.Int32
}

func (c *cutAfterSnapshot) Write(p []byte) (int, error) {
	c.wrote.Store(true)
	if c.turns.Load() >= 2 {
		return len(p), nil // into the void
	}
	return c.Conn.Write(p)
}

func (c *cutAfterSnapshot) Read(p []byte) (int, error) {
	// The second read after writes is the wait for the verdict (armConn).
	if c.wrote.Swap(false) && c.turns.Add(1) == 2 || c.turns.Load() >= 2 {
		for deadline := time.Now().Add(30 * time.Second); !c.committed() && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		return 0, syscall.ECONNRESET
	}
	return c.Conn.Read(p)
}

// TestMigrateCutAfterSnapshot: the link between source and target is cut
// once the whole snapshot is sent; the target builds the copy and
// commits; the source's end of the stream then fails. Without cgroups
// (the source's ptrace alone holds the original) the source must not
// resume the original on that failure: the state says committed, so it
// kills it. One copy runs: the target's.
func TestMigrateCutAfterSnapshot(t *testing.T) {
	ml := newMigLab(t, false)
	w := ml.run("w1")
	var mid string
	var midMu sync.Mutex
	ml.wrap = func(c net.Conn) net.Conn {
		return &cutAfterSnapshot{Conn: c, committed: func() bool {
			midMu.Lock()
			defer midMu.Unlock()
			st := ml.l.migration(mid).State
			return st == scheduler.MigrationCommitted || st == scheduler.MigrationDone
		}}
	}
	midMu.Lock()
	m := ml.migrate(w.ID)
	mid = m.ID
	midMu.Unlock()
	ml.waitLogged("the migration to end on the source", func() bool {
		s := ml.logs.String()
		return strings.Contains(s, "workload left this node") || strings.Contains(s, "workload resumed here")
	})
	got := ml.l.migration(m.ID)
	if got.State != scheduler.MigrationCommitted && got.State != scheduler.MigrationDone {
		t.Fatalf("migration %s: %s (%s), want committed or done (the target built and committed)", m.ID, got.State, got.Error)
	}
	ml.waitLogged("the original to die", func() bool { return !alive(w.InitPID) })
	ml.waitLogged("the target's copy to run", func() bool {
		nw := ml.l.get(w.ID)
		return nw.Node == "b" && nw.InitPID > 0 && alive(nw.InitPID)
	})
}

// TestMigrateDoneLost: the target starts the copy after the commit, but
// its done step cannot be written (no leader) for longer than the
// target's bound on it. The start still reaches the state, as an ordinary
// started report retried for the agent's life, which ends the migration
// as done would; a migration left committed forever would keep the
// workload from ever moving again, from checkpoints and from the fence,
// and a drain of the source from completing.
func TestMigrateDoneLost(t *testing.T) {
	defer func(d time.Duration) { doneWait = d }(doneWait)
	doneWait = 2 * time.Second
	ml := newMigLab(t, true)
	step := ml.a.cfg.Step
	noDone := func(ctx context.Context, st api.MigrationStep) error {
		if st.To == string(scheduler.MigrationDone) {
			return errors.New("no cluster leader") // what the API says without one
		}
		return step(ctx, st)
	}
	ml.a.cfg.Step, ml.b.cfg.Step = noDone, noDone
	w := ml.run("w1")
	m := ml.migrate(w.ID)
	ml.waitLogged("the copy's start to be recorded", func() bool {
		nw := ml.l.get(w.ID)
		return nw.Node == "b" && nw.PID > 0 && ml.l.migration(m.ID).State == scheduler.MigrationDone
	})
	if nw := ml.l.get(w.ID); !alive(nw.InitPID) || alive(w.InitPID) {
		t.Errorf("after the move: the copy (init %d) alive %v, the original (init %d) alive %v; want only the copy",
			nw.InitPID, alive(nw.InitPID), w.InitPID, alive(w.InitPID))
	}
}
