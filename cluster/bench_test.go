package cluster_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/internal/fixture"
)

// BenchmarkFailover3Nodes crashes (SIGKILL) the leader of a 3-node cluster
// of real pclusterd processes on loopback, with the default (LAN) gossip and
// raft timings, and reports the time until a survivor reports another
// leader and until the state records the dead node as down.
func BenchmarkFailover3Nodes(b *testing.B) {
	var failover, down time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		c := newTestCluster(b)
		leader, survivor := leaderAndFollower(b, c)
		b.StartTimer()
		killed := time.Now()
		c.kill(leader)
		gotLeader := false
		for {
			if !gotLeader {
				if ms, err := survivor.client.Members(context.Background()); err == nil {
					if l := leaderOf(ms); l != "" && l != leader.name {
						failover += time.Since(killed)
						gotLeader = true
					}
				}
			}
			if gotLeader {
				if n, err := survivor.client.Node(context.Background(), leader.name); err == nil && n.Status == "down" {
					down += time.Since(killed)
					break
				}
			}
			if time.Since(killed) > time.Minute {
				b.Fatal("no failover within a minute")
			}
			time.Sleep(20 * time.Millisecond)
		}
		b.StopTimer()
		c.cleanup()
	}
	b.ReportMetric(float64(failover.Milliseconds())/float64(b.N), "ms-new-leader")
	b.ReportMetric(float64(down.Milliseconds())/float64(b.N), "ms-node-down")
}

// BenchmarkGossipConvergence50 starts 50 memberlist nodes on loopback with
// pclusterd's settings (LAN profile, encrypted), joins each to the first,
// and reports the time from the first join until every node sees all 50.
func BenchmarkGossipConvergence50(b *testing.B) {
	const n = 50
	key, _ := pki.NewKey()
	var total time.Duration
	run := time.Now().UnixNano() % 1e6
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		var mls []*memberlist.Memberlist
		for j := 0; j < n; j++ {
			mc := memberlist.DefaultLANConfig()
			mc.Name = fmt.Sprintf("g%d-%d-%02d", run, i, j)
			mc.BindAddr, mc.BindPort, mc.AdvertisePort = "127.0.0.1", 0, 0
			mc.SecretKey = key.GossipKey()
			mc.Logger = log.New(io.Discard, "", 0)
			ml, err := memberlist.Create(mc)
			if err != nil {
				b.Fatal(err)
			}
			mls = append(mls, ml)
		}
		seed := mls[0].LocalNode().Address()
		b.StartTimer()
		start := time.Now()
		for _, ml := range mls[1:] {
			if _, err := ml.Join([]string{seed}); err != nil {
				b.Fatal(err)
			}
		}
		for {
			all := true
			for _, ml := range mls {
				if ml.NumMembers() != n {
					all = false
					break
				}
			}
			if all {
				break
			}
			if time.Since(start) > time.Minute {
				var counts []int
				for _, ml := range mls {
					counts = append(counts, ml.NumMembers())
				}
				b.Fatalf("no convergence within a minute: members seen %v", counts)
			}
			time.Sleep(10 * time.Millisecond)
		}
		total += time.Since(start)
		b.StopTimer()
		for _, ml := range mls {
			ml.Shutdown()
		}
	}
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms-converge")
}

// BenchmarkWrite3Nodes measures `run` writes (placement + raft commit on a
// 3-node cluster) through the API of the leader and of a follower (which
// forwards to the leader over mutual TLS), 50 writes each per iteration.
func BenchmarkWrite3Nodes(b *testing.B) {
	const writes = 50
	var viaLeader, viaFollower time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		c := newTestCluster(b)
		leader, follower := leaderAndFollower(b, c)
		b.StartTimer()
		for _, tc := range []struct {
			nd  *testNode
			sum *time.Duration
		}{{leader, &viaLeader}, {follower, &viaFollower}} {
			start := time.Now()
			for j := 0; j < writes; j++ {
				if _, err := tc.nd.client.Run(context.Background(), api.RunRequest{Command: "true"}); err != nil {
					b.Fatal(err)
				}
			}
			*tc.sum += time.Since(start)
		}
		b.StopTimer()
		c.cleanup()
	}
	per := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N*writes) }
	b.ReportMetric(per(viaLeader), "ms/write-leader")
	b.ReportMetric(per(viaFollower), "ms/write-follower")
}

// leaderAndFollower starts three nodes and returns the leader and one of
// the others.
func leaderAndFollower(b *testing.B, c *testCluster) (leader, follower *testNode) {
	nodes := startThree(c)
	ms, err := nodes[0].client.Members(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	leader = c.nodes[leaderOf(ms)]
	for _, nd := range nodes {
		if nd != leader {
			follower = nd
		}
	}
	return leader, follower
}

// BenchmarkDrain10x64MiB drains a node running 10 workloads of 64 MiB
// (internal/fixture's bigheap: pseudo-random, incompressible) to the two
// others of a 3-node cluster in network namespaces, -max-parallel 2, and
// reports the drain's time (start to complete, as the state records it)
// and the longest time one process was stopped (freeze to start on the
// target).
func BenchmarkDrain10x64MiB(b *testing.B) {
	bin := fixture.Build(b, "bigheap")
	var took, longest time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		c := newTestCluster(b)
		nodes := startDrainLab(b, c, 150+int(c.prefix[2])%50, nil)
		from, via := nodes[0], nodes[1]
		var ids []string
		for j := range 10 {
			var w api.Workload
			c.ctlJSON(via, &w, "run", "-node", from.name, "-name", fmt.Sprintf("heap%d", j), bin, "64", strconv.Itoa(j+1))
			ids = append(ids, w.ID)
		}
		for _, id := range ids {
			c.waitFor(time.Minute, id+" to fill its heap", func() error {
				out, err := os.ReadFile(filepath.Join(from.dataDir, "workloads", id, "stdout.log"))
				if err != nil || !strings.Contains(string(out), "ready hash=") {
					return fmt.Errorf("not ready (%v)", err)
				}
				return nil
			})
		}
		b.StartTimer()
		c.ctl(via, "drain", "-max-parallel", "2", from.name)
		b.StopTimer()
		n, err := via.client.Node(context.Background(), from.name)
		if err != nil || n.Drain == nil || n.Drain.Moved != len(ids) {
			b.Fatalf("drain: %+v (%v), want %d moved", n.Drain, err, len(ids))
		}
		took += n.Drain.CompletedAt.Sub(n.Drain.StartedAt)
		ms, err := via.client.Migrations(context.Background(), true)
		if err != nil {
			b.Fatal(err)
		}
		for _, m := range ms {
			if m.State == "done" && !m.TransferAt.IsZero() {
				longest = max(longest, m.EndedAt.Sub(m.TransferAt))
			}
		}
		for _, id := range ids {
			c.ctl(via, "stop", id)
		}
		c.waitFor(time.Minute, "the workloads to stop", func() error {
			if cs := copies(bin); len(cs) != 0 {
				return fmt.Errorf("copies %v", cs)
			}
			return nil
		})
	}
	b.ReportMetric(took.Seconds()/float64(b.N), "s-drain")
	b.ReportMetric(float64(longest.Milliseconds()), "ms-longest-stop")
}
