package node

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
	"github.com/pcluster/pcluster/scheduler"
)

// The agent's half of a migration (docs/cluster.md, "Migration protocol").
// The raft state decides at every instant; the wire between the two
// agents only carries the process and hurries things along:
//
//	source                          target
//	step transferring
//	freeze (stopped, not killed) ── stream ──▶ build, not started
//	                                ◀── built ──
//	                                           step committed (one raft entry)
//	wait until its replica shows               wait until its replica shows
//	committed: kill ── commit ──▶              committed: start, step done (a
//	                                           copy waiting for the original's
//	                                           PID: after the wire's commit)
//
// Before the commit any failure aborts (a raft step) and the source
// resumes the original where it was; the source resumes only once its
// replica shows the migration aborted, never on a guess.

// Timeouts of a migration, failure bounds rather than expectations.
const (
	// transferIO bounds each read or write of the stream once it flows.
	transferIO = 30 * time.Second
	// builtWait bounds the source's wait for the target to build the
	// process once the whole snapshot is sent.
	builtWait = 2 * time.Minute
	// commitWait is how long the source waits, once the target said
	// built, for the commit to appear in its replica before it tries to
	// abort (which the state refuses if the commit won).
	commitWait = 30 * time.Second
	// startWait bounds the target's wait for the source's wire commit
	// once its replica shows the raft commit. A copy that still waits for
	// its saved PID (loader's PIDPending) starts only then, once the
	// original holding it is gone; any other starts on the raft commit.
	startWait = 20 * time.Second
)

// doneWait bounds the target's work once the commit is in its replica:
// the start (with the wait for the source's wire commit) and the done
// step. A var for tests.
var doneWait = startWait + 30*time.Second

// errMigrationAborted is the source's decision when the state aborted the
// migration: the original is resumed.
var errMigrationAborted = errors.New("migration aborted")

// departure tells Run that a workload left this node: its process was
// killed after the commit, and its exit must not be reported.
type departure struct {
	wid     string
	attempt int
}

// arrival tells Run that a workload now runs here as a restored process:
// pid is our child, the init of its PID namespace (pidns) or the workload.
type arrival struct {
	wid     string
	attempt int
	pid     int
	pidns   bool
	// report, if set, is queued with Run's reports (pid 0 then: the
	// process arrived already).
	report *api.Report
}

// migration reads migration id from this node's replica.
func (a *Agent) migration(id string) (scheduler.Migration, bool) {
	var m scheduler.Migration
	ok := false
	a.cfg.FSM.Read(func(s *scheduler.State) {
		if p, found := s.Migrations[id]; found {
			m, ok = *p, true
		}
	})
	return m, ok
}

// awaitMigration returns once migration id is in one of the states want
// (or gone: ok false), or ctx ends.
func (a *Agent) awaitMigration(ctx context.Context, id string, want ...scheduler.MigrationState) (scheduler.Migration, bool, error) {
	for {
		changed := a.cfg.FSM.Changed()
		m, ok := a.migration(id)
		if !ok {
			return m, false, nil
		}
		for _, w := range want {
			if m.State == w {
				return m, true, nil
			}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return m, true, context.Cause(ctx)
		}
	}
}

