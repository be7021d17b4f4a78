package cluster_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/node"
)

// The tests here run the real pclusterd and pclusterctl binaries, built once
// per test binary into a temporary directory, on loopback addresses.

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds cmd/pclusterd and cmd/pclusterctl.
func binaries(tb testing.TB) (pclusterd, pclusterctl string) {
	tb.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "pcluster-bin-")
		if buildErr != nil {
			return
		}
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			buildErr = err
			return
		}
		args := []string{"build", "-o", binDir + "/"}
		if os.Getenv("PCLUSTER_TEST_RACE") != "" {
			args = append(args, "-race") // daemons built with the race detector
		}
		cmd := exec.Command("go", append(args, "./cmd/pclusterd", "./cmd/pclusterctl")...)
		cmd.Dir = filepath.Dir(strings.TrimSpace(string(out)))
		if b, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, b)
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return filepath.Join(binDir, "pclusterd"), filepath.Join(binDir, "pclusterctl")
}

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	code := m.Run()
	fixture.Cleanup()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// freeBase finds a port p on ip such that p, p+1 and p+2 are free for TCP
// and p for UDP.
func freeBase(tb testing.TB, ip string) int {
	tb.Helper()
	for i := 0; i < 100; i++ {
		ln, err := net.Listen("tcp", ip+":0")
		if err != nil {
			tb.Fatal(err)
		}
		p := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if p > 65000 {
			continue
		}
		ok := true
		var held []interface{ Close() error }
		for _, q := range []int{p, p + 1, p + 2} {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(q)))
			if err != nil {
				ok = false
				break
			}
			held = append(held, l)
		}
		if u, err := net.ListenPacket("udp", net.JoinHostPort(ip, strconv.Itoa(p))); err == nil {
			held = append(held, u)
		} else {
			ok = false
		}
		for _, h := range held {
			h.Close()
		}
		if ok {
			return p
		}
	}
	tb.Fatal("no free port range")
	return 0
}

// testCluster is a set of pclusterd processes sharing a key.
type testCluster struct {
	tb      testing.TB
	prefix  string // node name prefix, unique per test, used to find strays
	dir     string
	keyFile string
	ctlBin  string
	daemon  string
	nodes   map[string]*testNode
	// wrap, if set, runs the daemons started from now on under this
	// command line (such as setpriv dropping a capability).
	wrap []string
}

type testNode struct {
	name    string
	ip      string
	netns   string // network namespace to run in, or ""
	bind    string // gossip host:port
	api     string // TLS API host:port
	socket  string
	dataDir string
	logPath string
	args    []string
	wrap    []string // c.wrap when it was started
	cmd     *exec.Cmd
	done    chan struct{}
	client  *api.Client
}

func newTestCluster(tb testing.TB) *testCluster {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: workloads run as children of pclusterd under /proc scrutiny")
	}
	d, ctl := binaries(tb)
	b := make([]byte, 3)
	rand.Read(b)
	c := &testCluster{tb: tb, prefix: "t" + hex.EncodeToString(b), dir: tb.TempDir(), ctlBin: ctl, daemon: d,
		nodes: map[string]*testNode{}}
	out, err := exec.Command(d, "keygen", "-out", filepath.Join(c.dir, "keys")).CombinedOutput()
	if err != nil {
		tb.Fatalf("pclusterd keygen: %v\n%s", err, out)
	}
	c.keyFile = filepath.Join(c.dir, "keys", "cluster.key")
	tb.Cleanup(c.cleanup)
	return c
}

// start launches node name (n = 1, 2, ...) with extra flags.
func (c *testCluster) start(n int, extra ...string) *testNode {
	c.tb.Helper()
	ip := fmt.Sprintf("127.0.0.%d", 10+n)
	return c.startAt(n, ip, freeBase(c.tb, ip), "", extra...)
}

// startAt launches node n on ip:port, inside network namespace netns if
// not "".
func (c *testCluster) startAt(n int, ip string, port int, netns string, extra ...string) *testNode {
	c.tb.Helper()
	name := fmt.Sprintf("%s-n%d", c.prefix, n)
	nd := &testNode{name: name, ip: ip, netns: netns, wrap: c.wrap, bind: fmt.Sprintf("%s:%d", ip, port), api: fmt.Sprintf("%s:%d", ip, port+2),
		socket: filepath.Join(c.dir, name+".sock"), dataDir: filepath.Join(c.dir, name), logPath: filepath.Join(c.dir, name+".log")}
	nd.args = append([]string{"-node", name, "-bind", nd.bind, "-data-dir", nd.dataDir, "-socket", nd.socket,
		"-log-level", "info"}, extra...)
	if !containsFlag(extra, "-key-file") && !containsFlag(extra, "-encrypt") {
		nd.args = append(nd.args, "-key-file", c.keyFile)
	}
	c.nodes[name] = nd
	c.launch(nd)
	return nd
}

