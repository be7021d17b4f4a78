package cluster_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

// nlHandle opens a netlink handle in lab host h's namespace.
func nlHandle(t testing.TB, h *netlab.Host) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromName(h.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nh.Close)
	return nh
}

// holders lists the hosts whose eth0 carries vip.
func holders(t *testing.T, hosts []*netlab.Host, handles []*netlink.Handle, vip netip.Addr) []string {
	t.Helper()
	var out []string
	for i, h := range hosts {
		l, err := handles[i].LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		addrs, err := handles[i].AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range addrs {
			if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == vip {
				out = append(out, h.NS)
			}
		}
	}
	return out
}

// neighMAC returns the client's neighbour entry for vip ("" for none).
func neighMAC(h *netlink.Handle, vip netip.Addr) (string, error) {
	l, err := h.LinkByName("eth0")
	if err != nil {
		return "", err
	}
	ns, err := h.NeighList(l.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		return "", err
	}
	for _, n := range ns {
		if got, ok := netip.AddrFromSlice(n.IP); ok && got.Unmap() == vip && n.HardwareAddr != nil {
			return n.HardwareAddr.String(), nil
		}
	}
	return "", nil
}

// request opens a new connection from the client host to addr and
// returns the server's answer: the count of connections it served and
// its pid.
func request(client *netlab.Host, addr string) (n, pid int, err error) {
	err = netlab.InNS(client.NS, func() error {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("hello\n")); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return fmt.Errorf("answer %q", line)
		}
		n, _ = strconv.Atoi(f[0])
		pid, _ = strconv.Atoi(f[1])
		return nil
	})
	return n, pid, err
}