// step writes a migration step through the leader, retrying while the
// cluster cannot answer (no leader), until ctx ends. A refusal by the
// state (an *api.Error 4xx) is returned as is.
func (a *Agent) step(ctx context.Context, st api.MigrationStep) error {
	st.Node = a.cfg.Name
	for {
		st.At = time.Now()
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := a.cfg.Step(rctx, st)
		cancel()
		var ae *api.Error
		if err == nil || errors.As(err, &ae) && ae.Status >= 400 && ae.Status < 500 {
			return err
		}
		a.log.Debug("migration step not delivered; will retry", "migration", st.ID, "to", st.To, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("migration %s: step %s: %w (last: %v)", st.ID, st.To, context.Cause(ctx), err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (a *Agent) tracer() *ptrace.Tracer {
	a.trOnce.Do(func() { a.tr = ptrace.NewTracer() })
	return a.tr
}

// migrateOut carries out migration m as its source: pid is the workload's
// process here, the init of its PID namespace if pidns (the whole
// namespace moves then: a tree freeze of its init). Run starts it once per
// migration; it ends when the migration has ended for this node.
func (a *Agent) migrateOut(ctx context.Context, m scheduler.Migration, pid int, pidns bool) {
	log := a.log.With("migration", m.ID, "workload", m.WorkloadID, "target", m.Target)
	abort := func(why error) {
		log.Warn("migration aborted before the transfer", "err", why)
		err := a.step(ctx, api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationAborted),
			Error: why.Error()})
		if err != nil {
			log.Info("abort not recorded", "err", err)
		}
	}
	if err := a.step(ctx, api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationTransferring)}); err != nil {
		log.Info("migration not started", "err", err)
		return
	}
	// The target checks the transfer against its own replica, which must
	// have come as far as ours (the request names our index).
	cur, ok, err := a.awaitMigration(ctx, m.ID, scheduler.MigrationTransferring, scheduler.MigrationAborted)
	if err != nil || !ok || cur.State != scheduler.MigrationTransferring {
		log.Info("migration ended before the transfer", "state", cur.State, "err", err)
		return
	}
	m = cur
	// Only to the target the state names, over the cluster's mutual TLS.
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	conn, err := a.cfg.DialTarget(dctx, m)
	cancel()
	if err != nil {
		abort(fmt.Errorf("source %s: %w", a.cfg.Name, err))
		return
	}
	// The transfer is cancelled only before the decision, when the state
	// aborts the migration (the leader's timeout, a stop, the target
	// down): past it the process must be killed, not resumed.
	sendCtx, cancelSend := context.WithCancelCause(context.Background())
	defer cancelSend(nil)
	var mu sync.Mutex
	deciding := false
	watchDone := make(chan struct{})
	defer close(watchDone)
	go func() {
		got, _, _ := a.awaitMigration(sendCtx, m.ID, scheduler.MigrationAborted)
		select {
		case <-watchDone:
			return
		default:
		}
		mu.Lock()
		defer mu.Unlock()
		if !deciding && got.State == scheduler.MigrationAborted {
			cancelSend(fmt.Errorf("%w: %s", errMigrationAborted, got.Error))
		}
	}()
	start := time.Now()
	committed := false
	decide := func() error {
		mu.Lock()
		deciding = true
		mu.Unlock()
		c, err := a.decide(m, log)
		committed = c
		return err
	}
	// Once the whole snapshot is sent the target may build the copy and
	// commit it: if this agent dies from then on, its tracer's end must
	// kill the frozen original rather than let it run on as a second copy.
	// The source's reason must reach the state before the target sees the
	// stream end (the target would report its own, "connection closed",
	// and the state keeps the first): Close waits for release.
	// With cgroups the hold outlives the agent instead: the original's
	// cgroup is frozen at the stop, before the first byte sent after it
	// (the pre-copy rounds before it go while the workload runs:
	// capture's Frozen hook: every thread is ptrace-stopped and the
	// capture's injected calls are done; a task of a frozen cgroup that
	// the tracer resumes would drop into the freezer instead of running
	// them), so that whatever happens to this agent the original neither
	// runs on nor dies until the state decides (settleHeld).
	hold := a.holdFor(m, pid, log)
	ac := &armConn{Conn: conn, held: true, arm: func() {
		if hold != nil && hold.frozen.Load() {
			log.Info("snapshot sent; the frozen original is held by its cgroup", "pid", pid)
			return
		}
		if err := a.killWithTracer(pid); err != nil {
			log.Warn("frozen original not bound to this agent's life", "pid", pid, "err", err)
			return
		}
		log.Info("snapshot sent; the frozen original now dies with this agent", "pid", pid)
	}}
	if hold != nil {
		defer a.unhold(m.WorkloadID)
	}
	conn = ac
	var live capture.LiveStats
	sink, err := stream.NewConnSink(sendCtx, conn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: transferIO})
	if err == nil {
		// Live by default: the memory goes while the workload runs; the
		// hook below (cgroup freeze, VIP away) runs only at the final
		// stop, and a failure before it leaves the workload as it was,
		// never stopped.
		err = capture.SendTo(sendCtx, a.tracer(), pid, sink, capture.SendOptions{Halt: true, OtherHost: true, Tree: pidns, TCP: a.movingTCP(m.WorkloadID),
			Codec: stream.Codec{Name: stream.CompressAuto}, ReadyTimeout: builtWait, Decide: decide,
			Unconfirmed: func(why error) error { return a.verdictLost(m, why, log) },
			Live:        !a.cfg.StopAndCopy, LiveOptions: capture.LiveOptions{Stats: &live,
				Notice: func(s string) { log.Info("live migration: " + s) }},
			Frozen: func() {
				if hold != nil {
					hold.freeze()
				}
				a.vips.freeze(m.WorkloadID)
			}})
	}
	if committed {
		ac.release()
		if hold != nil && hold.frozen.Load() {
			// Killed by the capture: thawed so that it can go. Gone
			// already (it died frozen, and Run removed its cgroup once
			// it was reaped): nothing to thaw.
			if err := freeze(hold.dir, false); err != nil && !errors.Is(err, fs.ErrNotExist) {
				log.Warn("thaw the killed original's cgroup", "err", err)
			}
		}
		a.depart(ctx, departure{wid: m.WorkloadID, attempt: m.Attempt})
		a.vips.thaw(m.WorkloadID, "") // gone from here: reconcile keeps it off
		if err != nil {
			// The state moved the workload: the target starts it on its
			// own replica's word, with or without our commit on the wire.
			log.Warn("migration committed; the target did not confirm on the wire", "err", err)
		}
		log.Info("migration committed: workload left this node", "took", time.Since(start).Round(time.Millisecond),
			"rounds", live.Rounds, "precopy_bytes", live.PrecopyBytes, "final_bytes", live.FinalBytes)
		return
	}
	if hold == nil || !hold.frozen.Load() {
		log.Warn("migration failed; workload resumed here", "err", err)
		a.vips.thaw(m.WorkloadID, a.workloadVIP(m.WorkloadID))
	}
	if cur, ok := a.migration(m.ID); ok && cur.State.Active() {
		// Not held past a few seconds: without a leader the abort may
		// wait long, and the target should not hold its half-built copy.
		t := time.AfterFunc(5*time.Second, ac.release)
		abort(err)
		t.Stop()
	}
	ac.release()
	if hold != nil && hold.frozen.Load() {
		a.settleOut(ctx, m, hold, err, log)
	}
}

