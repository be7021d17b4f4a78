// Package node is the host-local agent. It starts the workloads the
// replicated state assigns to this host as its own children, each a PID
// namespace of its own under a small init (init_linux.go), keeps their
// stdout/stderr in log files under the data dir, reports their PIDs and
// exit statuses (which the leader records in raft), stops them when asked,
// and samples the host's load. It restarts nothing by itself: restarts are
// decided by the state from the workload's restart policy.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/scheduler"
)

// DefaultPath is the PATH workloads get unless their env sets one.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// RestartDelay is how long after the previous attempt ended restart number
// n (1, 2, ...) starts: 1 s, doubling up to 30 s, so that a crash loop does
// not flood the raft log.
func RestartDelay(n int) time.Duration {
	d := time.Second
	for i := 1; i < n && d < 30*time.Second; i++ {
		d *= 2
	}
	return min(d, 30*time.Second)
}

// Config configures an Agent.
type Config struct {
	Name    string         // this node's name in the state
	DataDir string         // logs go to DataDir/workloads/ID/
	FSM     *scheduler.FSM // this node's replica of the state
	// Report delivers a report to the leader. It is retried until it
	// returns nil or an *api.Error with a 4xx status.
	Report func(context.Context, api.Report) error
	// Step writes a migration step through the leader (node/migrate.go).
	Step func(context.Context, api.MigrationStep) error
	// DialTarget opens the transfer of migration m to its target's agent:
	// a mutual-TLS connection to the node the state names as target, on
	// which that agent has accepted the migration (Agent.Receive).
	DialTarget func(ctx context.Context, m scheduler.Migration) (net.Conn, error)
	// Sync returns the raft index the leader's state has applied once
	// every entry committed before the call has been (a barrier on the
	// leader); an error when there is no leader. The agent acts on its
	// replica (starts, adopts, migrates, stops, reports what it finds)
	// only once the replica has applied that index, learned after the
	// agent's start and after every change of leader, and never while
	// Leader says there is none: a replica that is behind (a restarted
	// daemon replays its log from an old state) would have it start a
	// workload that has moved away. Nil: the replica is always current.
	Sync   func(context.Context) (uint64, error)
	Leader func() string // the leader's name, "" when there is none
	// Cgroups puts every workload in a cgroup v2 of its own
	// (node/cgroup_linux.go), which holds a migrating original beyond
	// this agent's life. Without a usable cgroup v2 the agent says so in
	// one log line and goes on without.
	Cgroups     bool
	Logger      *slog.Logger
	StopTimeout time.Duration // SIGTERM to SIGKILL; default 10s
	// Checkpoint delivers a checkpoint report to the leader
	// (node/checkpoint.go); for a taken one the answer holds its sequence
	// number and the nodes chosen for its copies. Nil: no checkpoints.
	Checkpoint func(context.Context, api.CheckpointReport) (api.Checkpoint, error)
	// PushCheckpoint sends the file of checkpoint cp to node target's
	// agent over the cluster's mutual TLS (Agent.ReceiveCheckpoint there).
	PushCheckpoint func(ctx context.Context, target string, cp api.Checkpoint, f *os.File) error
	// CheckpointKey encrypts checkpoint files at rest (stream.KeySize
	// bytes, derived from the cluster key).
	CheckpointKey []byte
	// CheckpointReserve is the free space (bytes) a checkpoint must leave
	// on the data directory's filesystem; 0: no check.
	CheckpointReserve uint64
	// VIPInterface carries the workloads' virtual IPs; "": the interface
	// whose subnet holds each (node/vip.go).
	VIPInterface string
	// FenceAfter: once Contact is older than this, the node counts as cut
	// off from the raft majority and the agent fences it (node/fence.go):
	// it freezes the workloads a failover could bring back elsewhere.
	// 0: no fencing.
	FenceAfter time.Duration
	// Contact returns when this node was last in contact with the raft
	// majority: now while it leads, else its last contact with a leader.
	Contact func() time.Time
	// StopAndCopy moves workloads stopped for the whole transfer, as
	// before live migration (pclusterd -migrate-live=false). By default a
	// migration copies the workload's memory while it runs, in rounds
	// (capture.LiveOptions), and stops it only for the last.
	StopAndCopy bool
	// Watchdog (with FenceAfter and cgroups): the agent starts a fence
	// watchdog that freezes what the fence covers if the agent dies and
	// no new one takes over within FenceAfter of its last contact
	// (node/watchdog_linux.go). The program must call WatchdogMain first
	// when IsWatchdog.
	Watchdog bool
}

