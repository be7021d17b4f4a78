package cluster_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
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
		nodes := startDrainLab(b, c, 150+int(c.prefix[2])%50, migrateLiveFlag())
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
				longest = max(longest, m.Stopped())
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

var (
	toolsOnce sync.Once
	toolsErr  error
)

// toolBinaries builds cmd/pfreeze and cmd/pthaw beside pclusterd (the
// baseline of BenchmarkMigrate1GiB).
func toolBinaries(tb testing.TB) (pfreeze, pthaw string) {
	tb.Helper()
	binaries(tb)
	toolsOnce.Do(func() {
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			toolsErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/pfreeze", "./cmd/pthaw")
		cmd.Dir = filepath.Dir(strings.TrimSpace(string(out)))
		if b, err := cmd.CombinedOutput(); err != nil {
			toolsErr = fmt.Errorf("go build: %v\n%s", err, b)
		}
	})
	if toolsErr != nil {
		tb.Fatal(toolsErr)
	}
	return filepath.Join(binDir, "pfreeze"), filepath.Join(binDir, "pthaw")
}

// migrateLiveFlag gives the benchmarks' nodes -migrate-live=false when
// PCLUSTER_MIGRATE_LIVE=false (stop-and-copy figures); nil otherwise:
// live, the default.
func migrateLiveFlag() func(int) []string {
	if os.Getenv("PCLUSTER_MIGRATE_LIVE") != "false" {
		return nil
	}
	return func(int) []string { return []string{"-migrate-live=false"} }
}

// migrateBenchMiB is the heap of BenchmarkMigrate1GiB's processes.
const migrateBenchMiB = 1024