// verdictLost decides migration m when the source's wait for the
// target's verdict failed (why), capture's Unconfirmed. That wait begins
// once the whole snapshot is written: from then on the target may have
// built the copy and committed it (a link cut after the last byte: its
// "built" is lost, its commit goes through the leader), so the failure
// says nothing of where the workload runs. The source asks the state for
// the abort and obeys its answer. Aborted: why (the capture resumes the
// original). Committed (the target's commit came first, and the abort was
// refused): nil, and decide then has the original killed. Without a
// leader it waits: resuming on a guess could make two copies.
func (a *Agent) verdictLost(m scheduler.Migration, why error, log interface{ Warn(string, ...any) }) error {
	err := a.step(context.Background(), api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationAborted),
		Error: fmt.Sprintf("source %s: %v", a.cfg.Name, why)})
	got, ok, _ := a.awaitMigration(context.Background(), m.ID, scheduler.MigrationAborted, scheduler.MigrationCommitted, scheduler.MigrationDone)
	if ok && got.State != scheduler.MigrationAborted {
		log.Warn("no verdict from the target, but the state has its commit: the original goes", "err", why, "abort", err)
		return nil
	}
	return why
}

// settleOut ends a failed migration whose original the capture let go
// while its cgroup still holds it frozen: the original runs again only
// once the state shows the migration aborted; if the target's commit won
// (the stream failed after the target had it all), it is killed. Without
// an answer before ctx ends it stays frozen for the next agent here.
func (a *Agent) settleOut(ctx context.Context, m scheduler.Migration, hold *cgHold, why error, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}) {
	got, ok, err := a.awaitMigration(ctx, m.ID, scheduler.MigrationAborted, scheduler.MigrationCommitted, scheduler.MigrationDone)
	switch {
	case err != nil:
		log.Warn("migration undecided; the original stays frozen in its cgroup for the next agent", "err", err)
	case ok && got.State != scheduler.MigrationAborted:
		log.Warn("migration failed here but committed by the target: killing the original", "err", why)
		a.depart(ctx, departure{wid: m.WorkloadID, attempt: m.Attempt})
		a.vips.thaw(m.WorkloadID, "") // gone from here
		if err := kill(hold.dir); err != nil {
			log.Warn("kill the original's cgroup", "err", err)
		}
		freeze(hold.dir, false)
	default:
		if err := freeze(hold.dir, false); err != nil {
			log.Warn("thaw the original", "err", err)
			return
		}
		a.vips.thaw(m.WorkloadID, a.workloadVIP(m.WorkloadID))
		log.Warn("migration failed; workload resumed here", "err", why)
	}
}