// proc is one workload process this agent watches.
type proc struct {
	id      string
	attempt int
	// pid is the process this agent watches, signals and moves: the
	// init of the workload's PID namespace (pidns), or the workload
	// itself for one started by an agent from before namespaces.
	pid      int
	pidns    bool
	adopted  bool // found running at agent start: not our child
	stopping bool
	killAt   time.Time
	relisted uint64 // ModifyIndex at which a lost record was re-reported
}

type exitEvent struct {
	attempt     int
	wid         string
	code        int
	signal, msg string
	at          time.Time
	// lost: the attempt never ran (a restored process that could not be
	// started after the commit): reported lost, not exited.
	lost bool
}

// Agent supervises this node's workloads. Run owns all of its fields.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	exits chan exitEvent
	done  <-chan struct{} // Run's ctx.Done, set before any waiter starts

	// mu guards procs, read by Workloads from other goroutines, and
	// incoming and claimed, written by Receive.
	mu      sync.Mutex
	procs   map[string]*proc
	started map[string]int // highest attempt started per workload
	pending []api.Report   // reports not yet accepted by the leader
	wg      sync.WaitGroup // poll goroutines of adopted processes

	// incoming maps a workload arriving by migration to the migration;
	// claimed, to the attempt its restored process runs as until Run
	// takes the arrival: reconcile must neither adopt nor start it.
	incoming map[string]string
	claimed  map[string]int
	// outgoing holds the migrations this node carries out as source (Run
	// only); moved, the attempt of each workload that left this node,
	// whose killed process's exit is not reported (Run only).
	outgoing   map[string]bool
	moved      map[string]int
	departures chan departure
	arrivals   chan arrival

	outWG  sync.WaitGroup // migrateOut goroutines
	trOnce sync.Once
	tr     *ptrace.Tracer // the one owner of this agent's ptrace calls

	// cg is this node's pcluster cgroup, nil without (set before Run).
	cg *cgroups
	// holding maps the workloads whose cgroup a migrateOut of this agent
	// may freeze to their attempt: settleHeld leaves them to it (mu).
	holding map[string]int
	// syncedWith is the leader the replica was last found behind of, and
	// syncIndex the index it must reach (Run only); retrySync, when to
	// ask again after a failure.
	syncedWith string
	syncIndex  uint64
	retrySync  time.Time

	vips *vips // the virtual IPs this node carries (node/vip.go)

	// usageMu guards usage: each workload's previous CPU reading
	// (node/usage_linux.go).
	usageMu sync.Mutex
	usage   map[string]usageSample
	// ckpting holds the workloads with a checkpoint under way (mu);
	// ckptSwept is when Run last swept the checkpoint files; born, when
	// this agent was made (unfinished files older than it are an earlier
	// agent's).
	ckpting      map[string]bool
	ckptSwept    time.Time
	born         time.Time
	ckptFailures atomic.Int64
	// ckptPushAt: when each copy (workload/seq/target) may be pushed
	// again by repairCopies (Run only).
	ckptPushAt map[string]time.Time
	// cutOff: the node is out of contact with the majority for longer
	// than FenceAfter (fenceLoop writes it); fenced: the attempt of each
	// workload whose cgroup the fence froze, until reconcile settles it;
	// capturing: the workloads a checkpoint is capturing now, which the
	// fence leaves until the capture ends (and a fenced one is not
	// captured). All three under mu.
	cutOff    bool
	fenced    map[string]int
	capturing map[string]bool
	// leaseOwner: this agent's token in the fence lease; leaseErr: a
	// failed renewal was logged (fenceLoop only, once started).
	leaseOwner string
	leaseErr   bool
	// leaseIdx: the replica's index the last lease was written from.
	leaseIdx atomic.Uint64
	// inherited: the cgroups the previous agent's lease listed, which the
	// fence covers too until the replica is current for the first time
	// (a restarted daemon's replica is its last snapshot until a leader
	// speaks to it). Under mu.
	inherited []leaseCgroup
}