func containsFlag(args []string, f string) bool {
	for _, a := range args {
		if a == f {
			return true
		}
	}
	return false
}

func (c *testCluster) launch(nd *testNode) {
	c.tb.Helper()
	c.startDaemon(nd)
	c.waitSocket(nd)
}

// startDaemon starts a node's daemon without waiting for it (waitSocket
// does).
func (c *testCluster) startDaemon(nd *testNode) {
	c.tb.Helper()
	logf, err := os.OpenFile(nd.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.tb.Fatal(err)
	}
	cmd := exec.Command(c.daemon, nd.args...)
	if len(nd.wrap) > 0 {
		cmd = exec.Command(nd.wrap[0], append(append(nd.wrap[1:len(nd.wrap):len(nd.wrap)], c.daemon), nd.args...)...)
	}
	if nd.netns != "" {
		// nsenter joins the network namespace only: `ip netns exec` also
		// makes a mount namespace per start, and a workload restored by a
		// daemon and adopted by the next one would then sit in another
		// mount namespace than its agent, which the engine refuses to
		// freeze. A host has one.
		cmd = exec.Command("nsenter", append([]string{"--net=/run/netns/" + nd.netns, "--", c.daemon}, nd.args...)...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		c.tb.Fatal(err)
	}
	logf.Close()
	nd.cmd, nd.done = cmd, make(chan struct{})
	go func(done chan struct{}) { cmd.Wait(); close(done) }(nd.done)
	cl, err := api.New(nd.socket, nil)
	if err != nil {
		c.tb.Fatal(err)
	}
	nd.client = cl
}

// waitSocket waits for a launched daemon's API socket to answer.
func (c *testCluster) waitSocket(nd *testNode) {
	c.tb.Helper()
	cl := nd.client
	c.waitFor(10*time.Second, nd.name+" socket", func() error {
		_, err := cl.Members(context.Background())
		return err
	})
}

// kill SIGKILLs a node's daemon (a crash: no graceful leave).
func (c *testCluster) kill(nd *testNode) {
	if nd.cmd == nil {
		return
	}
	nd.cmd.Process.Kill()
	<-nd.done
	nd.cmd = nil
}

// stop stops a node's daemon gracefully, killing it after 10 s.
func (c *testCluster) stop(nd *testNode) {
	if nd.cmd == nil {
		return
	}
	nd.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-nd.done:
	case <-time.After(10 * time.Second):
		c.kill(nd)
	}
	nd.cmd = nil
}

