package cluster_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
	"github.com/pcluster/pcluster/node"
)

// The ways TestFailoverFromCheckpoint loses a node: "cut", its link down
// (its pclusterd runs on, cut off: it fences its copy, and kills it when
// the link is back); "kill", its pclusterd SIGKILLed (its watchdog
// fences the copy; the restarted agent kills it); "cutkill", its link
// down and its pclusterd SIGKILLed and started again 2 s later, still cut
// off (the new agent fences from the dead one's last contact and lease,
// its replica lacking what raft has not replayed, and kills the copy when
// the link is back); "term", its pclusterd stopped gracefully (SIGTERM,
// as a service manager stops it: with workloads a failover could restore
// it leaves the cluster silently, so it fails as after a crash and its
// watchdog fences the copy; a graceful leave would have the leader fail
// the workload over at once while the copy ran on).
var failoverModes = []string{"cut", "kill", "cutkill", "term"}

// failoverTimes is one trial's timeline, from the cut or the kill.
type failoverTimes struct {
	fenced   time.Duration // the lost node's copy's cgroup frozen (cut: by its agent's fence; kill: by its watchdog)
	lost     time.Duration // detection: the majority's state says lost
	decided  time.Duration // decision: placed on another node
	running  time.Duration // restore: running there
	staleEnd time.Duration // from the link up / the restart to the old copy gone
}

// TestFailoverFromCheckpoint runs a counter (migcount) under a 2 s
// checkpoint policy on one node of three (failover on by default, no
// flag) and loses that node: the leader brings the workload back on the
// node holding the newest copy (an incremental checkpoint and the ones it
// needs), restored from it (the counter goes on
// from the checkpoint's value with the same getpid() and heap checksum,
// not from 0), and `status` says so. Never two copies serving: with the
// link cut, the cut-off copy is frozen by the node's fence before the
// leader decides the failover, and its log does not grow from then on;
// when the link comes back its agent kills it. With the node's pclusterd
// SIGKILLed instead, the node's fence watchdog freezes the copy before
// the leader decides, as the fence would (and it writes nothing from
// then on); the restarted agent kills it.
//
// PCLUSTER_FAILOVER_TRIALS (default 1) sets the trials per mode; each
// trial loses the next node in turn and logs its timeline, the last line
// per mode the spread:
//
//	PCLUSTER_FAILOVER_TRIALS=20 go test ./cluster -run TestFailoverFromCheckpoint -v -timeout 2h
func TestFailoverFromCheckpoint(t *testing.T) {
	trials := 1
	if v := os.Getenv("PCLUSTER_FAILOVER_TRIALS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("PCLUSTER_FAILOVER_TRIALS=%q: want a positive number", v)
		}
		trials = n
	}
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	lab := netlab.New(t, 3, 100+int(c.prefix[6])%50)
	var nodes []*testNode
	for i := 1; i <= 3; i++ {
		extra := []string{"-bootstrap-expect", "3"}
		if i > 1 {
			extra = append(extra, "-join", lab.Hosts[0].Addr+":7946")
		}
		h := lab.Hosts[i-1]
		nodes = append(nodes, c.startAt(i, h.Addr, 7946, h.NS, extra...))
	}
	t.Cleanup(func() {
		for _, nd := range nodes {
			c.stop(nd)
		}
	})
	for _, nd := range nodes {
		c.waitFor(30*time.Second, nd.name+" to converge", func() error { return converged(nd, 3) })
	}
	c.ctl(nodes[1], "checkpoint", "policy", "set", "-selector", "app=fo", "-interval", "2s", "-keep", "2", "fo")
	fl := &failoverLab{t: t, c: c, lab: lab, nodes: nodes, bin: bin}
	all := map[string][]failoverTimes{}
	for m, mode := range failoverModes {
		for i := 0; i < trials; i++ {
			all[mode] = append(all[mode], fl.trial(mode, i, (i+m)%len(nodes)))
		}
	}
	for _, mode := range failoverModes {
		ts := all[mode]
		spread := func(what string, f func(failoverTimes) time.Duration) string {
			var ds []time.Duration
			for _, x := range ts {
				ds = append(ds, f(x))
			}
			slices.Sort(ds)
			return fmt.Sprintf("%s %.1f/%.1f/%.1f s", what, ds[0].Seconds(), ds[len(ds)/2].Seconds(), ds[len(ds)-1].Seconds())
		}
		parts := []string{
			spread("fenced", func(x failoverTimes) time.Duration { return x.fenced }),
			spread("lost", func(x failoverTimes) time.Duration { return x.lost }),
			spread("decided", func(x failoverTimes) time.Duration { return x.decided }),
			spread("running", func(x failoverTimes) time.Duration { return x.running }),
			spread("stale copy gone", func(x failoverTimes) time.Duration { return x.staleEnd }),
		}
		t.Logf("%s: %d trials (min/median/max): %s", mode, len(ts), strings.Join(parts, ", "))
	}
}