// New returns an agent; call Run to start it. The agent starts each
// workload's init by re-executing its own program (/proc/self/exe) as
// InitName: that program's main must call InitMain first when IsInit.
func New(cfg Config) *Agent {
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &Agent{
		cfg: cfg, log: cfg.Logger.With("component", "agent"), born: time.Now(),
		exits: make(chan exitEvent, 64), procs: map[string]*proc{}, started: map[string]int{},
		incoming: map[string]string{}, claimed: map[string]int{}, outgoing: map[string]bool{}, moved: map[string]int{},
		departures: make(chan departure), arrivals: make(chan arrival), holding: map[string]int{}, ckpting: map[string]bool{}, ckptPushAt: map[string]time.Time{},
		fenced: map[string]int{}, capturing: map[string]bool{},
		vips: newVIPs(cfg.DataDir, cfg.VIPInterface, cfg.Logger.With("component", "agent")),
	}
	if cfg.Cgroups {
		cg, err := openCgroups(cfg.Name, cfg.DataDir)
		if err != nil {
			a.log.Warn("workloads run without cgroups: a migrating original is held by this agent's ptrace alone", "err", err)
		} else {
			a.cg = cg
		}
	}
	return a
}

// Workloads returns how many workload processes the agent watches.
func (a *Agent) Workloads() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.procs)
}

// LogPath returns the log file of a workload's stream ("stdout" or "stderr").
func (a *Agent) LogPath(id, stream string) (string, error) {
	if id == "" || strings.ContainsAny(id, "/\\") || id == "." || id == ".." {
		return "", fmt.Errorf("log path: bad workload id %q", id)
	}
	if stream != "stdout" && stream != "stderr" {
		return "", fmt.Errorf("log path: stream %q: want stdout or stderr", stream)
	}
	return filepath.Join(a.cfg.DataDir, "workloads", id, stream+".log"), nil
}

