package cluster_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

// startDrainLab starts a 3-node cluster in network namespaces (as
// startLab) on its own subnet; node i gets the label pin=i, so a workload
// constrained to pin=i can run nowhere else. extra, if not nil, gives more
// flags for node i.
func startDrainLab(t testing.TB, c *testCluster, subnet int, extraFor func(i int) []string) []*testNode {
	lab := netlab.New(t, 3, subnet)
	var nodes []*testNode
	for i := 1; i <= 3; i++ {
		extra := []string{"-bootstrap-expect", "3", "-label", fmt.Sprintf("pin=%d", i)}
		if i > 1 {
			extra = append(extra, "-join", lab.Hosts[0].Addr+":7946")
		}
		if extraFor != nil {
			extra = append(extra, extraFor(i)...)
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
	return nodes
}

// runCounters runs n migcount workloads named name0, name1... on nd (extra:
// more run flags) and waits until each runs; it returns them as running.
func runCounters(t testing.TB, c *testCluster, nd *testNode, bin, name string, n int, extra ...string) []api.Workload {
	t.Helper()
	var ws []api.Workload
	for i := range n {
		var w api.Workload
		args := append([]string{"run", "-node", nd.name, "-name", fmt.Sprintf("%s%d", name, i)}, extra...)
		c.ctlJSON(nd, &w, append(args, bin, "20")...)
		c.waitFor(20*time.Second, w.ID+" to run", func() error {
			got, err := workloadOn(nd, w.ID)
			if err != nil || got.State != "running" || got.PID == 0 {
				return fmt.Errorf("%s (%v)", got.State, err)
			}
			w = got
			return nil
		})
		ws = append(ws, w)
	}
	return ws
}

// checkMoved checks that each workload of ws runs on another node than
// from, with its PID in its namespace, exactly once (copies of bin are
// exactly their PIDs on the host, new ones),
// and that its counter went on: the lines the source wrote, then the
// target's, with no gap, no repeat and the same heap checksum.
func checkMoved(t *testing.T, c *testCluster, via, from *testNode, bin string, ws []api.Workload) {
	t.Helper()
	var pids []int
	for _, w := range ws {
		got, err := workloadOn(via, w.ID)
		if err != nil || got.State != "running" || got.Node == from.name {
			t.Fatalf("workload %s: %s on %s (%v), want running on another node than %s", w.ID, got.State, got.Node, err, from.name)
		}
		if got.NSPID != w.NSPID || got.PID == w.PID {
			t.Errorf("workload %s: pid %d, %d in its namespace after the drain: want %d there, a new one on the host (was %d)",
				w.ID, got.PID, got.NSPID, w.NSPID, w.PID)
		}
		pids = append(pids, got.PID)
		b, err := os.ReadFile(filepath.Join(from.dataDir, "workloads", w.ID, "stdout.log"))
		if err != nil {
			t.Fatalf("the source's log: %v", err)
		}
		seq := checkRun(t, w.ID+" on "+from.name, nil, parseCounter(t, from.name+"'s log", string(b)))
		c.waitFor(20*time.Second, "the log on "+got.Node, func() error {
			lines := parseCounter(t, got.Node+"'s log", c.ctl(via, "logs", w.ID))
			if len(lines) < 3 {
				return fmt.Errorf("%d lines", len(lines))
			}
			checkRun(t, w.ID+" on "+got.Node, seq, lines[:3])
			return nil
		})
	}
	slices.Sort(pids)
	if cs := sortedCopies(bin); !slices.Equal(cs, pids) {
		t.Fatalf("copies of the counter %v, want exactly %v", cs, pids)
	}
}

func sortedCopies(bin string) []int {
	cs := copies(bin)
	slices.Sort(cs)
	return cs
}

// checkDrained checks that node name's drain completed and left it
// ineligible and empty, and logs the drain's figures: its time, and the
// longest time a process was stopped.
func checkDrained(t *testing.T, via *testNode, name string) {
	t.Helper()
	n, err := via.client.Node(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	if n.Eligible || n.Workloads != 0 || n.Drain == nil || n.Drain.CompletedAt.IsZero() {
		t.Fatalf("node %s after the drain: eligible %v, %d workloads, drain %+v; want ineligible, empty, completed",
			name, n.Eligible, n.Workloads, n.Drain)
	}
	ms, err := via.client.Migrations(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	var longest time.Duration
	for _, m := range ms {
		if m.Source == name && m.State == "done" && !m.TransferAt.IsZero() && !m.PlannedAt.Before(n.Drain.StartedAt) {
			longest = max(longest, m.Stopped())
		}
	}
	t.Logf("drain of %s: %v, %d moved, longest stop %v", name, n.Drain.CompletedAt.Sub(n.Drain.StartedAt).Round(time.Millisecond),
		n.Drain.Moved, longest.Round(time.Millisecond))
}

// splitLeader returns the leader and the other nodes.
func splitLeader(t *testing.T, nodes []*testNode) (leader *testNode, others []*testNode) {
	t.Helper()
	ms, err := nodes[0].client.Members(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	l := leaderOf(ms)
	for _, nd := range nodes {
		if nd.name == l {
			leader = nd
		} else {
			others = append(others, nd)
		}
	}
	if leader == nil {
		t.Fatalf("no leader among %v", ms)
	}
	return leader, others
}

// TestDrain drains a node running 3 stateful counters to the two others,
// in the foreground: the command prints a line per workload moved and
// exits 0 once the node is empty; every counter keeps its PID and its
// state and runs exactly once; the node ends ineligible. Then the
// refusals: an unknown node (exit 3), the last eligible node (exit 1).
func TestDrain(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	nodes := startDrainLab(t, c, 150+int(c.prefix[2])%50, nil)
	from := nodes[0]
	ws := runCounters(t, c, from, bin, "counter", 3)
	out, errs, code := c.ctlRun("drain", "-address", nodes[1].socket, "-max-parallel", "2", from.name)
	t.Logf("drain:\n%s", out)
	if code != 0 {
		t.Fatalf("drain exit %d, want 0: %s", code, errs)
	}
	for _, w := range ws {
		if !strings.Contains(out, "moved "+w.ID+" ("+w.Name+") to ") {
			t.Errorf("drain output has no line for %s", w.ID)
		}
	}
	if !strings.Contains(out, "node "+from.name+" drained") {
		t.Errorf("drain output lacks the summary")
	}
	checkMoved(t, c, nodes[2], from, bin, ws)
	checkDrained(t, nodes[2], from.name)

	// Refusals, one line each.
	_, errs, code = c.ctlRun("node", "drain", "-address", nodes[1].socket, "no-such-node")
	if code != 3 || strings.Count(errs, "\n") != 1 {
		t.Errorf("drain of an unknown node: exit %d, %q; want 3 and one line", code, errs)
	}
	c.ctl(nodes[1], "node", "eligibility", "-disable", nodes[2].name)
	_, errs, code = c.ctlRun("node", "drain", "-address", nodes[1].socket, nodes[1].name)
	if code != 1 || strings.Count(errs, "\n") != 1 || !strings.Contains(errs, "last eligible node") {
		t.Errorf("drain of the last eligible node: exit %d, %q; want 1 and one line naming the reason", code, errs)
	}
	for _, w := range ws {
		c.ctl(nodes[1], "stop", w.ID)
	}
	c.waitFor(30*time.Second, "the counters to stop", func() error {
		if cs := copies(bin); len(cs) != 0 {
			return fmt.Errorf("copies %v", cs)
		}
		return nil
	})
}

// TestDrainLeaderKilled: the leader dies (SIGKILL) in the middle of a
// drain; the new leader carries it on from the state. The leader is made
// ineligible first, so no move goes to or from it: its death only costs
// the drain its leader.
func TestDrainLeaderKilled(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	nodes := startDrainLab(t, c, 150+int(c.prefix[3])%50, nil)
	leader, others := splitLeader(t, nodes)
	from, to := others[0], others[1]
	c.ctl(to, "node", "eligibility", "-disable", leader.name)
	ws := runCounters(t, c, from, bin, "counter", 3)
	c.ctl(to, "drain", "-detach", "-max-parallel", "1", from.name)
	c.waitFor(60*time.Second, "a first move", func() error {
		n, err := to.client.Node(context.Background(), from.name)
		if err != nil || n.Drain == nil || n.Drain.Moved == 0 {
			return fmt.Errorf("drain %+v (%v)", n.Drain, err)
		}
		if n.Drain.Moved == len(ws) {
			t.Fatalf("the drain moved all %d workloads before the leader could be killed: slow the moves down", len(ws))
		}
		return nil
	})
	c.kill(leader)
	// Following the drain again (no flags) does not restart it.
	out, errs, code := c.ctlRun("drain", "-address", to.socket, from.name)
	t.Logf("drain, followed after the leader died:\n%s", out)
	if code != 0 {
		t.Fatalf("drain exit %d, want 0: %s", code, errs)
	}
	checkMoved(t, c, to, from, bin, ws)
	checkDrained(t, to, from.name)
	for _, w := range ws {
		c.ctl(to, "stop", w.ID)
	}
}

// TestDrainDeadlineForceDisable: a workload no other node can take (it is
// pinned by a constraint) blocks a drain until its deadline, then is
// stopped; -force stops at once; -disable cancels a drain, and the
// command following it exits non-zero.
func TestDrainDeadlineForceDisable(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	nodes := startDrainLab(t, c, 150+int(c.prefix[4])%50, nil)
	from, via := nodes[0], nodes[1]
	pinned := runCounters(t, c, from, bin, "pinned", 2, "-constraint", "pin=1")

	// -disable: the follower of a blocked drain learns it was cancelled.
	follower := exec.Command(c.ctlBin, "node", "drain", "-address", via.socket, "-no-deadline", from.name)
	var fout, ferr bytes.Buffer
	follower.Stdout, follower.Stderr = &fout, &ferr
	if err := follower.Start(); err != nil {
		t.Fatal(err)
	}
	c.waitFor(20*time.Second, "the drain to start", func() error {
		n, err := via.client.Node(context.Background(), from.name)
		if err != nil || n.Drain == nil || n.Eligible {
			return fmt.Errorf("eligible %v, drain %+v (%v)", n.Eligible, n.Drain, err)
		}
		return nil
	})
	out := c.ctl(via, "drain", "-disable", from.name)
	err := follower.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(ferr.String(), "cancelled") {
		t.Errorf("the follower of a cancelled drain: %v, %q; want exit 1 saying cancelled", err, ferr.String())
	}
	if !strings.Contains(out, "drain cancelled, eligible") {
		t.Errorf("drain -disable said %q", out)
	}
	n, err := via.client.Node(context.Background(), from.name)
	if err != nil || !n.Eligible || n.Drain != nil {
		t.Fatalf("after -disable: eligible %v, drain %+v (%v); want eligible, no drain", n.Eligible, n.Drain, err)
	}
	for _, w := range pinned {
		if got, err := workloadOn(via, w.ID); err != nil || got.State != "running" || got.Node != from.name || got.PID != w.PID {
			t.Fatalf("after -disable: %s %s on %s pid %d (%v), want running on %s pid %d", w.ID, got.State, got.Node, got.PID, err,
				from.name, w.PID)
		}
	}

	// -deadline: the movable workload moves, the pinned ones are stopped
	// when it passes; the drain then completes.
	movable := runCounters(t, c, from, bin, "movable", 1)
	out, errs, code := c.ctlRun("drain", "-address", via.socket, "-deadline", "3s", from.name)
	t.Logf("drain -deadline 3s:\n%s", out)
	if code != 0 {
		t.Fatalf("drain exit %d, want 0: %s", code, errs)
	}
	checkDrained(t, via, from.name)
	for _, w := range pinned {
		got, err := workloadOn(via, w.ID)
		if err != nil || got.State == "running" || got.State == "pending" || got.Node != from.name {
			t.Errorf("pinned %s after the deadline: %s on %s (%v), want ended on %s", w.ID, got.State, got.Node, err, from.name)
		}
	}
	// The movable one moved, or was caught by the deadline in flight and
	// stopped: either way it runs at most once, and not on from.
	got, err := workloadOn(via, movable[0].ID)
	if err != nil || got.Node == from.name && got.State == "running" {
		t.Fatalf("movable %s: %s on %s (%v)", movable[0].ID, got.State, got.Node, err)
	}
	want := []int{}
	if got.State == "running" {
		want = []int{got.PID}
		if got.NSPID != movable[0].NSPID {
			t.Errorf("movable %s: pid %d in its namespace, want %d", got.ID, got.NSPID, movable[0].NSPID)
		}
	}
	c.waitFor(20*time.Second, "the stopped counters to exit", func() error {
		if cs := sortedCopies(bin); !slices.Equal(cs, want) {
			return fmt.Errorf("copies %v, want %v", cs, want)
		}
		return nil
	})

	// -force: every workload on the node is stopped at once.
	c.ctl(via, "node", "eligibility", "-enable", from.name)
	more := runCounters(t, c, from, bin, "forced", 2, "-constraint", "pin=1")
	out = c.ctl(via, "drain", "-force", from.name)
	t.Logf("drain -force:\n%s", out)
	checkDrained(t, via, from.name)
	for _, w := range more {
		if got, err := workloadOn(via, w.ID); err != nil || got.State == "running" || got.Node != from.name {
			t.Errorf("%s after -force: %s on %s (%v), want ended", w.ID, got.State, got.Node, err)
		}
	}
	c.waitFor(20*time.Second, "the forced counters to exit", func() error {
		if cs := sortedCopies(bin); !slices.Equal(cs, want) {
			return fmt.Errorf("copies %v, want %v", cs, want)
		}
		return nil
	})
	if got.State == "running" {
		c.ctl(via, "stop", got.ID)
	}
}

// TestDrainOnShutdown: SIGTERM to a pclusterd started with
// -drain-on-shutdown moves its workloads to the other nodes (each once,
// with its PID and state) before it exits; the node is left drained and
// ineligible.
func TestDrainOnShutdown(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	nodes := startDrainLab(t, c, 150+int(c.prefix[5])%50, func(i int) []string {
		if i == 1 {
			return []string{"-drain-on-shutdown", "-drain-timeout", "1m"}
		}
		return nil
	})
	from := nodes[0]
	ws := runCounters(t, c, from, bin, "counter", 2)
	from.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-from.done:
		from.cmd = nil
	case <-time.After(time.Minute + 40*time.Second): // the drain's deadline, its grace and some
		t.Fatalf("pclusterd -drain-on-shutdown still runs after its drain timeout and grace")
	}
	if b, _ := os.ReadFile(from.logPath); !strings.Contains(string(b), "drained before shutting down") {
		t.Fatalf("pclusterd's log does not say it drained:\n%s", b)
	}
	checkMoved(t, c, nodes[1], from, bin, ws)
	checkDrained(t, nodes[1], from.name)
	for _, w := range ws {
		c.ctl(nodes[1], "stop", w.ID)
	}
}

// TestDrainStuck: a workload the engine refuses to move (a TCP
// connection from its host's own address to a peer outside it, which
// cannot work on another host: "stays on this host") is tried
// scheduler.MaxDrainAttempts times, then stays where it is, running; the
// foreground drain names it with the engine's reason and exits 1. Another
// such workload whose restart policy allows it is restarted from its
// command on another node instead (a new process, once). -force then
// stops the one left and the drain completes.
func TestDrainStuck(t *testing.T) {
	c := newTestCluster(t)
	nodes := startDrainLab(t, c, 150+int(c.prefix[6])%50, nil)
	from, via := nodes[0], nodes[1]
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash for the workload holding a connection")
	}
	// The peer: a listener on the source host, outside the workloads,
	// that holds what it accepts.
	peer := exec.Command("ip", "netns", "exec", from.netns, "python3", "-c",
		"import socket,time\ns=socket.create_server(('"+from.ip+"',9))\nheld=[s.accept() for _ in range(2)]\ntime.sleep(1000)")
	if err := peer.Start(); err != nil {
		t.Fatalf("peer listener: %v", err)
	}
	t.Cleanup(func() { peer.Process.Kill(); peer.Wait() })
	script := "until exec 3<>/dev/tcp/" + from.ip + "/9; do sleep 0.1; done 2>/dev/null; exec sleep 1000"
	var w, r api.Workload
	c.ctlJSON(via, &w, "run", "-node", from.name, "-name", "held", "--", bash, "-c", script)
	c.ctlJSON(via, &r, "run", "-node", from.name, "-name", "held-restartable", "-restart", "on-failure", "--", bash, "-c", script)
	for _, p := range []*api.Workload{&w, &r} {
		c.waitFor(20*time.Second, "the workload to run", func() error {
			got, err := workloadOn(via, p.ID)
			if err != nil || got.State != "running" || got.PID == 0 {
				return fmt.Errorf("%s (%v)", got.State, err)
			}
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/3", got.PID)); !strings.HasPrefix(l, "socket:") {
				return fmt.Errorf("pid %d has no connection on fd 3 yet", got.PID)
			}
			*p = got
			return nil
		})
	}
	out, errs, code := c.ctlRun("drain", "-address", via.socket, from.name)
	t.Logf("drain:\n%s%s", out, errs)
	if code != 1 || !strings.Contains(out, "cannot move "+w.ID+": ") || !strings.Contains(out, "does not move with the process") ||
		strings.Count(errs, "\n") != 1 || strings.Contains(out, "cannot move "+r.ID) {
		t.Fatalf("drain of a node with an unmovable workload: exit %d, stdout %q, stderr %q; want 1, the workload named "+
			"with the engine's reason, one line on stderr", code, out, errs)
	}
	ms, err := via.client.Migrations(context.Background(), true)
	if err != nil {
		t.Fatal(err)
	}
	tries := map[string]int{}
	for _, m := range ms {
		tries[m.Workload]++
		if m.State != "aborted" {
			t.Errorf("migration %s: %s, want aborted", m.ID, m.State)
		}
	}
	if tries[w.ID] != 3 || tries[r.ID] != 3 {
		t.Errorf("moves tried %v, want 3 each (scheduler.MaxDrainAttempts)", tries)
	}
	got, err := workloadOn(via, w.ID)
	if err != nil || got.State != "running" || got.Node != from.name || got.PID != w.PID {
		t.Fatalf("the unmovable workload: %s on %s pid %d (%v), want running on %s pid %d", got.State, got.Node, got.PID, err,
			from.name, w.PID)
	}
	// The restartable one runs on another node, a new process from its
	// command; the old one is gone.
	c.waitFor(20*time.Second, "the restarted workload to run", func() error {
		got, err := workloadOn(via, r.ID)
		if err != nil || got.State != "running" || got.Node == from.name || got.PID == 0 || got.Restarts != 1 {
			return fmt.Errorf("%s on %s pid %d, %d restarts (%v)", got.State, got.Node, got.PID, got.Restarts, err)
		}
		if !strings.Contains(out, "restarted "+r.ID+" on "+got.Node) {
			t.Errorf("drain output lacks the restart of %s on %s", r.ID, got.Node)
		}
		// Other sleep processes may run on the machine: look at ours.
		if cs := copies("/usr/bin/sleep"); !slices.Contains(cs, w.PID) || !slices.Contains(cs, got.PID) || slices.Contains(cs, r.PID) {
			t.Fatalf("sleep processes %v: want the stuck one %d and the restarted one %d, not the old %d", cs, w.PID, got.PID, r.PID)
		}
		return nil
	})
	c.ctl(via, "drain", "-force", from.name)
	checkDrained(t, via, from.name)
	c.ctl(via, "stop", r.ID)
}
