package cluster_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
)

// ckptFile is the file of checkpoint seq of workload id in nd's data dir.
func ckptFile(nd *testNode, id string, seq uint64) string {
	return filepath.Join(nd.dataDir, "checkpoints", fmt.Sprintf("%s.%d.ckpt", id, seq))
}

// TestCheckpointPolicy runs a counter under a policy with a 5 s interval,
// keep 2, one replica, every second checkpoint full (the others
// incremental on the one before), on a 3-node cluster in network
// namespaces, each node with its own data directory: checkpoints appear,
// each with a copy on another node whose bytes are the original's (the
// copy is found in the other node's directory; the nodes never read each
// other's), an incremental one's copy beside its parent's; the retention
// deletes the older ones from every directory, but never one a kept
// checkpoint needs; and on the node
// whose disk reserve cannot be met, checkpoints of a second workload fail
// and are reported, retried, in `checkpoint list`.
func TestCheckpointPolicy(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	nodes := startDrainLab(t, c, 100+int(c.prefix[3])%50, func(i int) []string {
		if i == 3 {
			return []string{"-checkpoint-reserve-mb", "1000000000"} // a petabyte: never free
		}
		return []string{"-checkpoint-reserve-mb", "0"}
	})
	byName := map[string]*testNode{}
	for _, nd := range nodes {
		byName[nd.name] = nd
	}
	var w, bad api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, "-label", "app=ckpt", "-name", "counter", bin, "200")
	c.ctlJSON(nodes[0], &bad, "run", "-node", nodes[2].name, "-label", "app=ckpt", "-name", "full", bin, "200")
	out := c.ctl(nodes[1], "checkpoint", "policy", "set", "-selector", "app=ckpt", "-interval", "5s", "-keep", "2", "-replicas", "1",
		"-full-every", "2", "every5s")
	if !strings.Contains(out, "every5s set") {
		t.Fatalf("policy set: got %q", out)
	}
	if out := c.ctl(nodes[2], "checkpoint", "policy", "list"); !strings.Contains(out, "app=ckpt") || !strings.Contains(out, "5s") {
		t.Fatalf("policy list: got %q, want the policy with its selector and interval", out)
	}

	// Three checkpoints of the counter, the last two kept, each copied.
	var wc api.WorkloadCheckpoints
	c.waitFor(60*time.Second, "three checkpoints of the counter, each with a copy", func() error {
		wc = api.WorkloadCheckpoints{}
		c.ctlJSON(nodes[1], &wc, "checkpoint", "list", w.ID)
		if n := len(wc.Checkpoints); n == 0 || wc.Checkpoints[n-1].Seq < 3 {
			return fmt.Errorf("checkpoints %+v", wc.Checkpoints)
		}
		for _, cp := range wc.Checkpoints {
			if len(cp.Holders) < 2 {
				return fmt.Errorf("checkpoint %d held by %v", cp.Seq, cp.Holders)
			}
		}
		return nil
	})
	if wc.Policy != "every5s" || wc.FailedTotal != 0 {
		t.Errorf("counter: policy %q, %d failures (%s): want every5s and none", wc.Policy, wc.FailedTotal, wc.LastError)
	}
	if len(wc.Checkpoints) > 3 {
		// The retention may lag a round: wait for it below.
		t.Logf("%d checkpoints listed before the retention ran", len(wc.Checkpoints))
	}
	// Full every second: 1 full, 2 on 1, 3 full, 4 on 3...
	bySeq := map[uint64]api.Checkpoint{}
	for _, cp := range wc.Checkpoints {
		bySeq[cp.Seq] = cp
	}
	incremental := 0
	for _, cp := range wc.Checkpoints {
		if cp.Seq%2 == 0 && cp.Parent != cp.Seq-1 || cp.Seq%2 == 1 && cp.Parent != 0 {
			t.Errorf("checkpoint %d has parent %d: want every second one full, the others on the one before", cp.Seq, cp.Parent)
		}
		if p, ok := bySeq[cp.Parent]; ok && cp.Parent != 0 {
			incremental++
			if strings.Join(cp.Holders, ",") != strings.Join(p.Holders, ",") {
				t.Errorf("checkpoint %d held by %v, its parent %d by %v: want its copy beside its parent's", cp.Seq, cp.Holders, p.Seq, p.Holders)
			}
			t.Logf("checkpoint %d: %d bytes, on %d of %d bytes", cp.Seq, cp.Size, p.Seq, p.Size)
			// The counter writes a few pages between two checkpoints;
			// its 1 MiB heap and the rest stay as they were.
			if cp.Size*4 > p.Size {
				t.Errorf("checkpoint %d: %d bytes, its full parent %d: want it a fraction", cp.Seq, cp.Size, p.Size)
			}
		}
	}
	if incremental == 0 {
		t.Errorf("no incremental checkpoint listed with its parent: %+v", wc.Checkpoints)
	}
	if out := c.ctl(nodes[2], "checkpoint", "list", w.ID); !strings.Contains(out, "KIND") || !strings.Contains(out, "full") || !strings.Contains(out, "on ") {
		t.Errorf("checkpoint list: got %q, want full and incremental (on SEQ) ones told apart", out)
	}
	for _, cp := range wc.Checkpoints {
		if cp.Node != nodes[0].name || cp.Holders[0] != nodes[0].name || cp.Size <= 0 {
			t.Fatalf("checkpoint %+v: want taken by %s, with a size", cp, nodes[0].name)
		}
		orig, err := os.ReadFile(ckptFile(nodes[0], w.ID, cp.Seq))
		if err != nil {
			if os.IsNotExist(err) {
				continue // pruned meanwhile
			}
			t.Fatal(err)
		}
		if int64(len(orig)) != cp.Size {
			t.Errorf("checkpoint %d: file of %d bytes, the state says %d", cp.Seq, len(orig), cp.Size)
		}
		if bytes.Contains(orig, []byte("migcount")) {
			t.Errorf("checkpoint %d: the file holds the program's name in clear: want it encrypted at rest", cp.Seq)
		}
		holder := byName[cp.Holders[1]]
		if holder == nil || holder == nodes[0] {
			t.Fatalf("checkpoint %d: copy on %v: want another node of the lab", cp.Seq, cp.Holders)
		}
		cpy, err := os.ReadFile(ckptFile(holder, w.ID, cp.Seq))
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		if err == nil && !bytes.Equal(cpy, orig) {
			t.Errorf("checkpoint %d: the copy on %s differs from the original (%d bytes, %d)", cp.Seq, holder.name, len(cpy), len(orig))
		}
	}

	// Retention: two kept and the full one the older of them needs, and
	// no node keeps a file of an older one (the first checkpoint had its
	// original and a copy).
	c.waitFor(30*time.Second, "the retention to delete checkpoint 1 everywhere", func() error {
		wc = api.WorkloadCheckpoints{}
		c.ctlJSON(nodes[0], &wc, "checkpoint", "list", w.ID)
		if len(wc.Checkpoints) > 3 {
			return fmt.Errorf("%d checkpoints kept", len(wc.Checkpoints))
		}
		kept := map[uint64]bool{}
		for _, cp := range wc.Checkpoints {
			kept[cp.Seq] = true
		}
		for _, cp := range wc.Checkpoints {
			if cp.Parent != 0 && !kept[cp.Parent] {
				t.Fatalf("checkpoint %d kept without its parent %d: %+v", cp.Seq, cp.Parent, wc.Checkpoints)
			}
		}
		for _, nd := range nodes {
			if _, err := os.Stat(ckptFile(nd, w.ID, 1)); err == nil {
				return fmt.Errorf("checkpoint 1 still on %s", nd.name)
			}
		}
		return nil
	})
	for _, nd := range nodes {
		ents, _ := os.ReadDir(filepath.Join(nd.dataDir, "checkpoints"))
		for _, e := range ents {
			var seq uint64
			var id string
			if n, _ := fmt.Sscanf(strings.ReplaceAll(e.Name(), ".", " "), "%s %d", &id, &seq); n == 2 && id == w.ID && seq+2 < wc.Checkpoints[0].Seq {
				t.Errorf("%s keeps %s, older than the retention allows (kept from %d)", nd.name, e.Name(), wc.Checkpoints[0].Seq)
			}
		}
	}

	// The workload on the node without room: failures reported, retried.
	c.waitFor(30*time.Second, "failed checkpoints of "+bad.ID+" reported", func() error {
		var bc api.WorkloadCheckpoints
		c.ctlJSON(nodes[1], &bc, "checkpoint", "list", bad.ID)
		if bc.FailedTotal < 2 || !strings.Contains(bc.LastError, "disk reserve") {
			return fmt.Errorf("%d failures, last %q", bc.FailedTotal, bc.LastError)
		}
		if len(bc.Checkpoints) != 0 {
			t.Fatalf("checkpoints of %s listed although its node has no room: %+v", bad.ID, bc.Checkpoints)
		}
		return nil
	})
	if out := c.ctl(nodes[0], "checkpoint", "list", bad.ID); !strings.Contains(out, "Failures:") || !strings.Contains(out, "disk reserve") {
		t.Errorf("checkpoint list of %s: got %q, want its failures", bad.ID, out)
	}
	if b, _ := os.ReadFile(nodes[2].logPath); !strings.Contains(string(b), "checkpoint failed") {
		t.Errorf("%s's log has no line for the failed checkpoint", nodes[2].name)
	}
	// The metrics, from the replicated state on any node.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", nodes[1].socket)
	}}}
	c.waitFor(10*time.Second, "checkpoint metrics", func() error {
		resp, err := hc.Get("http://pclusterd/metrics")
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var kept, failed float64
		for _, l := range strings.Split(string(body), "\n") {
			fmt.Sscanf(l, "pcluster_checkpoints %g", &kept)
			fmt.Sscanf(l, `pcluster_checkpoint_failures{kind="total"} %g`, &failed)
		}
		if kept < 1 || failed < 2 {
			return fmt.Errorf("pcluster_checkpoints %v, failures total %v: want >= 1 and >= 2", kept, failed)
		}
		return nil
	})

	// Stopping the counter and its collection are not needed for the
	// files' fate: deleting the policy stops new checkpoints.
	c.ctl(nodes[0], "checkpoint", "policy", "delete", "every5s")
	if out := c.ctl(nodes[0], "checkpoint", "policy", "list"); strings.Contains(out, "every5s") {
		t.Errorf("policy list after delete: got %q", out)
	}
}