// Run supervises workloads until ctx ends. Workloads keep running when the
// agent stops; the next agent on this node adopts them.
func (a *Agent) Run(ctx context.Context) {
	defer a.wg.Wait()
	a.done = ctx.Done()
	defer func() {
		// A source keeps its frozen process until the state decides: the
		// tracer must outlive every decision, or the process would resume
		// while the target may start its copy.
		a.outWG.Wait()
		a.vips.close()
		a.trOnce.Do(func() {})
		if a.tr != nil {
			a.tr.Close()
		}
		if a.cg != nil {
			a.cg.close()
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	if a.cfg.FenceAfter > 0 && a.cfg.Contact != nil {
		if a.cfg.Watchdog && a.cg != nil {
			a.takeWatchdogFrozen()
			if l, err := readLease(a.cfg.DataDir); err == nil {
				a.mu.Lock()
				a.inherited = l.Cgroups
				a.mu.Unlock()
			}
			if w, err := a.startWatchdog(a.cfg.Contact()); err != nil {
				a.log.Error("no fence watchdog: the workloads are not fenced if pclusterd dies", "err", err)
			} else {
				// Closed when Run ends, or by the kernel when this
				// process dies: the watchdog's clock starts.
				defer w.Close()
			}
		}
		a.wg.Add(1)
		go a.fenceLoop(ctx) // ends with ctx; Run waits for it
	}
	for {
		changed := a.cfg.FSM.Changed()
		if a.current(ctx) {
			a.reconcile(ctx)
		}
		a.flush(ctx)
		select {
		case <-ctx.Done():
			return
		case ev := <-a.exits:
			a.exited(ev)
		case d := <-a.departures:
			a.departed(d)
		case ar := <-a.arrivals:
			a.arrived(ar)
		case <-changed:
		case <-tick.C:
		}
	}
}

// current reports whether this node's replica may be acted on: there is
// a leader, and the replica has applied the index that leader named when
// asked after the agent started or the leader changed (Config.Sync).
func (a *Agent) current(ctx context.Context) bool {
	if a.cfg.Sync == nil {
		return true
	}
	leader := ""
	if a.cfg.Leader != nil {
		leader = a.cfg.Leader()
	}
	if leader == "" {
		if a.syncedWith != "" {
			a.log.Info("no leader: the agent waits")
		}
		a.syncedWith = ""
		return false
	}
	if leader != a.syncedWith {
		if time.Now().Before(a.retrySync) {
			return false
		}
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		idx, err := a.cfg.Sync(sctx)
		cancel()
		if err != nil {
			a.log.Debug("leader's index not known; will retry", "leader", leader, "err", err)
			a.retrySync = time.Now().Add(time.Second)
			return false
		}
		a.syncedWith, a.syncIndex = leader, idx
	}
	var at uint64
	a.cfg.FSM.Read(func(s *scheduler.State) { at = s.Index })
	if at < a.syncIndex {
		return false
	}
	a.mu.Lock()
	a.inherited = nil // the replica is current: it says what the fence covers
	a.mu.Unlock()
	return true
}

// adopt takes over a process that an earlier agent on this node started:
// the state says it runs here, this agent did not start it. The state may
// arrive well after Run starts (raft replays the log), hence the lazy check
// from reconcile rather than a scan at start.
func (a *Agent) adopt(ctx context.Context, w scheduler.Workload) {
	a.started[w.ID] = w.Attempt
	pid, pidns := supervised(w)
	ticks, err := startTicks(pid)
	if err != nil || ticks != w.StartTicks {
		a.log.Info("workload gone while the agent was away", "workload", w.ID, "pid", pid)
		ev := exitEvent{code: -1, msg: "process ended while pclusterd was not running"}
		if code, sig, ok := a.readStatus(w.ID); ok && pidns {
			ev = exitEvent{code: code, signal: sig}
		}
		a.queue(api.Report{Kind: api.ReportExited, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt,
			ExitCode: ev.code, Signal: ev.signal, Message: ev.msg, At: time.Now()})
		a.clearStatus(w.ID)
		return
	}
	a.log.Info("adopted running workload", "workload", w.ID, "pid", pid)
	p := &proc{id: w.ID, attempt: w.Attempt, pid: pid, pidns: pidns, adopted: true}
	a.mu.Lock()
	a.procs[w.ID] = p
	a.mu.Unlock()
	a.wg.Add(1)
	go a.poll(ctx, w.ID, w.Attempt, pid, ticks, pidns)
}

// supervised returns the process an agent watches for workload w: the
// init of its PID namespace, or the workload itself (started by an agent
// from before namespaces).
func supervised(w scheduler.Workload) (pid int, pidns bool) {
	if w.InitPID > 0 {
		return w.InitPID, true
	}
	return w.PID, false
}

// poll waits for an adopted process (not our child, so no wait status) to
// end, or for ctx to end. The init of a PID namespace leaves the
// workload's status in a file (init_linux.go).
func (a *Agent) poll(ctx context.Context, id string, attempt, pid int, ticks uint64, pidns bool) {
	defer a.wg.Done()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if got, err := startTicks(pid); err == nil && got == ticks {
			continue
		}
		ev := exitEvent{wid: id, attempt: attempt, code: -1, msg: "adopted process ended; status unknown", at: time.Now()}
		if code, sig, ok := a.readStatus(id); ok && pidns {
			ev.code, ev.signal, ev.msg = code, sig, ""
		}
		select {
		case a.exits <- ev:
		case <-ctx.Done():
		}
		return
	}
}

func (a *Agent) reconcile(ctx context.Context) {
	// First of all: the copies this node froze or left running while cut
	// off that now belong elsewhere are killed (node/fence.go).
	a.settleFence()
	a.killStrays()
	var todo, relist, orphans, lost []scheduler.Workload
	type out struct {
		m     scheduler.Migration
		pid   int
		pidns bool
	}
	var outs []out
	var orphanedOut []scheduler.Migration // transferring, by an earlier agent here
	now := time.Now()
	present := map[string]bool{}
	a.cfg.FSM.Read(func(s *scheduler.State) {
		for id := range a.outgoing {
			if m, ok := s.Migrations[id]; !ok || !m.State.Active() {
				delete(a.outgoing, id)
			}
		}
		for _, m := range s.Migrations {
			if m.Source == a.cfg.Name && m.State == scheduler.MigrationTransferring && !a.outgoing[m.ID] {
				a.outgoing[m.ID] = true
				orphanedOut = append(orphanedOut, *m)
				continue
			}
			if m.Source != a.cfg.Name || m.State != scheduler.MigrationPlanned || a.outgoing[m.ID] {
				continue
			}
			if p := a.procs[m.WorkloadID]; p != nil && p.attempt == m.Attempt && !p.stopping && !a.ckptBusy(m.WorkloadID) &&
				!a.isFenced(m.WorkloadID) {
				a.outgoing[m.ID] = true
				outs = append(outs, out{*m, p.pid, p.pidns})
			}
		}
		for _, w := range s.Workloads {
			present[w.ID] = true
			if w.DesiredNode != a.cfg.Name && w.Node != a.cfg.Name && a.procs[w.ID] == nil {
				continue // a process of ours for it is a stale copy (below)
			}
			a.mu.Lock()
			claimed := a.claimed[w.ID] >= w.Attempt
			a.mu.Unlock()
			if claimed {
				continue // arriving by migration: Receive and Run handle it
			}
			p := a.procs[w.ID]
			a.mu.Lock()
			arriving := a.incoming[w.ID] != ""
			a.mu.Unlock()
			switch {
			case p == nil && w.Node == a.cfg.Name && w.State == scheduler.StateRunning && w.PID == 0 &&
				a.started[w.ID] < w.Attempt && !arriving:
				// Moved here (committed) and never started by this agent
				// nor arriving: the agent that built it died first.
				lost = append(lost, *w)
			case p == nil && w.Node == a.cfg.Name && w.PID > 0 && a.started[w.ID] < w.Attempt &&
				(w.State == scheduler.StateRunning || w.State == scheduler.StateLost || w.State == scheduler.StateStopped):
				// Stopped with a PID: stopped while its node was down; the
				// process may have survived and must still be stopped.
				orphans = append(orphans, *w)
			case p == nil && w.Desired == scheduler.DesiredRunning && w.State == scheduler.StatePending &&
				w.DesiredNode == a.cfg.Name && a.started[w.ID] < w.Attempt:
				if w.Restarts > 0 && now.Before(time.Unix(0, w.EndedAt).Add(RestartDelay(w.Restarts))) {
					continue // the ticker brings us back
				}
				todo = append(todo, *w)
			case p != nil && w.Desired == scheduler.DesiredStopped && !p.stopping,
				// Rolled back (workload-restore): restored from the
				// checkpoint once this process's exit is recorded.
				p != nil && w.Restore != nil && w.Restore.Replaces == p.attempt && !p.stopping,
				// Rescheduled (workload-reschedule): it restarts on its
				// desired node once this process's exit is recorded.
				p != nil && w.Node == a.cfg.Name && w.DesiredNode != a.cfg.Name && !p.stopping:
				a.signal(p, syscall.SIGTERM)
				p.stopping, p.killAt = true, now.Add(a.cfg.StopTimeout)
			case p != nil && w.Node != a.cfg.Name && w.Attempt > p.attempt && !p.stopping && !s.MigratedFrom(w.ID, a.cfg.Name, p.attempt):
				// Brought back elsewhere while this node was cut off
				// (failover): this copy is stale; killed at once.
				a.log.Warn("workload runs elsewhere now: killing this node's stale copy", "workload", w.ID,
					"attempt", p.attempt, "now", w.Attempt, "on", w.Node)
				a.signal(p, syscall.SIGKILL)
				p.stopping, p.killAt = true, now.Add(a.cfg.StopTimeout)
			case p != nil && p.stopping && now.After(p.killAt):
				a.signal(p, syscall.SIGKILL)
				p.killAt = now.Add(a.cfg.StopTimeout)
			case p != nil && w.State == scheduler.StateLost && p.attempt == w.Attempt && p.relisted != w.ModifyIndex:
				// Our node was declared down but the process lives: say so.
				p.relisted = w.ModifyIndex
				relist = append(relist, *w)
			}
		}
	})
	a.forget(present, now)
	a.settleHeld()
	for _, w := range lost {
		a.lostArrival(ctx, w)
	}
	for _, w := range orphans {
		a.adopt(ctx, w)
	}
	for _, w := range relist {
		pid, _ := supervised(w)
		ticks, _ := startTicks(pid)
		a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, PID: w.PID, StartTicks: ticks,
			NSPID: w.NSPID, InitPID: w.InitPID, At: now})
	}
	for _, w := range todo {
		if w.Restore != nil && w.Restore.Attempt == w.Attempt {
			a.restore(ctx, w)
			continue
		}
		a.start(w)
	}
	for _, m := range orphanedOut {
		a.outWG.Add(1)
		go func() { // ends with the step; Run waits for it
			defer a.outWG.Done()
			a.abandonOut(ctx, m)
		}()
	}
	for _, o := range outs {
		a.outWG.Add(1)
		go func() { // ends with the migration; Run waits for it
			defer a.outWG.Done()
			a.migrateOut(ctx, o.m, o.pid, o.pidns)
		}()
	}
	a.reconcileVIPs()
	a.checkpoints(ctx, now)
}