// cgHold is a migrating original's cgroup, frozen once the process is
// stopped for its capture (capture's Frozen hook).
type cgHold struct {
	dir    string
	log    interface{ Warn(string, ...any) }
	frozen atomic.Bool
}

// freeze freezes the cgroup; on failure the original is held by the
// agent's ptrace alone (armConn's PTRACE_O_EXITKILL).
func (h *cgHold) freeze() {
	if err := freeze(h.dir, true); err != nil {
		h.log.Warn("original's cgroup not frozen: held by this agent's ptrace alone", "err", err)
		return
	}
	h.frozen.Store(true)
}

// holdFor returns the hold of migration m's original, pid: its cgroup,
// into which an original that is not there yet (adopted from an agent
// without cgroups) is moved first; nil without cgroups.
func (a *Agent) holdFor(m scheduler.Migration, pid int, log interface{ Warn(string, ...any) }) *cgHold {
	if a.cg == nil {
		return nil
	}
	if !a.cg.holds(m.WorkloadID, m.Attempt, pid) {
		if err := a.cg.place(m.WorkloadID, m.Attempt, pid); err != nil {
			log.Warn("original not in a cgroup: held by this agent's ptrace alone", "err", err)
			return nil
		}
	}
	a.mu.Lock()
	a.holding[m.WorkloadID] = m.Attempt
	a.mu.Unlock()
	return &cgHold{dir: a.cg.dir(m.WorkloadID, m.Attempt), log: log}
}

func (a *Agent) unhold(wid string) {
	a.mu.Lock()
	delete(a.holding, wid)
	a.mu.Unlock()
}

// armConn calls arm when the sink begins to wait for the receiver's
// verdict, right after the last byte of the snapshot: the second read
// that follows writes (the stream's wire, migrate/stream: our greeting,
// the receiver's greeting, the snapshot, the receiver's verdict).
// TestMigrateFaults's kill-source trials fail if it is not called.
type armConn struct {
	net.Conn
	arm   func()
	wrote atomic.Bool
	turns atomic.Int32

	mu   sync.Mutex
	held bool // Close is put off until release
}

// Close closes the connection, unless it is held: then it only ends
// every read and write under way (the sink's Abort closes to unblock
// them), and release closes.
func (c *armConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held {
		c.Conn.SetDeadline(time.Unix(1, 0))
		return nil
	}
	return c.Conn.Close()
}

// release closes the connection and lets Close close it from now on.
func (c *armConn) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held = false
	c.Conn.Close()
}

func (c *armConn) Write(p []byte) (int, error) {
	c.wrote.Store(true)
	return c.Conn.Write(p)
}

func (c *armConn) Read(p []byte) (int, error) {
	if c.wrote.Swap(false) && c.turns.Add(1) == 2 {
		c.arm()
	}
	return c.Conn.Read(p)
}

// abandonOut aborts migration m, transferring from this node but not
// carried out by this agent: an earlier agent here began it and died. Its
// tracer is gone, so the original is no longer frozen here (it runs on,
// or it was killed with the tracer), and no one would ever write the
// decision but the leader's timeout (minutes, during which the workload
// cannot move). The state refuses the abort if the target's commit came
// first.
func (a *Agent) abandonOut(ctx context.Context, m scheduler.Migration) {
	err := a.step(ctx, api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationAborted),
		Error: fmt.Sprintf("source %s: its agent restarted during the transfer", a.cfg.Name)})
	if err != nil {
		a.log.Info("abandoned migration's abort not recorded", "migration", m.ID, "err", err)
		return
	}
	a.log.Warn("migration abandoned: this node's agent restarted during the transfer", "migration", m.ID, "workload", m.WorkloadID)
}

