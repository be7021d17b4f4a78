package cluster_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
)

// TestCheckpointRestore rolls a counter back to a checkpoint taken with
// `checkpoint now`: on its own node (the log continues from the
// checkpoint's value, with the same getpid() and heap checksum: the
// restored image, not a fresh start), then on the other node holding the
// copy (-node), where its first line follows the same value. Exactly one
// copy of the program runs after each.
func TestCheckpointRestore(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	nodes := startDrainLab(t, c, 100+int(c.prefix[5])%50, nil)
	var w api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, "-name", "counter", bin, "100")
	lines := func(nd *testNode) []counterLine {
		return parseCounter(t, "logs", c.ctl(nd, "logs", w.ID))
	}
	c.waitFor(20*time.Second, "the counter to count", func() error {
		// Until its replica has the workload, a node does not know it.
		out, errs, code := c.ctlRun("logs", "-address", nodes[0].socket, w.ID)
		if code != 0 {
			return fmt.Errorf("logs: exit %d: %s", code, errs)
		}
		if l := parseCounter(t, "logs", out); len(l) < 5 {
			return fmt.Errorf("%d lines", len(l))
		}
		return nil
	})
	c.ctl(nodes[1], "checkpoint", "now", w.ID)
	var cp api.Checkpoint
	c.waitFor(30*time.Second, "the checkpoint with its copy", func() error {
		var wc api.WorkloadCheckpoints
		c.ctlJSON(nodes[0], &wc, "checkpoint", "list", w.ID)
		if len(wc.Checkpoints) != 1 || len(wc.Checkpoints[0].Holders) != 2 {
			return fmt.Errorf("%+v", wc.Checkpoints)
		}
		cp = wc.Checkpoints[0]
		return nil
	})
	before := lines(nodes[0])
	atList := before[len(before)-1].n // at least the checkpoint's value
	c.waitFor(30*time.Second, "the counter to go on 20 more", func() error {
		before = lines(nodes[0])
		if n := before[len(before)-1].n; n < atList+20 {
			return fmt.Errorf("at %d", n)
		}
		return nil
	})
	c.ctl(nodes[2], "restore", "-checkpoint", fmt.Sprint(cp.Seq), w.ID)
	waitRunning := func(attempt int, node string) {
		c.waitFor(30*time.Second, fmt.Sprintf("attempt %d running on %s", attempt, node), func() error {
			got, err := workloadOn(nodes[0], w.ID)
			if err != nil || got.State != "running" || got.Attempt != attempt || got.Node != node || got.PID == 0 {
				return fmt.Errorf("%s attempt %d on %s pid %d (%v)", got.State, got.Attempt, got.Node, got.PID, err)
			}
			return nil
		})
	}
	waitRunning(2, nodes[0].name)
	var back int
	c.waitFor(30*time.Second, "the restored counter's lines", func() error {
		l := lines(nodes[0])
		for i := len(before); i < len(l); i++ {
			if l[i].n <= l[i-1].n {
				if i+3 > len(l) {
					return fmt.Errorf("rolled back at line %d, waiting for more", i)
				}
				back = i
				return nil
			}
		}
		return fmt.Errorf("no rollback in %d lines", len(l))
	})
	all := lines(nodes[0])
	first, last := all[back], all[back-1]
	if first.n <= 0 || first.n > atList+1 {
		t.Fatalf("restored counter starts at %d (before the restore it was at %d; the checkpoint was listed at %d): want 1..%d",
			first.n, last.n, atList, atList+1)
	}
	if first.pid != last.pid || first.sum != last.sum {
		t.Fatalf("restored line %+v, last before %+v: want the same getpid and heap checksum", first, last)
	}
	checkRun(t, "after the restore", nil, all[back:])
	if got := copies(bin); len(got) != 1 {
		t.Fatalf("after the restore: copies of the counter %v, want exactly one", got)
	}

	// Again, on the node holding the copy.
	other := nodes[1]
	if cp.Holders[1] == nodes[2].name {
		other = nodes[2]
	}
	c.ctl(nodes[0], "restore", "-node", other.name, w.ID)
	waitRunning(3, other.name)
	c.waitFor(30*time.Second, "the counter's lines on "+other.name, func() error {
		if l := lines(other); len(l) < 3 {
			return fmt.Errorf("%d lines", len(l))
		}
		return nil
	})
	there := lines(other)
	if there[0].n != first.n || there[0].pid != first.pid || there[0].sum != first.sum {
		t.Fatalf("on %s the counter starts with %+v: want %+v, the checkpoint's next line", other.name, there[0], first)
	}
	checkRun(t, "on "+other.name, nil, there)
	if got := copies(bin); len(got) != 1 {
		t.Fatalf("after the restore on %s: copies of the counter %v, want exactly one", other.name, got)
	}
	// And on the node holding no copy: copied there first.
	third := nodes[1]
	if other == nodes[1] || cp.Holders[1] == nodes[1].name {
		third = nodes[2]
	}
	t0 := time.Now()
	c.ctl(nodes[0], "restore", "-checkpoint", fmt.Sprint(cp.Seq), "-node", third.name, w.ID)
	t.Logf("restore with a copy to %s first: accepted after %v", third.name, time.Since(t0).Round(time.Millisecond))
	waitRunning(4, third.name)
	t.Logf("running there after %v", time.Since(t0).Round(time.Millisecond))
	c.waitFor(30*time.Second, "the counter's lines on "+third.name, func() error {
		if l := lines(third); len(l) < 3 {
			return fmt.Errorf("%d lines", len(l))
		}
		return nil
	})
	if l := lines(third); l[0] != first {
		t.Fatalf("on %s the counter starts with %+v: want %+v, the checkpoint's next line", third.name, l[0], first)
	}
	if got := copies(bin); len(got) != 1 {
		t.Fatalf("after the restore on %s: copies of the counter %v, want exactly one", third.name, got)
	}
	if _, errs, code := c.ctlRun("restore", "-address", nodes[0].socket, "-checkpoint", "99", w.ID); code != 3 {
		t.Errorf("restore of a checkpoint not kept: exit %d (%s), want 3 (not found)", code, errs)
	}
}