// lostArrival settles a workload the state moved here by a migration
// whose target agent (an earlier one on this node) died before recording
// the start. If the restored process runs in its cgroup it was started:
// it is reported started, and adopted on the next round. Otherwise it died
// with that agent, unstarted: lost (its restart policy applies).
func (a *Agent) lostArrival(ctx context.Context, w scheduler.Workload) {
	a.started[w.ID] = w.Attempt
	if a.cg != nil {
		pids := procsOf(a.cg.dir(w.ID, w.Attempt))
		// A namespace's init first: the one to supervise.
		for i, pid := range pids {
			if isNSInit(pid) {
				copy(pids[1:i+1], pids[:i])
				pids[0] = pid
				break
			}
		}
		for _, pid := range pids {
			if st := procStateOf(pid); st == 't' || st == 'T' || st == 'Z' || st == 'X' {
				continue // not started, or dying
			}
			ticks, err := startTicks(pid)
			if err != nil {
				continue
			}
			a.log.Info("migrated workload found running in its cgroup; its start was not recorded", "workload", w.ID, "pid", pid)
			w.PID, w.StartTicks, w.InitPID = pid, ticks, 0
			if isNSInit(pid) {
				w.InitPID = pid
				if c := nsChild(pid, w.NSPID); c > 0 {
					w.PID = c
				}
			}
			a.adopt(ctx, w)
			a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, PID: w.PID, StartTicks: ticks,
				NSPID: w.NSPID, InitPID: w.InitPID, At: time.Now()})
			return
		}
	}
	a.log.Warn("migrated workload lost: the agent that built it died before starting it", "workload", w.ID, "attempt", w.Attempt)
	a.queue(api.Report{Kind: api.ReportLost, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt,
		Message: fmt.Sprintf("lost with the agent before it started: moved to %s, whose pclusterd died before starting it", a.cfg.Name), At: time.Now()})
}

