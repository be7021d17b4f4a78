// Package node is the host-local agent. It starts the workloads the
// replicated state assigns to this host as its own children, keeps their
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
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
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
	DialTarget  func(ctx context.Context, m scheduler.Migration) (net.Conn, error)
	Logger      *slog.Logger
	StopTimeout time.Duration // SIGTERM to SIGKILL; default 10s
	// VIPInterface carries the workloads' virtual IPs; "": the interface
	// whose subnet holds each (node/vip.go).
	VIPInterface string
}

// proc is one workload process this agent watches.
type proc struct {
	id       string
	attempt  int
	pid      int
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

	vips *vips // the virtual IPs this node carries (node/vip.go)
}

// New returns an agent; call Run to start it.
func New(cfg Config) *Agent {
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Agent{
		cfg: cfg, log: cfg.Logger.With("component", "agent"),
		exits: make(chan exitEvent, 64), procs: map[string]*proc{}, started: map[string]int{},
		incoming: map[string]string{}, claimed: map[string]int{}, outgoing: map[string]bool{}, moved: map[string]int{},
		departures: make(chan departure), arrivals: make(chan arrival),
		vips: newVIPs(cfg.DataDir, cfg.VIPInterface, cfg.Logger.With("component", "agent")),
	}
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
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		changed := a.cfg.FSM.Changed()
		a.reconcile(ctx)
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

// adopt takes over a process that an earlier agent on this node started:
// the state says it runs here, this agent did not start it. The state may
// arrive well after Run starts (raft replays the log), hence the lazy check
// from reconcile rather than a scan at start.
func (a *Agent) adopt(ctx context.Context, w scheduler.Workload) {
	a.started[w.ID] = w.Attempt
	ticks, err := startTicks(w.PID)
	if err != nil || ticks != w.StartTicks {
		a.log.Info("workload gone while the agent was away", "workload", w.ID, "pid", w.PID)
		a.queue(api.Report{Kind: api.ReportExited, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt,
			ExitCode: -1, Message: "process ended while pclusterd was not running", At: time.Now()})
		return
	}
	a.log.Info("adopted running workload", "workload", w.ID, "pid", w.PID)
	p := &proc{id: w.ID, attempt: w.Attempt, pid: w.PID, adopted: true}
	a.mu.Lock()
	a.procs[w.ID] = p
	a.mu.Unlock()
	a.wg.Add(1)
	go a.poll(ctx, w.ID, w.Attempt, w.PID, ticks)
}

// poll waits for an adopted process (not our child, so no wait status) to
// end, or for ctx to end.
func (a *Agent) poll(ctx context.Context, id string, attempt, pid int, ticks uint64) {
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
		select {
		case a.exits <- exitEvent{wid: id, attempt: attempt, code: -1, msg: "adopted process ended; status unknown", at: time.Now()}:
		case <-ctx.Done():
		}
		return
	}
}

func (a *Agent) reconcile(ctx context.Context) {
	var todo, relist, orphans []scheduler.Workload
	type out struct {
		m   scheduler.Migration
		pid int
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
			if p := a.procs[m.WorkloadID]; p != nil && p.attempt == m.Attempt && !p.stopping {
				a.outgoing[m.ID] = true
				outs = append(outs, out{*m, p.pid})
			}
		}
		for _, w := range s.Workloads {
			present[w.ID] = true
			if w.DesiredNode != a.cfg.Name && w.Node != a.cfg.Name {
				continue
			}
			a.mu.Lock()
			claimed := a.claimed[w.ID] >= w.Attempt
			a.mu.Unlock()
			if claimed {
				continue // arriving by migration: Receive and Run handle it
			}
			p := a.procs[w.ID]
			switch {
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
				// Rescheduled (workload-reschedule): it restarts on its
				// desired node once this process's exit is recorded.
				p != nil && w.Node == a.cfg.Name && w.DesiredNode != a.cfg.Name && !p.stopping:
				a.signal(p, syscall.SIGTERM)
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
	for _, w := range orphans {
		a.adopt(ctx, w)
	}
	for _, w := range relist {
		ticks, _ := startTicks(w.PID)
		a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, PID: w.PID, StartTicks: ticks, At: now})
	}
	for _, w := range todo {
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
			a.migrateOut(ctx, o.m, o.pid)
		}()
	}
	a.reconcileVIPs()
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
	a.started[ar.wid] = ar.attempt
	delete(a.moved, ar.wid)
	a.mu.Lock()
	delete(a.claimed, ar.wid)
	if ar.pid > 0 {
		a.procs[ar.wid] = &proc{id: ar.wid, attempt: ar.attempt, pid: ar.pid}
	}
	a.mu.Unlock()
	if ar.pid <= 0 {
		return
	}
	go func() { // ends when the process does
		ws, err := waitChild(ar.pid)
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
	if p.adopted {
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
	pid, ticks, err := a.spawn(w)
	if err != nil {
		a.log.Warn("start workload", "workload", w.ID, "err", err)
		// Reported as started then exited, so the state records the failure.
		now := time.Now()
		a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, At: now})
		a.queue(api.Report{Kind: api.ReportExited, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, ExitCode: 127, Message: err.Error(), At: now})
		return
	}
	a.log.Info("started workload", "workload", w.ID, "attempt", w.Attempt, "pid", pid, "command", w.Command)
	a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, PID: pid, StartTicks: ticks, At: time.Now()})
}

