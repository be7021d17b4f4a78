package cluster_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// TestPartitionHeals isolates the leader of three nodes, each in its own
// network namespace, for longer than memberlist keeps talking to dead
// nodes: the majority elects another leader and marks it down; when the
// network heals the isolated node re-joins by itself and is ready again.
//
// The first consistent read after the cut goes to a follower that still
// names the isolated node leader and forwards it there: it must give up
// when that follower's raft moves on (apiserver.go forward), not wait out
// the 30 s header timeout (a flake seen in CI when the node cut happened
// to lead).
func TestPartitionHeals(t *testing.T) {
	c := newTestCluster(t)
	lab, nodes := startLab(t, c, 100+int(c.prefix[1])%50)
	var ms []api.Member
	c.ctlJSON(nodes[0], &ms, "members")
	cut, reader := -1, nodes[0]
	for i, nd := range nodes {
		if nd.name == leaderOf(ms) {
			cut = i
		}
	}
	if cut < 0 {
		t.Fatalf("no leader among %+v", ms)
	}
	if cut == 0 {
		reader = nodes[1]
	}
	isolated := nodes[cut]
	start := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(start).Seconds(), what) }
	lab.Cut(t, cut, true)
	phase("link cut: " + isolated.name + ", the leader")
	c.waitFor(30*time.Second, isolated.name+" down in the majority's state", nodeStatus(reader, isolated.name, "down"))
	phase("down in the majority's state")
	c.waitFor(30*time.Second, isolated.name+" to see itself alone", func() error {
		ms, err := isolated.client.Members(context.Background())
		if err != nil {
			return err
		}
		if alive := aliveMembers(ms); alive != 1 {
			return fmt.Errorf("%d alive", alive)
		}
		return nil
	})
	// memberlist keeps gossiping to dead nodes for GossipToTheDeadTime (30 s
	// in the LAN profile) after marking them dead, which heals short
	// partitions by itself. Hold the cut well past that (32 s was seen to be
	// too short: memberlist can re-suspect a dead node, which restarts its
	// window), so that only pclusterd's own re-join can bring it back.
	phase("alone")
	time.Sleep(45 * time.Second)
	healed := time.Now()
	lab.Cut(t, cut, false)
	phase("link up")
	for _, nd := range nodes {
		c.waitFor(45*time.Second, nd.name+" to see all three again", func() error { return converged(nd, 3) })
	}
	phase("converged")
	c.waitFor(30*time.Second, isolated.name+" ready again", nodeStatus(reader, isolated.name, "ready"))
	t.Logf("re-joined %v after the network healed", time.Since(healed).Round(time.Millisecond))
	// The others may see it before its own re-join (5 s ticks) is logged.
	c.waitFor(15*time.Second, isolated.name+" to log its re-join", func() error {
		if b, _ := os.ReadFile(isolated.logPath); !strings.Contains(string(b), "re-joined cluster") {
			return fmt.Errorf("no \"re-joined cluster\" in its log")
		}
		return nil
	})
}
