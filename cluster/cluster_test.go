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

func waitState(c *testCluster, nd *testNode, id, state string, d time.Duration) api.Workload {
	c.tb.Helper()
	var w api.Workload
	c.waitFor(d, id+" "+state, func() error {
		var err error
		w, err = nd.client.Workload(context.Background(), id)
		if err != nil {
			return err
		}
		if w.State != state {
			return fmt.Errorf("state %s", w.State)
		}
		return nil
	})
	return w
}

func procAlive(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

// TestThreeNodeCluster runs three real pclusterd daemons on loopback and
// drives them with the real pclusterctl: convergence, leader election,
// placement, ps from every node, logs, stop, leader failover, the dead node
// marked down with its workload lost, and the old leader's restart.
func TestThreeNodeCluster(t *testing.T) {
	c := newTestCluster(t)
	nodes := startThree(c)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]

	// Members: all alive, one leader, the other two voters.
	var ms []api.Member
	c.ctlJSON(n2, &ms, "members")
	roles := map[string]int{}
	for _, m := range ms {
		roles[m.Role]++
		if m.APIAddr == "" || m.RaftAddr == "" || m.Load.NumCPU == 0 {
			t.Errorf("member %s: gossip metadata incomplete: %+v", m.Name, m)
		}
	}
	if roles["leader"] != 1 || roles["voter"] != 2 {
		t.Fatalf("roles: got %v, want 1 leader and 2 voters", roles)
	}
	if out := c.ctl(n3, "members"); !strings.Contains(out, "NAME") || !strings.Contains(out, n1.name) {
		t.Errorf("members table: got\n%s", out)
	}

	// A workload pinned to n2, launched through n1 (forwarded to the leader).
	var w api.Workload
	c.ctlJSON(n1, &w, "run", "-name", "sleeper", "-node", n2.name, "-label", "app=test", "--", "sleep", "300")
	if w.DesiredNode != n2.name {
		t.Fatalf("run -node %s: placed on %s", n2.name, w.DesiredNode)
	}
	w = waitState(c, n3, w.ID, "running", 10*time.Second)
	if w.Node != n2.name || w.PID <= 0 || !procAlive(w.PID) {
		t.Fatalf("workload %s: got node %s pid %d, want running on %s", w.ID, w.Node, w.PID, n2.name)
	}
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", w.PID))
	if !strings.Contains(string(env), "PCLUSTER_NODE="+n2.name) {
		t.Errorf("pid %d does not belong to %s's agent", w.PID, n2.name)
	}
	// ps from every node shows it.
	for _, nd := range nodes {
		var ws []api.Workload
		c.ctlJSON(nd, &ws, "ps")
		found := false
		for _, x := range ws {
			found = found || (x.ID == w.ID && x.State == "running" && x.Node == n2.name)
		}
		if !found {
			t.Errorf("ps on %s: %s not running on %s: %+v", nd.name, w.ID, n2.name, ws)
		}
		if out := c.ctl(nd, "ps"); !strings.Contains(out, w.ID) {
			t.Errorf("ps table on %s lacks %s:\n%s", nd.name, w.ID, out)
		}
	}

	// Constraints select nodes by label; without -node, placement spreads.
	var zoned api.Workload
	c.ctlJSON(n1, &zoned, "run", "-constraint", "zone=z3", "--", "true")
	if zoned.DesiredNode != n3.name {
		t.Errorf("run -constraint zone=z3: placed on %s, want %s", zoned.DesiredNode, n3.name)
	}
	if _, errs, code := c.ctlRun("run", "-address", n1.socket, "-constraint", "zone=mars", "--", "true"); code != 1 || !strings.Contains(errs, "no eligible node") {
		t.Errorf("unmeetable constraint: exit %d, %q", code, errs)
	}

	// Logs are served from the node that ran it, whichever node is asked.
	var echo api.Workload
	c.ctlJSON(n3, &echo, "run", "-node", n1.name, "--", "sh", "-c", "echo hello from $PCLUSTER_WORKLOAD_ID; echo oops >&2")
	waitState(c, n2, echo.ID, "exited", 10*time.Second)
	if out := c.ctl(n2, "logs", echo.ID); out != "hello from "+echo.ID+"\n" {
		t.Errorf("logs %s: got %q", echo.ID, out)
	}
	if out := c.ctl(n3, "logs", "-stderr", echo.ID); out != "oops\n" {
		t.Errorf("logs -stderr %s: got %q", echo.ID, out)
	}

	// Stop.
	if out := c.ctl(n3, "stop", w.ID); !strings.Contains(out, "stop requested") {
		t.Errorf("stop: got %q", out)
	}
	waitState(c, n1, w.ID, "stopped", 15*time.Second)
	c.waitFor(5*time.Second, "stopped process to end", func() error {
		if procAlive(w.PID) {
			return fmt.Errorf("pid %d still alive", w.PID)
		}
		return nil
	})

	// Bad input: one line on stderr, meaningful exit codes, no stack trace.
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"status", "-address", n1.socket, "wdoesnotexist"}, 3},
		{[]string{"run", "-address", n1.socket}, 2},
		{[]string{"run", "-address", n1.socket, "-restart", "sometimes", "--", "true"}, 1},
		{[]string{"frobnicate"}, 2},
		{[]string{"ps", "-address", n1.socket, "-bogus"}, 2},
		{[]string{"ps", "-address", c.dir + "/nosuch.sock"}, 4},
	} {
		_, errs, code := c.ctlRun(tc.args...)
		lines := strings.Split(strings.TrimSpace(errs), "\n")
		if code != tc.code || strings.Contains(errs, "goroutine") || len(lines) != 1 {
			t.Errorf("pclusterctl %v: exit %d, stderr %q; want exit %d and one line", tc.args, code, errs, tc.code)
		}
	}

	// A workload on the leader, then the leader crashes.
	c.ctlJSON(n1, &ms, "members")
	leader := c.nodes[leaderOf(ms)]
	var onLeader api.Workload
	c.ctlJSON(n1, &onLeader, "run", "-node", leader.name, "--", "sleep", "300")
	onLeader = waitState(c, n1, onLeader.ID, "running", 10*time.Second)
	var before []api.Workload
	c.ctlJSON(n1, &before, "ps", "-a")

	killed := time.Now()
	c.kill(leader)
	var rest []*testNode
	for _, nd := range nodes {
		if nd != leader {
			rest = append(rest, nd)
		}
	}
	var newLeader string
	c.waitFor(15*time.Second, "a new leader", func() error {
		ms, err := rest[0].client.Members(context.Background())
		if err != nil {
			return err
		}
		newLeader = leaderOf(ms)
		if newLeader == "" || newLeader == leader.name {
			return fmt.Errorf("leader %q", newLeader)
		}
		return nil
	})
	t.Logf("new leader %s %v after the leader's crash", newLeader, time.Since(killed).Round(time.Millisecond))

	// The state is intact and writes work again, through either survivor.
	var after []api.Workload
	c.ctlJSON(rest[1], &after, "ps", "-a")
	if len(after) != len(before) {
		t.Fatalf("ps after failover: %d workloads, want %d", len(after), len(before))
	}
	var w2 api.Workload
	c.ctlJSON(rest[1], &w2, "run", "--", "sleep", "300")
	waitState(c, rest[0], w2.ID, "running", 10*time.Second)
	if w2.DesiredNode == leader.name {
		t.Errorf("new workload placed on %s, which crashed %v ago", leader.name, time.Since(killed).Round(time.Millisecond))
	}
	// Pinned to the crashed node: refused with the reason (it does not
	// answer, or gossip has declared it gone by now), not left pending on
	// a dead host.
	if _, errs, code := c.ctlRun("run", "-address", rest[0].socket, "-node", leader.name, "--", "true"); code != 1 ||
		!strings.Contains(errs, leader.name) {
		t.Errorf("run pinned to crashed %s: exit %d, %q; want exit 1 naming it", leader.name, code, errs)
	}

	// The dead node goes down and its workload is marked lost, not forgotten.
	c.waitFor(30*time.Second, leader.name+" down", nodeStatus(rest[0], leader.name, "down"))
	t.Logf("%s down in the state %v after its crash", leader.name, time.Since(killed).Round(time.Millisecond))
	lost := waitState(c, rest[0], onLeader.ID, "lost", 5*time.Second)
	if !procAlive(onLeader.PID) {
		t.Errorf("workload pid %d died with its pclusterd", onLeader.PID)
	}

	// Restart the old leader with its data dir: it rejoins as a follower,
	// catches up, and adopts its still-running workload.
	c.launch(leader)
	c.waitFor(30*time.Second, leader.name+" rejoined", func() error { return converged(leader, 3) })
	var ms2 []api.Member
	c.ctlJSON(leader, &ms2, "members")
	for _, m := range ms2 {
		if m.Name == leader.name && m.Role != "voter" {
			t.Errorf("restarted %s: role %s, want voter", m.Name, m.Role)
		}
	}
	c.waitFor(15*time.Second, "restarted node's replica to catch up", func() error {
		var local, ref []api.Workload
		c.ctlJSON(leader, &local, "ps", "-a", "-stale")
		c.ctlJSON(rest[0], &ref, "ps", "-a")
		if fmt.Sprint(ids(local)) != fmt.Sprint(ids(ref)) {
			return fmt.Errorf("replica has %v, leader %v", ids(local), ids(ref))
		}
		return nil
	})
	back := waitState(c, rest[1], lost.ID, "running", 15*time.Second)
	if back.PID != onLeader.PID || back.Node != leader.name {
		t.Errorf("adopted workload: pid %d on %s, want pid %d on %s", back.PID, back.Node, onLeader.PID, leader.name)
	}
	// Ready again once the leader's gossip has it alive: a restart right
	// after it was declared dead is first refuted by the restarted node
	// (a higher incarnation), a gossip round or more later.
	c.waitFor(15*time.Second, leader.name+" ready again", nodeStatus(rest[1], leader.name, "ready"))
	for _, id := range []string{back.ID, w2.ID} {
		c.ctl(leader, "stop", id)
		waitState(c, rest[0], id, "stopped", 15*time.Second)
	}
}

func ids(ws []api.Workload) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.ID+"/"+w.State)
	}
	return out
}
