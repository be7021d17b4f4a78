package cluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

// TestFailoverFromCheckpoint cuts off (link down) the node running a
// counter under a 2 s checkpoint policy: the leader brings the workload
// back on the node holding the newest copy (an incremental checkpoint and
// the ones it needs), restored from it (the
// counter goes on from the checkpoint's value with the same getpid() and
// heap checksum, not from 0), and `status` says so with the work rolled
// back. The cut-off node still runs its copy (no fencing yet); when the
// link comes back, its agent kills that copy as soon as its replica
// shows the workload elsewhere.
func TestFailoverFromCheckpoint(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	lab := netlab.New(t, 3, 100+int(c.prefix[6])%50)
	var nodes []*testNode
	for i := 1; i <= 3; i++ {
		extra := []string{"-bootstrap-expect", "3", "-failover"}
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
	byName := map[string]*testNode{}
	for _, nd := range nodes {
		byName[nd.name] = nd
	}
	var w api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, "-label", "app=fo", "-name", "counter", bin, "100")
	c.ctl(nodes[1], "checkpoint", "policy", "set", "-selector", "app=fo", "-interval", "2s", "-keep", "2", "fo")
	// Every checkpoint after the first is incremental on the one before
	// (full every 8): the restore reads the chain.
	c.waitFor(30*time.Second, "an incremental checkpoint with its copy", func() error {
		var wc api.WorkloadCheckpoints
		c.ctlJSON(nodes[1], &wc, "checkpoint", "list", w.ID)
		if n := len(wc.Checkpoints); n == 0 || len(wc.Checkpoints[n-1].Holders) < 2 || wc.Checkpoints[n-1].Parent == 0 {
			return fmt.Errorf("%+v", wc.Checkpoints)
		}
		return nil
	})
	logOf := func(nd *testNode) []counterLine {
		b, _ := os.ReadFile(filepath.Join(nd.dataDir, "workloads", w.ID, "stdout.log"))
		s := string(b)
		if i := strings.LastIndexByte(s, '\n'); i >= 0 {
			s = s[:i+1] // whole lines only
		} else {
			s = ""
		}
		return parseCounter(t, nd.name+"'s log", s)
	}
	cut := time.Now()
	lab.Cut(t, 0, true)
	// Read the majority's replica as it is: a consistent read may be
	// forwarded to the cut-off leader and hang until its timeout.
	stale, err := api.New(nodes[1].socket, nil)
	if err != nil {
		t.Fatal(err)
	}
	stale.Stale = true
	var got api.Workload
	seen := ""
	c.waitFor(60*time.Second, "the counter back on another node", func() error {
		var err error
		got, err = stale.Workload(context.Background(), w.ID)
		if phase := fmt.Sprintf("%s on %s attempt %d", got.State, got.Node, got.Attempt); err == nil && phase != seen {
			// The timeline: detection (lost), decision (pending
			// elsewhere), restore (running).
			t.Logf("%6.2fs %s", time.Since(cut).Seconds(), phase)
			seen = phase
		}
		if err != nil || got.State != "running" || got.Node == nodes[0].name || got.PID == 0 || got.Failover == nil {
			return fmt.Errorf("%s on %s attempt %d (%v)", got.State, got.Node, got.Attempt, err)
		}
		return nil
	})
	took := time.Since(cut)
	if got.Failover.Checkpoint == 0 || got.Failover.From != nodes[0].name || got.Failover.To != got.Node {
		t.Fatalf("failover %+v: want from %s, restored from a checkpoint on %s", got.Failover, nodes[0].name, got.Node)
	}
	t.Logf("cut to running elsewhere: %v; checkpoint %d, %v of work rolled back", took.Round(time.Millisecond),
		got.Failover.Checkpoint, time.Duration(got.Failover.Age))
	wc, err := stale.Checkpoints(context.Background(), w.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, cp := range wc.Checkpoints {
		if cp.Seq == got.Failover.Checkpoint && cp.Parent == 0 {
			t.Errorf("restored from checkpoint %d, a full one: want an incremental one (its chain read)", cp.Seq)
		}
	}
	there := byName[got.Node]
	var restored []counterLine
	c.waitFor(20*time.Second, "the restored counter's lines on "+there.name, func() error {
		if restored = logOf(there); len(restored) < 3 {
			return fmt.Errorf("%d lines", len(restored))
		}
		return nil
	})
	old := logOf(nodes[0])
	if restored[0].n <= 0 || restored[0].pid != old[0].pid || restored[0].sum != old[0].sum {
		t.Fatalf("on %s the counter starts with %+v: want the checkpoint's state (getpid %d, sum %s), not a fresh start",
			there.name, restored[0], old[0].pid, old[0].sum)
	}
	if restored[0].n > old[len(old)-1].n {
		t.Fatalf("on %s the counter starts at %d, beyond the original's last line %d", there.name, restored[0].n, old[len(old)-1].n)
	}
	checkRun(t, "on "+there.name, nil, restored)
	out := c.ctl(nodes[1], "status", w.ID)
	if !strings.Contains(out, "Failover:") || !strings.Contains(out, fmt.Sprintf("restored from checkpoint %d", got.Failover.Checkpoint)) {
		t.Errorf("status: got %q, want the failover line", out)
	}
	// The cut-off node still runs its copy; the link comes back.
	lab.Cut(t, 0, false)
	healed := time.Now()
	c.waitFor(120*time.Second, "the cut-off node's copy to be killed", func() error {
		if got := copies(bin); len(got) != 1 {
			return fmt.Errorf("copies %v", got)
		}
		return nil
	})
	t.Logf("link up to the stale copy gone: %v", time.Since(healed).Round(time.Millisecond))
	if b, _ := os.ReadFile(nodes[0].logPath); !strings.Contains(string(b), "killing this node's stale copy") {
		t.Errorf("%s's log does not say it killed its stale copy", nodes[0].name)
	}
	if got, err := workloadOn(nodes[1], w.ID); err != nil || got.State != "running" || got.Node != there.name {
		t.Errorf("after the heal: %s on %s (%v), want running on %s", got.State, got.Node, err, there.name)
	}
}