// killWithTracer makes the kernel kill every thread of pid, frozen by
// this agent's tracer, if the tracer dies (PTRACE_O_EXITKILL; when pid is
// the init of a PID namespace, its end kills the whole namespace): a source
// agent that dies once the target has built the copy leaves no original
// that resumes when its tracer goes. Should the abort win instead, the
// workload ends and its end is reported by the next agent (its restart
// policy applies): none, reported, rather than two. The resume detaches,
// which drops the option.
func (a *Agent) killWithTracer(pid int) error {
	return a.tracer().Do(func() error {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return fmt.Errorf("threads of pid %d: %w", pid, err)
		}
		for _, e := range tasks {
			tid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			// TRACESYSGOOD kept: the capture seized it so (a call
			// through a sigreturn frame needs it).
			if err := ptrace.SetOptions(tid, unix.PTRACE_O_EXITKILL|unix.PTRACE_O_TRACESYSGOOD); err != nil {
				return fmt.Errorf("thread %d of pid %d: PTRACE_O_EXITKILL: %w", tid, pid, err)
			}
		}
		return nil
	})
}

// decide waits for the raft state to decide migration m once the target
// has built the process: committed (nil: kill the original) or aborted
// (an error: resume it). Past commitWait it asks for the abort itself,
// which the state refuses if the commit came first. Without a leader it
// waits: resuming on a guess could make two copies.
func (a *Agent) decide(m scheduler.Migration, log interface{ Info(string, ...any) }) (bool, error) {
	deadline := time.Now().Add(commitWait)
	for {
		wctx, cancel := context.WithDeadline(context.Background(), deadline)
		got, ok, _ := a.awaitMigration(wctx, m.ID, scheduler.MigrationCommitted, scheduler.MigrationDone, scheduler.MigrationAborted)
		cancel()
		switch {
		case !ok:
			return false, fmt.Errorf("migration %s: gone from the state", m.ID)
		case got.State == scheduler.MigrationCommitted || got.State == scheduler.MigrationDone:
			return true, nil
		case got.State == scheduler.MigrationAborted:
			return false, fmt.Errorf("%w: %s", errMigrationAborted, got.Error)
		}
		log.Info("no commit yet; asking for the abort", "waited", commitWait)
		err := a.step(context.Background(), api.MigrationStep{ID: m.ID, Attempt: m.Attempt,
			To: string(scheduler.MigrationAborted), Error: fmt.Sprintf("no commit within %v of the target's build", commitWait)})
		if err != nil {
			log.Info("abort refused; waiting for the state", "err", err)
		}
		deadline = time.Now().Add(commitWait)
	}
}

// depart hands a departure to Run.
func (a *Agent) depart(ctx context.Context, d departure) {
	select {
	case a.departures <- d:
	case <-a.done:
	case <-ctx.Done():
	}
}

// AwaitIndex returns once this node's replica has applied raft index idx,
// or ctx ends.
func (a *Agent) AwaitIndex(ctx context.Context, idx uint64) error {
	for {
		changed := a.cfg.FSM.Changed()
		var at uint64
		a.cfg.FSM.Read(func(s *scheduler.State) { at = s.Index })
		if at >= idx {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("replica at raft index %d, the request's is %d: %w", at, idx, context.Cause(ctx))
		}
	}
}