type failoverLab struct {
	t     *testing.T
	c     *testCluster
	lab   *netlab.Lab
	nodes []*testNode
	bin   string
}

// logOf reads the counter lines a node's copy of workload id wrote (whole
// lines only) and the log's size.
func (fl *failoverLab) logOf(nd *testNode, id string) ([]counterLine, int) {
	b, _ := os.ReadFile(filepath.Join(nd.dataDir, "workloads", id, "stdout.log"))
	s := string(b)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[:i+1]
	} else {
		s = ""
	}
	return parseCounter(fl.t, nd.name+"'s log", s), len(b)
}

// frozen reports whether the cgroup of attempt of workload id on nd is
// frozen (cgroup.events says so once every task is).
func frozen(nd *testNode, id string, attempt int) bool {
	base, err := node.CgroupBase(nd.name, nd.dataDir)
	if err != nil {
		return false
	}
	b, err := os.ReadFile(filepath.Join(base, fmt.Sprintf("%s.%d", id, attempt), "cgroup.events"))
	return err == nil && bytes.Contains(b, []byte("frozen 1"))
}

// trial runs a counter on nodes[v], loses that node as mode says, checks
// the failover and the end of the old copy, and leaves the cluster whole
// with no counter running.
func (fl *failoverLab) trial(mode string, i, v int) failoverTimes {
	t, c := fl.t, fl.c
	victim := fl.nodes[v]
	reader := fl.nodes[(v+1)%len(fl.nodes)]
	var w api.Workload
	c.ctlJSON(reader, &w, "run", "-node", victim.name, "-label", "app=fo", "-name", fmt.Sprintf("counter-%s-%d", mode, i), fl.bin, "100")
	// Every checkpoint after the first is incremental on the one before
	// (full every 8): the restore reads the chain.
	c.waitFor(30*time.Second, "an incremental checkpoint with its copy, and its chain's", func() error {
		var wc api.WorkloadCheckpoints
		c.ctlJSON(reader, &wc, "checkpoint", "list", w.ID)
		n := len(wc.Checkpoints)
		if n == 0 || wc.Checkpoints[n-1].Parent == 0 {
			return fmt.Errorf("%+v", wc.Checkpoints)
		}
		bySeq := map[uint64]api.Checkpoint{}
		for _, cp := range wc.Checkpoints {
			bySeq[cp.Seq] = cp
		}
		for cp, ok := wc.Checkpoints[n-1], true; ok; cp, ok = bySeq[cp.Parent] {
			if len(cp.Holders) < 2 {
				return fmt.Errorf("checkpoint %d has no copy yet: %+v", cp.Seq, wc.Checkpoints)
			}
			if cp.Parent == 0 {
				break
			}
		}
		return nil
	})
	b, _ := os.ReadFile(victim.logPath)
	kills := bytes.Count(b, []byte("killing this node's stale copy"))
	// Read the majority's replica as it is: a consistent read may be
	// forwarded to the lost node while it still leads.
	stale, err := api.New(reader.socket, nil)
	if err != nil {
		t.Fatal(err)
	}
	stale.Stale = true
	var ft failoverTimes
	frozenSize := -1
	start := time.Now()
	switch mode {
	case "cut":
		fl.lab.Cut(t, v, true)
	case "kill":
		c.kill(victim)
	case "term":
		c.stop(victim)
		// Not a graceful leave: the leader would fail the workload
		// over at once, and only how long the daemon took to stop
		// would keep the copy's freeze ahead of that.
		if b, _ := os.ReadFile(victim.logPath); !bytes.Contains(b, []byte("stopping without leaving the cluster")) {
			t.Fatalf("trial %s %d: %s left the cluster gracefully with a workload a failover could restore elsewhere", mode, i, victim.name)
		}
	case "cutkill":
		fl.lab.Cut(t, v, true)
		c.kill(victim)
	}
	var got api.Workload
	seen := ""
	restarted := false
	for deadline := start.Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if mode == "cutkill" && !restarted && time.Since(start) >= 2*time.Second {
			// Restarted 2 s later, as a service manager would, and not
			// waited for: its fence must come -fence-after from the dead
			// agent's last contact, not from its own start (which would
			// be after the leader can decide).
			c.startDaemon(victim)
			restarted = true
		}
		// The fence first: a freeze seen before the state's decision in
		// the same round came before it.
		if frozenSize < 0 && frozen(victim, w.ID, 1) {
			ft.fenced = time.Since(start)
			_, frozenSize = fl.logOf(victim, w.ID)
			t.Logf("trial %s %d: %6.2fs the lost node's copy on %s is frozen", mode, i, ft.fenced.Seconds(), victim.name)
		}
		got, err = stale.Workload(context.Background(), w.ID)
		now := time.Since(start)
		if err == nil {
			if phase := fmt.Sprintf("%s on %s attempt %d", got.State, got.Node, got.Attempt); phase != seen {
				t.Logf("trial %s %d: %6.2fs %s", mode, i, now.Seconds(), phase)
				seen = phase
			}
			if got.State == "lost" && ft.lost == 0 {
				ft.lost = now
			}
			if got.Node != victim.name && ft.decided == 0 {
				ft.decided = now
				if frozenSize < 0 {
					t.Fatalf("trial %s %d: the failover to %s was decided %.2fs after the %s, before the lost node's copy on %s was frozen",
						mode, i, got.Node, now.Seconds(), mode, victim.name)
				}
			}
			if got.State == "running" && got.Node != victim.name && got.PID != 0 && got.Failover != nil {
				ft.running = now
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("trial %s %d: waiting 60s for the counter back on another node: %s on %s attempt %d (%v)",
				mode, i, got.State, got.Node, got.Attempt, err)
		}
	}
	if ft.lost == 0 {
		ft.lost = ft.decided // lost and decided between two reads
	}
	// Which fence froze it: the agent's, or the watchdog of a dead one.
	for _, l := range strings.Split(logBetween(victim.logPath, start, time.Now()), "\n") {
		if strings.Contains(l, "fenced: workload frozen") && strings.Contains(l, w.ID) {
			_, msg, _ := strings.Cut(l, "msg=")
			t.Logf("trial %s %d: %s", mode, i, msg)
		}
	}
	if got.Failover.Checkpoint == 0 || got.Failover.From != victim.name || got.Failover.To != got.Node {
		t.Fatalf("trial %s %d: failover %+v: want from %s, restored from a checkpoint on %s", mode, i, got.Failover, victim.name, got.Node)
	}
	t.Logf("trial %s %d: running elsewhere %v after the %s; checkpoint %d, %v of work rolled back", mode, i,
		ft.running.Round(time.Millisecond), mode, got.Failover.Checkpoint, time.Duration(got.Failover.Age))
	if wc, err := stale.Checkpoints(context.Background(), w.ID); err != nil {
		t.Fatal(err)
	} else {
		for _, cp := range wc.Checkpoints {
			if cp.Seq == got.Failover.Checkpoint && cp.Parent == 0 {
				t.Errorf("trial %s %d: restored from checkpoint %d, a full one: want an incremental one (its chain read)", mode, i, cp.Seq)
			}
		}
	}
	var there *testNode
	for _, nd := range fl.nodes {
		if nd.name == got.Node {
			there = nd
		}
	}
	if ft.running-ft.decided > time.Second {
		// Where a slow restore went: the target's log meanwhile.
		t.Logf("trial %s %d: %v from the decision to running; %s's log meanwhile:\n%s", mode, i, (ft.running - ft.decided).Round(time.Millisecond),
			there.name, logBetween(there.logPath, start.Add(ft.decided-100*time.Millisecond), start.Add(ft.running)))
	}
	var restored []counterLine
	c.waitFor(20*time.Second, "the restored counter's lines on "+there.name, func() error {
		if restored, _ = fl.logOf(there, w.ID); len(restored) < 3 {
			return fmt.Errorf("%d lines", len(restored))
		}
		return nil
	})
	old, oldSize := fl.logOf(victim, w.ID)
	if restored[0].n <= 0 || restored[0].pid != old[0].pid || restored[0].sum != old[0].sum {
		t.Fatalf("trial %s %d: on %s the counter starts with %+v: want the checkpoint's state (getpid %d, sum %s), not a fresh start",
			mode, i, there.name, restored[0], old[0].pid, old[0].sum)
	}
	if restored[0].n > old[len(old)-1].n {
		t.Fatalf("trial %s %d: on %s the counter starts at %d, beyond the original's last line %d", mode, i, there.name, restored[0].n, old[len(old)-1].n)
	}
	checkRun(t, "on "+there.name, nil, restored)
	if out := c.ctl(reader, "status", w.ID); !strings.Contains(out, "Failover:") ||
		!strings.Contains(out, fmt.Sprintf("restored from checkpoint %d", got.Failover.Checkpoint)) {
		t.Errorf("trial %s %d: status: got %q, want the failover line", mode, i, out)
	}
	if oldSize != frozenSize {
		t.Fatalf("trial %s %d: the lost node's copy's log grew from %d to %d bytes after it was frozen", mode, i, frozenSize, oldSize)
	}
	if !frozen(victim, w.ID, 1) {
		t.Fatalf("trial %s %d: the lost node's copy on %s is no longer frozen while the node is lost", mode, i, victim.name)
	}
	switch mode {
	case "kill", "term":
		c.launch(victim)
	case "cut":
		fl.lab.Cut(t, v, false)
	case "cutkill":
		c.waitSocket(victim)
		fl.lab.Cut(t, v, false)
	}
	back := time.Now()
	c.waitFor(120*time.Second, "the old copy on "+victim.name+" to be killed", func() error {
		if got := copies(fl.bin); len(got) != 1 {
			return fmt.Errorf("copies %v", got)
		}
		return nil
	})
	ft.staleEnd = time.Since(back)
	t.Logf("trial %s %d: %s to the old copy gone: %v", mode, i, map[string]string{"cut": "link up", "kill": "restart", "cutkill": "link up", "term": "restart"}[mode],
		ft.staleEnd.Round(time.Millisecond))
	if _, size := fl.logOf(victim, w.ID); size != frozenSize {
		t.Errorf("trial %s %d: the fenced copy wrote %d bytes before it was killed: it was thawed", mode, i, size-frozenSize)
	}
	c.waitFor(15*time.Second, victim.name+"'s log to say it killed its stale copy", func() error {
		b, _ := os.ReadFile(victim.logPath)
		if bytes.Count(b, []byte("killing this node's stale copy")) <= kills {
			return fmt.Errorf("no new \"killing this node's stale copy\" line")
		}
		return nil
	})
	if got, err := workloadOn(reader, w.ID); err != nil || got.State != "running" || got.Node != there.name {
		t.Errorf("trial %s %d: after the heal: %s on %s (%v), want running on %s", mode, i, got.State, got.Node, err, there.name)
	}
	// Whole again, and nothing running, for the next trial.
	for _, nd := range fl.nodes {
		c.waitFor(90*time.Second, nd.name+" to see all three again", func() error { return converged(nd, 3) })
	}
	c.waitFor(30*time.Second, victim.name+" ready again", nodeStatus(reader, victim.name, "ready"))
	c.ctl(reader, "stop", w.ID)
	c.waitFor(30*time.Second, "the counter to stop", func() error {
		if got := copies(fl.bin); len(got) != 0 {
			return fmt.Errorf("copies %v", got)
		}
		return nil
	})
	return ft
}

// logBetween returns the lines of a daemon's log stamped from from to to.
func logBetween(path string, from, to time.Time) string {
	b, _ := os.ReadFile(path)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		ts, _, ok := strings.Cut(strings.TrimPrefix(l, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if ok && err == nil && !at.Before(from) && !at.After(to) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