// cleanup stops every daemon and kills any workload process they left
// (workloads outlive pclusterd by design), found by the PCLUSTER_NODE
// variable the agent sets.
func (c *testCluster) cleanup() {
	for _, nd := range c.nodes {
		c.stop(nd)
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err == nil && bytes.Contains(env, []byte("PCLUSTER_NODE="+c.prefix+"-")) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	for _, nd := range c.nodes {
		if err := node.RemoveCgroups(nd.name, nd.dataDir); err != nil {
			c.tb.Errorf("%s: %v", nd.name, err)
		}
	}
	for _, nd := range c.nodes {
		if b, _ := os.ReadFile(nd.logPath); bytes.Contains(b, []byte("WARNING: DATA RACE")) {
			i := bytes.Index(b, []byte("WARNING: DATA RACE"))
			race := b[i:]
			if j := bytes.Index(race[1:], []byte("==================")); j > 0 {
				race = race[:j+1]
			}
			c.tb.Errorf("%s: data race reported in its log:\n%s", nd.name, race)
		}
	}
	if keep := os.Getenv("PCLUSTER_TEST_KEEP_LOGS"); keep != "" && c.tb.Failed() {
		for _, nd := range c.nodes {
			b, _ := os.ReadFile(nd.logPath)
			os.WriteFile(filepath.Join(keep, nd.name+".log"), b, 0o644)
		}
	}
	if c.tb.Failed() {
		for _, nd := range c.nodes {
			b, _ := os.ReadFile(nd.logPath)
			var lines []string
			for _, l := range strings.Split(string(b), "\n") {
				if !strings.Contains(l, "component=raft") && !strings.Contains(l, "component=memberlist") {
					lines = append(lines, l)
				}
			}
			if len(lines) > 40 {
				lines = lines[len(lines)-40:]
			}
			c.tb.Logf("--- %s log (tail) ---\n%s", nd.name, strings.Join(lines, "\n"))
		}
	}
}

// ctlRun runs pclusterctl with args and returns stdout, stderr and the exit
// code.
func (c *testCluster) ctlRun(args ...string) (string, string, int) {
	c.tb.Helper()
	cmd := exec.Command(c.ctlBin, args...)
	cmd.Env = append(os.Environ(), "PCLUSTER_ADDR=", "PCLUSTER_KEY_FILE=")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.tb.Fatalf("pclusterctl %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// ctl runs pclusterctl against nd and fails the test unless it exits 0.
func (c *testCluster) ctl(nd *testNode, args ...string) string {
	c.tb.Helper()
	out, errs, code := c.ctlRun(withFlags(args, "-address", nd.socket)...)
	if code != 0 {
		c.tb.Fatalf("pclusterctl %v on %s: exit %d: %s", args, nd.name, code, errs)
	}
	return out
}

// withFlags puts flags right after the command words ("ps", "node status",
// "checkpoint policy set").
func withFlags(args []string, flags ...string) []string {
	n := 1
	switch {
	case args[0] == "node" || args[0] == "balance":
		n = 2
	case args[0] == "checkpoint" && len(args) > 1 && args[1] == "policy":
		n = 3
	case args[0] == "checkpoint":
		n = 2
	}
	out := append(append([]string{}, args[:n]...), flags...)
	return append(out, args[n:]...)
}

// ctlJSON runs pclusterctl ... -json and decodes its output into v.
func (c *testCluster) ctlJSON(nd *testNode, v any, args ...string) {
	c.tb.Helper()
	out := c.ctl(nd, withFlags(args, "-json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		c.tb.Fatalf("pclusterctl %v: output not JSON: %v\n%s", args, err, out)
	}
}

// waitFor polls f until it returns nil or d passes.
func (c *testCluster) waitFor(d time.Duration, what string, f func() error) {
	c.tb.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.tb.Fatalf("waiting %v for %s: %v", d, what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// leader returns the leader as seen by nd's members list, or "".
func leaderOf(ms []api.Member) string {
	for _, m := range ms {
		if m.Role == "leader" && m.Status == "alive" {
			return m.Name
		}
	}
	return ""
}

// aliveMembers counts the members gossip reports alive.
func aliveMembers(ms []api.Member) int {
	alive := 0
	for _, m := range ms {
		if m.Status == "alive" {
			alive++
		}
	}
	return alive
}

// nodeStatus returns a check, for waitFor, that from's replica of the state
// records node name with status want.
func nodeStatus(from *testNode, name, want string) func() error {
	return func() error {
		n, err := from.client.Node(context.Background(), name)
		if err != nil {
			return err
		}
		if n.Status != want {
			return fmt.Errorf("status %s", n.Status)
		}
		return nil
	}
}

// converged checks that nd sees want alive members and a leader.
func converged(nd *testNode, want int) error {
	ms, err := nd.client.Members(context.Background())
	if err != nil {
		return err
	}
	if alive := aliveMembers(ms); alive != want {
		return fmt.Errorf("%s sees %d alive members, want %d", nd.name, alive, want)
	}
	if leaderOf(ms) == "" {
		return fmt.Errorf("%s sees no leader", nd.name)
	}
	// Gossip's view comes first; placement reads the raft state's, which
	// the leader fills in a tick later ("place on NODE: not found").
	ns, err := nd.client.Nodes(context.Background())
	if err != nil {
		return err
	}
	ready := 0
	for _, n := range ns {
		if n.Status == "ready" {
			ready++
		}
	}
	if ready < want {
		return fmt.Errorf("%s's replica lists %d ready nodes, want %d", nd.name, ready, want)
	}
	return nil
}

// startThree starts a 3-node cluster bootstrapped by gossip and waits for it
// to converge.
func startThree(c *testCluster) []*testNode {
	n1 := c.start(1, "-bootstrap-expect", "3", "-label", "zone=z1")
	n2 := c.start(2, "-bootstrap-expect", "3", "-join", n1.bind, "-label", "zone=z2")
	n3 := c.start(3, "-bootstrap-expect", "3", "-join", n1.bind, "-label", "zone=z3")
	nodes := []*testNode{n1, n2, n3}
	for _, nd := range nodes {
		c.waitFor(30*time.Second, nd.name+" to converge", func() error { return converged(nd, 3) })
	}
	return nodes
}