// settleHeld decides the fate of workload cgroups left frozen by an
// earlier agent on this node, a migration's source that died holding the
// original: kill it if the workload has left this node or this attempt
// (the move committed), thaw it if the state still has it here at the
// same attempt with no migration in flight (aborted). A migration still
// in flight from here is left to abandonOut, which aborts it (or finds
// it committed); the next round decides.
func (a *Agent) settleHeld() {
	if a.cg == nil {
		return
	}
	for _, h := range a.cg.list() {
		a.mu.Lock()
		_, mine := a.holding[h.wid]
		a.mu.Unlock()
		a.mu.Lock()
		at, f := a.fenced[h.wid]
		a.mu.Unlock()
		if mine || f && at == h.attempt {
			continue // a migration of this agent's, or the fence's (settleFence)
		}
		verdict := "kill"
		a.cfg.FSM.Read(func(s *scheduler.State) {
			w, ok := s.Workloads[h.wid]
			if !ok || w.Node != a.cfg.Name || w.Attempt != h.attempt || !w.State.Active() && w.State != scheduler.StateLost {
				return
			}
			if m := s.ActiveMigration(h.wid); m != nil && m.Source == a.cfg.Name {
				verdict = "wait"
				return
			}
			verdict = "thaw"
		})
		switch verdict {
		case "wait":
			continue
		case "thaw":
			a.log.Warn("workload held frozen by an earlier agent's migration, which did not move it: thawing", "workload", h.wid, "attempt", h.attempt)
			if err := freeze(h.dir, false); err != nil {
				a.log.Warn("thaw workload", "workload", h.wid, "err", err)
			}
		case "kill":
			a.log.Warn("workload held frozen by an earlier agent's migration, which moved it away: killing the original", "workload", h.wid, "attempt", h.attempt)
			if err := kill(h.dir); err != nil {
				a.log.Warn("kill held workload", "workload", h.wid, "err", err)
			}
			// Thawed, so that no later round decides again and the
			// sweep (list) removes it once its processes are gone.
			freeze(h.dir, false)
		}
	}
}

// departed forgets a workload that migrated away: its process here was
// killed after the commit.
func (a *Agent) departed(d departure) {
	a.mu.Lock()
	if p := a.procs[d.wid]; p != nil && p.attempt == d.attempt {
		delete(a.procs, d.wid)
		a.moved[d.wid] = d.attempt
	}
	a.mu.Unlock()
}