// spawn starts the workload as a child in its own process group, its output
// appended to its log files; a goroutine waits for it and ends with it.
func (a *Agent) spawn(w scheduler.Workload) (int, uint64, error) {
	outPath, _ := a.LogPath(w.ID, "stdout")
	errPath, _ := a.LogPath(w.ID, "stderr")
	if err := os.MkdirAll(filepath.Dir(outPath), 0o700); err != nil {
		return 0, 0, fmt.Errorf("start %s: %w", w.ID, err)
	}
	stdout, err := os.OpenFile(outPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, 0, fmt.Errorf("start %s: %w", w.ID, err)
	}
	defer stdout.Close()
	stderr, err := os.OpenFile(errPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, 0, fmt.Errorf("start %s: %w", w.ID, err)
	}
	defer stderr.Close()
	a.markLogStart(w.ID, w.Attempt, stdout, stderr)

	env := []string{"PATH=" + DefaultPath}
	env = append(env, w.Env...)
	env = append(env, "PCLUSTER_WORKLOAD_ID="+w.ID, "PCLUSTER_NODE="+a.cfg.Name)
	path := w.Command
	if !strings.Contains(path, "/") {
		p, err := lookPath(path, env)
		if err != nil {
			return 0, 0, fmt.Errorf("start %s: %w", w.ID, err)
		}
		path = p
	}
	cmd := exec.Command(path, w.Args...)
	cmd.Args[0] = w.Command
	cmd.Env = env
	cmd.Dir = w.Cwd
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cred, err := credential(w, a.cfg.Name)
	if err != nil {
		return 0, 0, fmt.Errorf("start %s: %w", w.ID, err)
	}
	cmd.SysProcAttr.Credential = cred
	if err := cmd.Start(); err != nil {
		return 0, 0, fmt.Errorf("start %s: %w", w.ID, err)
	}
	pid := cmd.Process.Pid
	ticks, _ := startTicks(pid)
	a.mu.Lock()
	a.procs[w.ID] = &proc{id: w.ID, attempt: w.Attempt, pid: pid}
	a.mu.Unlock()
	// The waiter ends when the process does, not with Run: workloads
	// outlive the agent, and Run must not wait for them. It waits only
	// once the process has exited: a wait before would consume the stops
	// of a migration's freeze (waitExited says why).
	go func() {
		waitExited(pid)
		err := cmd.Wait()
		ev := exitEvent{wid: w.ID, attempt: w.Attempt, at: time.Now()}
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok {
			ev.code = ws.ExitStatus()
			if ws.Signaled() {
				// The shell's convention: 128 + signal number.
				ev.code, ev.signal = 128+int(ws.Signal()), ws.Signal().String()
			}
		} else if err != nil {
			ev.code, ev.msg = -1, err.Error()
		}
		// If Run has ended the exit is not reported; the next agent on
		// this node finds the process gone and says so.
		select {
		case a.exits <- ev:
		case <-a.done:
		}
	}()
	return pid, ticks, nil
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
	a.log.Info("workload ended", "workload", ev.wid, "attempt", ev.attempt, "exit", ev.code, "signal", ev.signal)
	a.queue(api.Report{Kind: api.ReportExited, ID: ev.wid, Node: a.cfg.Name, Attempt: ev.attempt,
		ExitCode: ev.code, Signal: ev.signal, Message: ev.msg, At: ev.at})
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
		}
		a.pending = a.pending[1:]
	}
}
