package cluster_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// netLab is a set of network namespaces joined by a bridge that lives in a
// namespace of its own, so the host's interfaces are never touched.
type netLab struct {
	tb     testing.TB
	sw     string   // namespace holding the bridge
	hosts  []string // host namespaces
	subnet string   // "198.18.N"
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newNetLab(tb testing.TB, prefix string, n int, third int) *netLab {
	tb.Helper()
	l := &netLab{tb: tb, sw: prefix + "-sw", subnet: fmt.Sprintf("198.18.%d", third)}
	if err := ipCmd("netns", "add", l.sw); err != nil {
		tb.Skipf("network namespaces unavailable: %v", err)
	}
	tb.Cleanup(l.remove)
	must := func(args ...string) {
		tb.Helper()
		if err := ipCmd(args...); err != nil {
			tb.Fatal(err)
		}
	}
	must("-n", l.sw, "link", "add", "br0", "type", "bridge")
	must("-n", l.sw, "link", "set", "br0", "up")
	for i := 1; i <= n; i++ {
		ns := fmt.Sprintf("%s-h%d", prefix, i)
		must("netns", "add", ns)
		l.hosts = append(l.hosts, ns)
		port := fmt.Sprintf("p%d", i)
		must("-n", l.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
		must("-n", l.sw, "link", "set", port, "master", "br0")
		must("-n", l.sw, "link", "set", port, "up")
		must("-n", ns, "addr", "add", fmt.Sprintf("%s.%d/24", l.subnet, i), "dev", "eth0")
		must("-n", ns, "link", "set", "eth0", "up")
		must("-n", ns, "link", "set", "lo", "up")
	}
	return l
}

// cut takes host i's switch port down (true) or up (false).
func (l *netLab) cut(i int, down bool) {
	l.tb.Helper()
	state := "up"
	if down {
		state = "down"
	}
	if err := ipCmd("-n", l.sw, "link", "set", fmt.Sprintf("p%d", i), state); err != nil {
		l.tb.Fatal(err)
	}
}

func (l *netLab) remove() {
	for _, ns := range append(l.hosts, l.sw) {
		ipCmd("netns", "del", ns)
	}
}

// TestPartitionHeals isolates one of three nodes, each in its own network
// namespace, for longer than memberlist keeps talking to dead nodes: the
// majority marks it down; when the network heals the isolated node re-joins
// by itself and is ready again.
func TestPartitionHeals(t *testing.T) {
	c := newTestCluster(t)
	lab := newNetLab(t, "pc"+c.prefix[1:], 3, 100+int(c.prefix[1])%50)
	var nodes []*testNode
	for i := 1; i <= 3; i++ {
		extra := []string{"-bootstrap-expect", "3"}
		if i > 1 {
			extra = append(extra, "-join", fmt.Sprintf("%s.1:7946", lab.subnet))
		}
		nodes = append(nodes, c.startAt(i, fmt.Sprintf("%s.%d", lab.subnet, i), 7946, lab.hosts[i-1], extra...))
	}
	// Stop the daemons before the namespaces go (cleanups run last-in first).
	t.Cleanup(func() {
		for _, nd := range nodes {
			c.stop(nd)
		}
	})
	for _, nd := range nodes {
		c.waitFor(30*time.Second, nd.name+" to converge", func() error { return converged(nd, 3) })
	}
	isolated := nodes[2]
	start := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(start).Seconds(), what) }
	lab.cut(3, true)
	phase("link cut")
	c.waitFor(30*time.Second, isolated.name+" down in the majority's state", func() error {
		n, err := nodes[0].client.Node(context.Background(), isolated.name)
		if err != nil {
			return err
		}
		if n.Status != "down" {
			return fmt.Errorf("status %s", n.Status)
		}
		return nil
	})
	phase("down in the majority's state")
	c.waitFor(30*time.Second, isolated.name+" to see itself alone", func() error {
		ms, err := isolated.client.Members(context.Background())
		if err != nil {
			return err
		}
		alive := 0
		for _, m := range ms {
			if m.Status == "alive" {
				alive++
			}
		}
		if alive != 1 {
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
	lab.cut(3, false)
	phase("link up")
	for _, nd := range nodes {
		c.waitFor(45*time.Second, nd.name+" to see all three again", func() error { return converged(nd, 3) })
	}
	phase("converged")
	c.waitFor(30*time.Second, isolated.name+" ready again", func() error {
		n, err := nodes[0].client.Node(context.Background(), isolated.name)
		if err != nil {
			return err
		}
		if n.Status != "ready" {
			return fmt.Errorf("status %s", n.Status)
		}
		return nil
	})
	t.Logf("re-joined %v after the network healed", time.Since(healed).Round(time.Millisecond))
	if b, _ := os.ReadFile(isolated.logPath); !strings.Contains(string(b), "re-joined cluster") {
		t.Errorf("%s log does not show its re-join", isolated.name)
	}
}