// arrived takes over a workload restored here by a migration: a child of
// ours, waited for by wait4(pid) once it has exited.
func (a *Agent) arrived(ar arrival) {
	if ar.report != nil {
		// Only while its process is still here: once its exit was
		// queued, the exit ends the migration (endMigration), and a
		// start queued after it would bring the ended workload back.
		a.mu.Lock()
		p := a.procs[ar.wid]
		a.mu.Unlock()
		if p != nil && p.attempt == ar.attempt {
			a.queue(*ar.report)
		}
	}
	a.started[ar.wid] = ar.attempt
	delete(a.moved, ar.wid)
	a.mu.Lock()
	delete(a.claimed, ar.wid)
	if ar.pid > 0 {
		a.procs[ar.wid] = &proc{id: ar.wid, attempt: ar.attempt, pid: ar.pid, pidns: ar.pidns}
	}
	a.mu.Unlock()
	if ar.pid <= 0 {
		return
	}
	go func() { // ends when the process does
		ws, err := waitChild(ar.pid)
		if ar.pidns {
			a.queueExit(a.initExit(ar.wid, ar.attempt, ws, err))
			return
		}
		a.queueExit(exitOf(ar.wid, ar.attempt, ws, err))
	}()
}

// exitOf makes the exit event of a wait status.
func exitOf(wid string, attempt int, ws syscall.WaitStatus, err error) exitEvent {
	ev := exitEvent{wid: wid, attempt: attempt, at: time.Now()}
	switch {
	case err != nil:
		ev.code, ev.msg = -1, err.Error()
	case ws.Signaled():
		// The shell's convention: 128 + signal number.
		ev.code, ev.signal = 128+int(ws.Signal()), ws.Signal().String()
	default:
		ev.code = ws.ExitStatus()
	}
	return ev
}

// forget drops what this agent keeps for workloads the state no longer has
// (removed by the GC after their retention): its record of starts and their
// log files, which would otherwise grow without bound, and any process of
// theirs still running. The GC removes only ended workloads, never lost
// ones (scheduler/gc.go), so a process can still run here for a removed
// workload only if an operator stopped it while its node was cut off: this
// carries out that stop. Every id here was in the state when the agent
// recorded it, and the state only moves forward, so missing means removed.
func (a *Agent) forget(present map[string]bool, now time.Time) {
	for id, p := range a.procs {
		switch {
		case present[id]:
		case !p.stopping:
			a.log.Info("workload removed from the state; stopping its process", "workload", id, "pid", p.pid)
			a.signal(p, syscall.SIGTERM)
			p.stopping, p.killAt = true, now.Add(a.cfg.StopTimeout)
		case now.After(p.killAt):
			a.signal(p, syscall.SIGKILL)
			p.killAt = now.Add(a.cfg.StopTimeout)
		}
	}
	for id := range a.started {
		if present[id] || a.procs[id] != nil {
			continue
		}
		delete(a.started, id)
		if p, err := a.LogPath(id, "stdout"); err == nil {
			if err := os.RemoveAll(filepath.Dir(p)); err != nil {
				a.log.Warn("remove logs of collected workload", "workload", id, "err", err)
			}
		}
	}
}

func (a *Agent) signal(p *proc, sig syscall.Signal) {
	a.log.Info("signalling workload", "workload", p.id, "pid", p.pid, "signal", sig.String())
	target := -p.pid // its process group
	if p.adopted || p.pidns {
		// An init forwards signals to the workload's group; SIGKILL
		// ends its whole namespace.
		target = p.pid
	}
	err := syscall.Kill(target, sig)
	if errors.Is(err, syscall.ESRCH) && target < 0 {
		// A restored process may lead no group of its own here.
		err = syscall.Kill(p.pid, sig)
	}
	if err != nil && !errors.Is(err, syscall.ESRCH) {
		a.log.Warn("signal workload", "workload", p.id, "pid", p.pid, "err", err)
	}
}