// BenchmarkMigrate1GiB moves a process holding 1 GiB of pseudo-random
// memory (bigheap) between two nodes of a 3-node cluster, each pclusterd in
// its own network namespace (`pclusterctl migrate -node`: the agents'
// path, mutual TLS and -compress auto), and in the same run moves the same
// kind of process between the same two namespaces with `pfreeze -halt
// -compress auto -encrypt aes-gcm:KEY` to a listening `pthaw -keydir`
// (the same protection: the stream is authenticated and encrypted). It
// reports the migration's time from plan to done over pfreeze's wall time
// (ratio, target ≤ 1.1), the time the process was stopped in the
// migration (freeze to start on the target, as the state records it;
// target ≤ 1.2 s), and both rates (VmRSS over the time).
//
// The agents migrate live (their default); PCLUSTER_MIGRATE_LIVE=false
// starts them with -migrate-live=false, for the stop-and-copy figures
// (BenchmarkDrain10x64MiB too).
//
//	go test -run '^$' -bench Migrate1GiB -benchtime 1x ./cluster
func BenchmarkMigrate1GiB(b *testing.B) {
	bin := fixture.Build(b, "bigheap")
	pfreeze, pthaw := toolBinaries(b)
	c := newTestCluster(b)
	nodes := startDrainLab(b, c, 200+int(c.prefix[2])%50, migrateLiveFlag())
	src, dst := nodes[0], nodes[1]
	keyDir := b.TempDir()
	keyFile := filepath.Join(keyDir, "bench.key")
	key := make([]byte, 32)
	rand.Read(key)
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		b.Fatal(err)
	}
	// Two baselines: the same protection as the agents' path (auto,
	// encrypted and authenticated), and the fastest pfreeze there is
	// (uncompressed plaintext).
	baselines := []struct {
		name string
		args []string
	}{
		{"auto+aes-gcm", []string{"-compress", "auto", "-encrypt", "aes-gcm:" + keyFile}},
		{"plain", []string{"-compress", "none", "-insecure"}},
	}
	base := make([]time.Duration, len(baselines))
	var mig, stopped time.Duration
	var baseBytes, migBytes float64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		for j, bl := range baselines {
			d, rss := pfreezeOver(b, pfreeze, pthaw, bin, src, dst, keyDir, bl.name, bl.args)
			base[j] += d
			if j == 0 {
				baseBytes += float64(rss)
			}
		}

		// The migration, through the cluster.
		var w api.Workload
		c.ctlJSON(src, &w, "run", "-node", src.name, "-name", fmt.Sprintf("heap%d", i), bin, strconv.Itoa(migrateBenchMiB), "3")
		c.waitFor(2*time.Minute, w.ID+" to fill its heap", func() error {
			out, err := os.ReadFile(filepath.Join(src.dataDir, "workloads", w.ID, "stdout.log"))
			if err != nil || !strings.Contains(string(out), "ready hash=") {
				return fmt.Errorf("not ready (%v)", err)
			}
			return nil
		})
		w, err := workloadOn(src, w.ID)
		if err != nil {
			b.Fatal(err)
		}
		out, _ := os.ReadFile(filepath.Join(src.dataDir, "workloads", w.ID, "stdout.log"))
		hash := regexp.MustCompile(`ready hash=([0-9a-f]+)`).FindStringSubmatch(string(out))[1]
		rss := fixture.VmRSS(b, w.PID)
		srcUser0, srcSys0 := fixture.CPUTimes(b, src.cmd.Process.Pid)
		dstUser0, dstSys0 := fixture.CPUTimes(b, dst.cmd.Process.Pid)
		b.StartTimer()
		busy0, total0 := fixture.MachineCPU(b)
		phases := c.ctl(src, "migrate", "-node", dst.name, w.ID)
		busy1, total1 := fixture.MachineCPU(b)
		b.StopTimer()
		srcUser1, srcSys1 := fixture.CPUTimes(b, src.cmd.Process.Pid)
		dstUser1, dstSys1 := fixture.CPUTimes(b, dst.cmd.Process.Pid)
		ms, err := src.client.Migrations(context.Background(), true)
		if err != nil {
			b.Fatal(err)
		}
		var m *api.Migration
		for j := range ms {
			if ms[j].Workload == w.ID && ms[j].State == "done" {
				m = &ms[j]
			}
		}
		if m == nil || m.TransferAt.IsZero() {
			b.Fatalf("no done migration of %s with its transfer time: %+v", w.ID, ms)
		}
		mig += m.EndedAt.Sub(m.PlannedAt)
		b.Logf("migrate: %d MiB in %.2f s (planned→transferring %.2f s, %d live rounds of %d MiB, stopped %.2f s; source pclusterd usr %.2f sys %.2f, target usr %.2f sys %.2f; machine %.2f cores busy)",
			rss>>20, m.EndedAt.Sub(m.PlannedAt).Seconds(), m.TransferAt.Sub(m.PlannedAt).Seconds(), m.Rounds, m.PrecopyBytes>>20, m.Stopped().Seconds(),
			srcUser1-srcUser0, srcSys1-srcSys0, dstUser1-dstUser0, dstSys1-dstSys0, float64(runtime.NumCPU())*(busy1-busy0)/(total1-total0))
		b.Logf("pclusterctl migrate:\n%s", phases)
		stopped += m.Stopped()
		migBytes += float64(rss)
		// The moved process is the original: its heap hashes the same.
		// (Its PID here is new: the source's copy held the old one.)
		moved, err := workloadOn(dst, w.ID)
		if err != nil || moved.PID <= 0 {
			b.Fatalf("the moved workload: pid %d (%v)", moved.PID, err)
		}
		syscall.Kill(moved.PID, syscall.SIGUSR1)
		c.waitFor(time.Minute, "the moved heap's check", func() error {
			out, err := os.ReadFile(filepath.Join(dst.dataDir, "workloads", w.ID, "stdout.log"))
			if strings.Contains(string(out), "check hash="+hash+" MISMATCH") {
				b.Fatalf("moved heap: %s", out)
			}
			if err != nil || !strings.Contains(string(out), "check hash="+hash+" ok") {
				return fmt.Errorf("no check yet (%v)", err)
			}
			return nil
		})
		c.ctl(src, "stop", w.ID)
		c.waitFor(time.Minute, "the workload to stop", func() error {
			if cs := copies(bin); len(cs) != 0 {
				return fmt.Errorf("copies %v", cs)
			}
			return nil
		})
	}
	b.ReportMetric(mig.Seconds()/base[0].Seconds(), "ratio")
	b.ReportMetric(mig.Seconds()/base[1].Seconds(), "ratio-to-plain")
	b.ReportMetric(float64(stopped.Milliseconds())/float64(b.N), "ms-stopped")
	b.ReportMetric(migBytes/mig.Seconds()/1e6, "migrate-MB/s")
	b.ReportMetric(baseBytes/base[0].Seconds()/1e6, "pfreeze-MB/s")
	b.ReportMetric(baseBytes/base[1].Seconds()/1e6, "pfreeze-plain-MB/s")
}