// CheckIncoming says whether this node accepts the transfer of migration
// id at attempt: its replica must show it planned or transferring, to this
// node. The cluster's mutual TLS proved the peer holds the cluster key; the
// migration id and attempt from the state bind the transfer to one move.
func (a *Agent) CheckIncoming(id string, attempt int) error {
	m, ok := a.migration(id)
	if !ok {
		return fmt.Errorf("migration %s: %w", id, scheduler.ErrNotFound)
	}
	switch {
	case m.Target != a.cfg.Name:
		return fmt.Errorf("migration %s goes to %s, not to this node (%s): %w", id, m.Target, a.cfg.Name, scheduler.ErrRefused)
	case m.Attempt != attempt:
		return fmt.Errorf("migration %s: attempt %d, the state's is %d: %w", id, attempt, m.Attempt, scheduler.ErrStale)
	case m.State != scheduler.MigrationPlanned && m.State != scheduler.MigrationTransferring:
		return fmt.Errorf("migration %s is %s: %w", id, m.State, scheduler.ErrStale)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.incoming[m.WorkloadID] != "" {
		return fmt.Errorf("migration %s: workload %s is already arriving: %w", id, m.WorkloadID, scheduler.ErrRefused)
	}
	return nil
}

// Receive carries out migration id as its target on conn, a mutual-TLS
// connection from the source agent: it builds the process without starting
// it, says built, writes the commit, and starts the process once its own
// replica shows the commit (with or without the source's commit on the
// wire). It returns when the migration has ended for this node.
func (a *Agent) Receive(ctx context.Context, conn net.Conn, id string, attempt int) error {
	if err := a.CheckIncoming(id, attempt); err != nil {
		conn.Close()
		return err
	}
	m, _ := a.migration(id)
	a.mu.Lock()
	a.incoming[m.WorkloadID] = m.ID
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.incoming, m.WorkloadID)
		a.mu.Unlock()
	}()
	log := a.log.With("migration", m.ID, "workload", m.WorkloadID, "source", m.Source)
	var committing bool
	err := a.receive(ctx, conn, m, log, &committing)
	if err != nil {
		log.Warn("incoming migration failed", "err", err)
	}
	if err != nil && !committing {
		// What was built is removed: say so in the state, so that the
		// source resumes the original now rather than when its own wait
		// for our verdict ends (builtWait) if the link between us is cut.
		// Refused, harmlessly, if the migration has ended already.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		serr := a.step(sctx, api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationAborted),
			Error: fmt.Sprintf("target %s: %v", a.cfg.Name, err)})
		cancel()
		if serr != nil {
			log.Info("abort not recorded", "err", serr)
		}
	}
	return err
}