// TestVIPFollowsMigrations runs a TCP server with a VIP on a 3-node lab
// cluster and a client host on the same bridge, and moves it A→B→C→A.
// After each move: the VIP is on exactly the node running the server,
// the client's neighbour entry for the VIP shows that node's MAC (the
// time from the process's freeze and from the migration's end is
// logged), and a new connection to the VIP reaches the same process
// (same pid, its count of connections carried on). Stopping the workload
// removes the VIP from every host. A restarted agent keeps the VIP of
// the workload it adopts, and its record names it. A migration that fails
// takes the VIP off the source while the process is frozen and puts it
// back when it resumes.
func TestVIPFollowsMigrations(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "vipecho")
	subnet := 100 + int(c.prefix[4])%50
	// Stop-and-copy: its failed migration kills the target's build, which
	// a live move's tree builds only in its last round, too short for the
	// kill to catch before the commit (TestVIPHeldConnection* move live).
	lab, nodes := startLabWith(t, c, subnet, "-migrate-live=false")
	client := lab.AddHost(t)
	hosts := lab.Hosts[:3]
	var handles []*netlink.Handle
	macs := map[string]string{} // node name → its eth0 MAC
	for i, h := range hosts {
		nh := nlHandle(t, h)
		handles = append(handles, nh)
		l, err := nh.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		macs[nodes[i].name] = l.Attrs().HardwareAddr.String()
	}
	clientNL := nlHandle(t, client)
	vipPrefix := fmt.Sprintf("198.18.%d.50/24", subnet)
	vip := netip.MustParsePrefix(vipPrefix).Addr()
	const port = 8080
	addr := netip.AddrPortFrom(vip, port).String()
	byName := map[string]*testNode{}
	nsOf := map[string]string{}
	for i, nd := range nodes {
		byName[nd.name] = nd
		nsOf[nd.name] = hosts[i].NS
	}

	var w api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, "-name", "echo", "-vip", vipPrefix, bin, strconv.Itoa(port))
	// A second workload may not take the same address, with or without
	// the prefix.
	if _, errs, code := c.ctlRun("run", "-address", nodes[1].socket, "-vip", vip.String(), bin, "8081"); code == 0 || !strings.Contains(errs, "virtual IP") {
		t.Errorf("second workload with VIP %s: exit %d, %q; want a refusal naming the virtual IP", vip, code, errs)
	}
	served := -1
	var pid int
	check := func(when, node string) {
		t.Helper()
		c.waitFor(20*time.Second, "the VIP on "+node+" only "+when, func() error {
			if got := holders(t, hosts, handles, vip); len(got) != 1 || got[0] != nsOf[node] {
				return fmt.Errorf("held by %v", got)
			}
			return nil
		})
		// A new connection reaches the same process, which carries on.
		var n, p int
		c.waitFor(20*time.Second, "an answer at the VIP "+when, func() error {
			var err error
			n, p, err = request(client, addr)
			return err
		})
		if pid == 0 {
			pid = p
		}
		if p != pid || n != served+1 {
			t.Fatalf("%s: answer %d from pid %d, want %d from pid %d", when, n, p, served+1, pid)
		}
		served = n
	}
	c.waitFor(20*time.Second, "the server to run", func() error {
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State != "running" {
			return fmt.Errorf("%s (%v)", got.State, err)
		}
		return nil
	})
	check("at the start", nodes[0].name)
	if out := c.ctl(nodes[1], "status", w.ID); !strings.Contains(out, vipPrefix+" on "+nodes[0].name) {
		t.Errorf("status does not say where the VIP is:\n%s", out)
	}

	for hop, to := range []int{1, 2, 0} {
		target := nodes[to]
		// Watch the client's neighbour entry while the migration runs.
		type change struct {
			mac string
			at  time.Time
		}
		seen := make(chan change, 1)
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			defer close(seen)
			for ctx.Err() == nil {
				if mac, err := neighMAC(clientNL, vip); err == nil && mac == macs[target.name] {
					seen <- change{mac, time.Now()}
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		c.ctl(nodes[hop%3], "migrate", "-node", target.name, "echo")
		var ch change
		select {
		case ch = <-seen:
		case <-time.After(10 * time.Second):
		}
		cancel()
		if ch.mac == "" {
			mac, err := neighMAC(clientNL, vip)
			t.Fatalf("move %d: the client's neighbour entry for %s: %q (%v), want %s's %s", hop+1, vip, mac, err, target.name, macs[target.name])
		}
		var ms []api.Migration
		c.ctlJSON(nodes[0], &ms, "migrations", "-a")
		var m api.Migration
		for _, x := range ms {
			if x.Target == target.name && x.State == "done" && x.EndedAt.After(m.EndedAt) {
				m = x
			}
		}
		t.Logf("move %d to %s: client's neighbour entry switched %v after the freeze, %v after the migration's end (stopped %v)",
			hop+1, target.name, ch.at.Sub(m.TransferAt).Round(time.Millisecond), ch.at.Sub(m.EndedAt).Round(time.Millisecond),
			m.Stopped().Round(time.Millisecond))
		check(fmt.Sprintf("after move %d", hop+1), target.name)
	}

	// An agent restart keeps the VIP of the workload it adopts.
	holder := nodes[0]
	c.stop(holder)
	c.launch(holder)
	c.waitFor(30*time.Second, holder.name+" to adopt the server", func() error {
		got, err := workloadOn(nodes[1], w.ID)
		if err != nil || got.State != "running" || got.Node != holder.name {
			return fmt.Errorf("%s on %s (%v)", got.State, got.Node, err)
		}
		if b, _ := os.ReadFile(holder.logPath); !strings.Contains(string(b), "adopted running workload") {
			return fmt.Errorf("no adoption in its log")
		}
		return nil
	})
	check("after the agent's restart", holder.name)
	if b, err := os.ReadFile(filepath.Join(holder.dataDir, "vips.json")); err != nil || !strings.Contains(string(b), vip.String()) {
		t.Errorf("%s's vips.json: %q (%v), want it to name %s", holder.name, b, err, vip)
	}

	c.ctl(nodes[2], "stop", w.ID)
	// The agent removes the address, then rewrites its record (a record
	// naming an address already gone is harmless after a crash; the
	// reverse would leak it): both waited for.
	c.waitFor(30*time.Second, "the VIP removed after the stop", func() error {
		if got := holders(t, hosts, handles, vip); len(got) != 0 {
			return fmt.Errorf("held by %v", got)
		}
		for _, nd := range nodes {
			if b, err := os.ReadFile(filepath.Join(nd.dataDir, "vips.json")); err == nil && strings.Contains(string(b), vip.String()) {
				return fmt.Errorf("%s's vips.json still names %s: %s", nd.name, vip, b)
			}
		}
		return nil
	})

	// A migration that fails: the VIP leaves the source once the process
	// is frozen, and comes back when it resumes. A larger process, its
	// stream slowed, so that the target is caught building it.
	big := fixture.Build(t, "bigheap")
	src, dst := nodes[0], nodes[1]
	// Restarted above: its agent adopted the server at once, but the
	// leader marks the node ready again only once gossip sees it back
	// (a run placed there before is refused: "node is down").
	c.waitFor(30*time.Second, src.name+" ready again", nodeStatus(dst, src.name, "ready"))
	var bw api.Workload
	c.ctlJSON(src, &bw, "run", "-node", src.name, "-vip", vip.String(), big, "32")
	c.waitFor(20*time.Second, "the VIP on "+src.name, func() error {
		if got := holders(t, hosts, handles, vip); len(got) != 1 || got[0] != hosts[0].NS {
			return fmt.Errorf("held by %v", got)
		}
		return nil
	})
	hosts[0].Shape(t, "20mbit")
	done := make(chan int, 1)
	go func() {
		_, _, code := c.ctlRun("migrate", "-address", src.socket, "-node", dst.name, bw.ID)
		done <- code
	}()
	c.waitFor(30*time.Second, "the target to build", func() error {
		for child, st := range childrenOf(dst.cmd.Process.Pid) {
			if st == 't' {
				if got := holders(t, hosts, handles, vip); len(got) != 0 {
					t.Errorf("VIP held by %v while the process is frozen, want by none", got)
				}
				syscall.Kill(child, syscall.SIGKILL)
				return nil
			}
		}
		return fmt.Errorf("no traced child of %s", dst.name)
	})
	var code int
	select {
	case code = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("migrate did not end")
	}
	hosts[0].Shape(t, "")
	if code != 1 {
		t.Fatalf("migrate with its target's build killed: exit %d, want 1", code)
	}
	c.waitFor(20*time.Second, "the VIP back on "+src.name, func() error {
		if got := holders(t, hosts, handles, vip); len(got) != 1 || got[0] != hosts[0].NS {
			return fmt.Errorf("held by %v", got)
		}
		return nil
	})
	c.ctl(src, "stop", bw.ID)
	c.waitFor(30*time.Second, "the VIP removed after the stop", func() error {
		if got := holders(t, hosts, handles, vip); len(got) != 0 {
			return fmt.Errorf("held by %v", got)
		}
		return nil
	})
}

// TestVIPNeedsCapabilities: a node whose pclusterd lacks CAP_NET_RAW takes
// workloads, but a workload with a VIP is refused at placement with one
// line naming the capability, and nothing is placed.
func TestVIPNeedsCapabilities(t *testing.T) {
	c := newTestCluster(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv not installed (util-linux)")
	}
	c.wrap = []string{"setpriv", "--bounding-set=-net_raw", "--"}
	nd := c.start(1, "-bootstrap-expect", "1")
	c.waitFor(30*time.Second, nd.name+" to converge", func() error { return converged(nd, 1) })
	for _, args := range [][]string{{"run", "-vip", "198.18.0.50/24"}, {"run", "-node", nd.name, "-vip", "198.18.0.50"}} {
		var out, errs string
		var code int
		c.waitFor(30*time.Second, "the node registered", func() error {
			out, errs, code = c.ctlRun(append(withFlags(args, "-address", nd.socket), "sleep", "60")...)
			if strings.Contains(errs, "no eligible node") && !strings.Contains(errs, "virtual IP") {
				return fmt.Errorf("%s", errs) // registered without its metadata yet
			}
			return nil
		})
		t.Logf("pclusterctl %v: exit %d: %s", args, code, strings.TrimSpace(errs))
		if code != 1 || !strings.Contains(errs, "cannot carry virtual IPs: pclusterd lacks CAP_NET_RAW") || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("pclusterctl %v on a node without CAP_NET_RAW: exit %d, stdout %q, stderr %q; want exit 1 and one line naming CAP_NET_RAW", args, code, out, errs)
		}
	}
	var ws []api.Workload
	c.ctlJSON(nd, &ws, "ps", "-a")
	if len(ws) != 0 {
		t.Errorf("workloads after the refusals: %+v, want none", ws)
	}
	// Without a VIP the node takes work.
	c.ctl(nd, "run", "sleep", "60")
}