func (a *Agent) start(w scheduler.Workload) {
	a.started[w.ID] = w.Attempt
	s, err := a.spawn(w)
	if err != nil {
		a.log.Warn("start workload", "workload", w.ID, "err", err)
		// Reported as started then exited, so the state records the failure.
		now := time.Now()
		a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, At: now})
		a.queue(api.Report{Kind: api.ReportExited, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, ExitCode: 127, Message: err.Error(), At: now})
		return
	}
	a.log.Info("started workload", "workload", w.ID, "attempt", w.Attempt, "pid", s.pid, "ns_pid", s.nsPid, "init", s.initPid, "command", w.Command)
	a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, PID: s.pid, StartTicks: s.ticks,
		NSPID: s.nsPid, InitPID: s.initPid, At: time.Now()})
}

func lookPath(file string, env []string) (string, error) {
	dirs := DefaultPath
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			dirs = v
		}
	}
	for _, d := range filepath.SplitList(dirs) {
		p := filepath.Join(d, file)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("command %q not found in PATH %s", file, dirs)
}

func (a *Agent) exited(ev exitEvent) {
	if a.cg != nil {
		// Removed once empty; what the workload left running in it (a
		// daemonized child) keeps it until the next agent's sweep.
		if err := a.cg.remove(ev.wid, ev.attempt); err != nil {
			a.log.Info("workload cgroup kept", "workload", ev.wid, "err", err)
		}
	}
	a.clearStatus(ev.wid)
	if a.moved[ev.wid] == ev.attempt {
		delete(a.moved, ev.wid)
		a.log.Info("migrated workload's old process reaped", "workload", ev.wid, "attempt", ev.attempt)
		return
	}
	a.mu.Lock()
	if p := a.procs[ev.wid]; p != nil && p.attempt == ev.attempt {
		delete(a.procs, ev.wid)
	}
	a.mu.Unlock()
	if ev.lost {
		a.log.Warn("workload lost: its attempt never ran", "workload", ev.wid, "attempt", ev.attempt, "why", ev.msg)
		a.queue(api.Report{Kind: api.ReportLost, ID: ev.wid, Node: a.cfg.Name, Attempt: ev.attempt, Message: ev.msg, At: ev.at})
		return
	}
	a.log.Info("workload ended", "workload", ev.wid, "attempt", ev.attempt, "exit", ev.code, "signal", ev.signal)
	a.queue(api.Report{Kind: api.ReportExited, ID: ev.wid, Node: a.cfg.Name, Attempt: ev.attempt,
		ExitCode: ev.code, Signal: ev.signal, Message: ev.msg, At: ev.at})
}

// killRefused kills the process of a "started" report the state refused
// as stale: the state has moved on (the workload runs elsewhere, or at a
// later attempt), and this process is a copy no one will ever see.
func (a *Agent) killRefused(r api.Report) {
	p := a.procs[r.ID]
	// p.pid is the process we wait for: the workload's, or its
	// namespace's init (whose death ends the namespace).
	if p == nil || p.attempt != r.Attempt || p.pid != r.PID && !(p.pidns && p.pid == r.InitPID) {
		return
	}
	a.log.Warn("start refused as stale: killing the process, a copy the state does not have", "workload", r.ID, "attempt", r.Attempt, "pid", r.PID)
	a.signal(p, syscall.SIGKILL)
	if a.cg != nil {
		if err := kill(a.cg.dir(r.ID, r.Attempt)); err != nil {
			a.log.Warn("kill refused workload's cgroup", "workload", r.ID, "err", err)
		}
	}
	p.stopping, p.killAt = true, time.Now().Add(a.cfg.StopTimeout)
}

func (a *Agent) queue(r api.Report) { a.pending = append(a.pending, r) }

// flush sends queued reports in order, stopping at the first that cannot be
// delivered now; Run calls it again on the next tick.
func (a *Agent) flush(ctx context.Context) {
	for len(a.pending) > 0 {
		r := a.pending[0]
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := a.cfg.Report(rctx, r)
		cancel()
		var ae *api.Error
		if err != nil && !(errors.As(err, &ae) && ae.Status >= 400 && ae.Status < 500 && ae.Status != http.StatusRequestTimeout) {
			a.log.Debug("report not delivered; will retry", "workload", r.ID, "kind", r.Kind, "err", err)
			return
		}
		if err != nil {
			a.log.Info("report refused", "workload", r.ID, "kind", r.Kind, "err", err)
			if r.Kind == api.ReportStarted && ae.Status == http.StatusConflict && strings.Contains(ae.Message, scheduler.ErrStale.Error()) {
				a.killRefused(r)
			}
		}
		a.pending = a.pending[1:]
	}
}