// receive sets *committing before it writes the commit: from then on a
// failure is not an abort.
func (a *Agent) receive(ctx context.Context, conn net.Conn, m scheduler.Migration, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}, committing *bool) error {
	// Cancelled when the state aborts the migration while we build.
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		got, ok, err := a.awaitMigration(rctx, m.ID, scheduler.MigrationAborted, scheduler.MigrationCommitted)
		if err == nil && (!ok || got.State == scheduler.MigrationAborted) {
			cancel(fmt.Errorf("%w: %s", errMigrationAborted, got.Error))
		}
	}()
	counted := &countConn{Conn: conn}
	src, err := stream.NewConnSource(rctx, counted, stream.SourceOptions{Authenticated: true, ReadTimeout: transferIO})
	if err != nil {
		return fmt.Errorf("migration %s: %w", m.ID, err)
	}
	defer src.Close()
	stop := context.AfterFunc(rctx, func() { src.Close() })
	defer stop()
	stdio, err := a.logFiles(m.WorkloadID)
	if err != nil {
		src.Ready(err)
		return fmt.Errorf("migration %s: %w", m.ID, err)
	}
	a.markLogStart(m.WorkloadID, m.Attempt+1, stdio[1], stdio[2]) // the attempt the commit gives it
	defer func() {
		for _, f := range stdio {
			f.Close()
		}
	}()
	body, h, err := stream.NewReader(src, stream.ReaderOptions{})
	if err != nil {
		src.Ready(err)
		return fmt.Errorf("migration %s: %w", m.ID, err)
	}
	defer body.Close()
	dec := loader.NewDecoder(body, h)
	// A workload that runs as a PID namespace of its own moves as one: a
	// new namespace here gets the saved numbers back, its init first.
	var nsPid int
	a.cfg.FSM.Read(func(s *scheduler.State) {
		if w, ok := s.Workloads[m.WorkloadID]; ok {
			nsPid = w.NSPID
		}
	})
	pidns := nsPid > 0
	// Detach: the process outlives this agent (the next one adopts it);
	// no parent-death signal. Stdio: our own log files.
	p, err := loader.Build(rctx, a.tracer(), dec, loader.Options{Detach: true, Stdio: stdio, StdioFiles: true,
		PIDNamespace: pidns, Notice: func(s string) { log.Info("restore: " + s) }})
	if err == nil {
		if err = dec.ExpectEOF(); err != nil {
			p.Abort()
		}
	}
	if err != nil {
		src.Ready(err)
		return fmt.Errorf("migration %s: %w", m.ID, err)
	}
	if err := src.Ready(nil); err != nil {
		p.Abort()
		return fmt.Errorf("migration %s: %w", m.ID, err)
	}
	*committing = true
	// The commit: one raft entry moves the workload here. Retried while
	// there is no leader; the state's answer, not ours, decides.
	pre := p.Precopy()
	err = a.step(rctx, api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationCommitted),
		Bytes: counted.n.Load(), Rounds: pre.Rounds, PrecopyBytes: int64(pre.Bytes), StoppedAt: pre.StoppedAt})
	got, ok, werr := a.awaitMigration(context.Background(), m.ID, scheduler.MigrationCommitted, scheduler.MigrationDone, scheduler.MigrationAborted)
	if werr != nil || !ok || got.State == scheduler.MigrationAborted {
		p.Abort()
		return fmt.Errorf("migration %s: not committed (%v): %s: half-built process removed", m.ID, err, got.Error)
	}
	stop()
	// Committed: from here on the process is the workload, and an agent
	// shutting down must still start it and record its PID (the next
	// agent adopts it then).
	ctx, cancelPost := context.WithTimeout(context.WithoutCancel(ctx), doneWait)
	defer cancelPost()
	// The source kills its copy and tells us on the wire. The state's
	// commit, not that word, lets the copy start: the original is frozen
	// in its cgroup on another host, its virtual IP gone, its moving TCP
	// connections silent in repair mode, its logs and status file that
	// host's; the two end and begin each on the commit, not one after the
	// other (docs/cluster.md, "Migration protocol"). Only a copy that
	// still waits for its saved PID, which the original holds (hosts that
	// share a PID namespace, a workload that is not one of its own),
	// waits for the kill, and without the source's word (cut off, dead)
	// starts once startWait has passed.
	if p.PIDPending() {
		if err := src.AwaitCommit(startWait); err != nil {
			log.Warn("no commit from the source on the wire; starting on the state's word", "err", err)
		}
	} else {
		// Read, and acknowledged, while the copy starts.
		wire := make(chan error, 1)
		go func() { wire <- src.AwaitCommit(startWait) }()
		defer func() {
			if err := <-wire; err != nil {
				log.Info("no commit from the source on the wire; started on the state's word", "err", err)
			}
		}()
	}
	attempt := m.Attempt + 1
	a.mu.Lock()
	a.claimed[m.WorkloadID] = attempt
	a.mu.Unlock()
	stopped, vip := false, ""
	a.cfg.FSM.Read(func(s *scheduler.State) {
		w, ok := s.Workloads[m.WorkloadID]
		stopped = !ok || w.Desired == scheduler.DesiredStopped
		if ok {
			vip = w.VIP
		}
	})
	if stopped {
		// Stopped after the commit: the copy is never started.
		p.Abort()
		a.arrive(ctx, arrival{wid: m.WorkloadID, attempt: attempt})
		a.queueExit(exitEvent{wid: m.WorkloadID, attempt: attempt, code: -1,
			msg: fmt.Sprintf("stopped during migration %s: not started on %s", m.ID, a.cfg.Name), at: time.Now()})
		return nil
	}
	if a.cg != nil {
		// In its own cgroup before it runs, like a workload started here:
		// what holds it when it moves on. Should this agent die before
		// the start is recorded, the next finds it there (lostArrival).
		if err := a.cg.place(m.WorkloadID, attempt, p.Pids()...); err != nil {
			log.Warn("restored process left outside its cgroup", "err", err)
		}
	}
	if vip != "" {
		// Before the start, which binds the restored sockets to it; a
		// failure is logged, and reconcile tries again. Announced only
		// once they are bound (addSilent).
		if err := a.vips.addSilent(m.WorkloadID, vip); err != nil {
			log.Warn("virtual IP not added before the start", "err", err)
		}
	}
	a.clearStatus(m.WorkloadID)
	err = p.Start()
	if vip != "" {
		a.vips.announce(vip)
	}
	if err != nil {
		// Committed and lost before it ran (workload-lost): its
		// restart policy applies, else the workload is lost.
		a.arrive(ctx, arrival{wid: m.WorkloadID, attempt: attempt})
		a.queueExit(exitEvent{wid: m.WorkloadID, attempt: attempt, code: -1, lost: true,
			msg: fmt.Sprintf("migration %s: restored process did not start: %v", m.ID, err), at: time.Now()})
		return fmt.Errorf("migration %s: %w", m.ID, err)
	}
	pid, watched, initPid := p.Pid(), p.WaitPid(), 0
	if pidns {
		// The namespace's init is our child; the program is its child
		// with its saved PID there.
		initPid = watched
		if pid = nsChild(initPid, nsPid); pid == 0 {
			pid = initPid // ended already: its end is on its way
		}
	}
	a.arrive(ctx, arrival{wid: m.WorkloadID, attempt: attempt, pid: watched, pidns: pidns})
	ticks, _ := startTicks(watched)
	log.Info("migrated workload started here", "pid", pid, "init", initPid)
	err = a.step(ctx, api.MigrationStep{ID: m.ID, Attempt: m.Attempt, To: string(scheduler.MigrationDone),
		PID: pid, StartTicks: ticks, InitPID: initPid})
	var ae *api.Error
	if err != nil && !errors.As(err, &ae) {
		// Not delivered in time (no leader): the start must still reach
		// the state, or the migration stays committed and the workload at
		// PID 0 for good. Run's reports are retried for the agent's life,
		// and the state takes the started report for the done step.
		log.Warn("done step not delivered; the start goes as a report", "err", err)
		a.arrive(context.Background(), arrival{wid: m.WorkloadID, attempt: attempt, report: &api.Report{Kind: api.ReportStarted,
			ID: m.WorkloadID, Node: a.cfg.Name, Attempt: attempt, PID: pid, StartTicks: ticks, NSPID: nsPid, InitPID: initPid, At: time.Now()}})
		return nil
	}
	if err != nil {
		return fmt.Errorf("migration %s: started as pid %d; done not recorded: %w", m.ID, pid, err)
	}
	return nil
}