// pfreezeOver moves a bigheap of migrateBenchMiB from src's host to dst's
// with pfreeze -halt args to pthaw listening there (-keydir keyDir, or
// -insecure when args has it) and returns pfreeze's wall time and the
// process's VmRSS before.
func pfreezeOver(b *testing.B, pfreeze, pthaw, bin string, src, dst *testNode, keyDir, name string, args []string) (time.Duration, int64) {
	b.Helper()
	p := fixture.Start(b, "nsenter", "--net=/run/netns/"+src.netns, "--", bin, strconv.Itoa(migrateBenchMiB), "3")
	p.Lines.Expect(b, `^ready hash=`, 2*time.Minute)
	rss := fixture.VmRSS(b, p.Pid())
	th, addr := listenPthaw(b, pthaw, dst, keyDir, slices.Contains(args, "-insecure"))
	fr := exec.Command("nsenter", append([]string{"--net=/run/netns/" + src.netns, "--", pfreeze, "-pid", strconv.Itoa(p.Pid()),
		"-halt", "-dest", "tcp:" + addr}, args...)...)
	b.StartTimer()
	busy0, total0 := fixture.MachineCPU(b)
	t0 := time.Now()
	out, err := fr.CombinedOutput()
	d := time.Since(t0)
	busy1, total1 := fixture.MachineCPU(b)
	b.StopTimer()
	if err != nil {
		b.Fatalf("pfreeze %s: %v: %s; pthaw: %s", name, err, out, th.stderr())
	}
	thUser, thSys := fixture.CPUTimes(b, th.cmd.Process.Pid)
	b.Logf("pfreeze %s: %d MiB in %.2f s (pfreeze usr %.2f sys %.2f, pthaw usr %.2f sys %.2f; machine %.2f cores busy)",
		name, rss>>20, d.Seconds(), fr.ProcessState.UserTime().Seconds(), fr.ProcessState.SystemTime().Seconds(),
		thUser, thSys, float64(runtime.NumCPU())*(busy1-busy0)/(total1-total0))
	th.stop(b)
	p.Wait(time.Minute)
	return d, rss
}

// benchThaw is a pthaw listening on a node's host.
type benchThaw struct {
	cmd  *exec.Cmd
	errb *syncBuffer
	done chan struct{}
}

func (th *benchThaw) stderr() string { return th.errb.String() }

// listenPthaw starts pthaw -src tcp:IP:0 -keydir dir (or -insecure) in nd's network
// namespace and returns it with the address it listens on.
func listenPthaw(b *testing.B, pthaw string, nd *testNode, dir string, insecure bool) (*benchThaw, string) {
	b.Helper()
	th := &benchThaw{errb: &syncBuffer{}, done: make(chan struct{})}
	auth := []string{"-keydir", dir}
	if insecure {
		auth = []string{"-insecure"}
	}
	th.cmd = exec.Command("nsenter", append([]string{"--net=/run/netns/" + nd.netns, "--", pthaw, "-src", "tcp:" + nd.ip + ":0"}, auth...)...)
	th.cmd.Stderr = th.errb
	if err := th.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() { th.cmd.Wait(); close(th.done) }()
	b.Cleanup(func() {
		th.cmd.Process.Kill()
		<-th.done
	})
	rx := regexp.MustCompile(`pthaw: listening on (\S+)`)
	var addr string
	c := &testCluster{tb: b}
	c.waitFor(30*time.Second, "pthaw to listen", func() error {
		if m := rx.FindStringSubmatch(th.errb.String()); m != nil {
			addr = m[1]
			return nil
		}
		select {
		case <-th.done:
			b.Fatalf("pthaw exited: %s", th.errb.String())
		default:
		}
		return fmt.Errorf("not yet: %s", th.errb.String())
	})
	return th, addr
}

// stop kills the process pthaw restored (its child) and waits for pthaw,
// which waits for it, to end.
func (th *benchThaw) stop(b *testing.B) {
	b.Helper()
	kids := childrenOf(th.cmd.Process.Pid)
	if len(kids) == 0 {
		b.Fatalf("pthaw has no restored child: %s", th.errb.String())
	}
	for pid := range kids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	select {
	case <-th.done:
	case <-time.After(time.Minute):
		b.Fatalf("pthaw still runs after its process was killed: %s", th.errb.String())
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