// countConn counts the bytes read from a connection.
type countConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// logFiles opens the workload's stdin (/dev/null) and its log files here,
// as spawn does: after a move the output goes to this node's logs.
func (a *Agent) logFiles(wid string) ([3]*os.File, error) {
	var out [3]*os.File
	outPath, err := a.LogPath(wid, "stdout")
	if err != nil {
		return out, err
	}
	errPath, _ := a.LogPath(wid, "stderr")
	if err := os.MkdirAll(filepath.Dir(outPath), 0o700); err != nil {
		return out, fmt.Errorf("logs of %s: %w", wid, err)
	}
	files := []struct {
		path string
		flag int
	}{{os.DevNull, os.O_RDONLY}, {outPath, os.O_WRONLY | os.O_CREATE | os.O_APPEND}, {errPath, os.O_WRONLY | os.O_CREATE | os.O_APPEND}}
	for i, f := range files {
		fh, err := os.OpenFile(f.path, f.flag, 0o600)
		if err != nil {
			for _, o := range out[:i] {
				o.Close()
			}
			return [3]*os.File{}, fmt.Errorf("logs of %s: %w", wid, err)
		}
		out[i] = fh
	}
	return out, nil
}

// arrive hands an arrival to Run and waits until Run took it.
func (a *Agent) arrive(ctx context.Context, ar arrival) {
	select {
	case a.arrivals <- ar:
	case <-a.done:
	case <-ctx.Done():
	}
}

// queueExit hands an exit to Run.
func (a *Agent) queueExit(ev exitEvent) {
	select {
	case a.exits <- ev:
	case <-a.done:
	}
}
