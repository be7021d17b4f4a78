package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
	"github.com/pcluster/pcluster/node"
)

// startLab starts a 3-node cluster, each pclusterd in its own network
// namespace on 198.18.x.0/24, each with its own data directory.
func startLab(t testing.TB, c *testCluster, subnet int) (*netlab.Lab, []*testNode) {
	return startLabWith(t, c, subnet)
}

// startLabWith is startLab giving every node the flags more.
func startLabWith(t testing.TB, c *testCluster, subnet int, more ...string) (*netlab.Lab, []*testNode) {
	lab := netlab.New(t, 3, subnet)
	var nodes []*testNode
	for i := 1; i <= 3; i++ {
		extra := append([]string{"-bootstrap-expect", "3"}, more...)
		if i > 1 {
			extra = append(extra, "-join", lab.Hosts[0].Addr+":7946")
		}
		h := lab.Hosts[i-1]
		nodes = append(nodes, c.startAt(i, h.Addr, 7946, h.NS, extra...))
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
	return lab, nodes
}

// copies lists the live processes running the program at path.
func copies(path string) []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || exe != path {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := strings.LastIndexByte(string(st), ')'); i > 0 && i+2 < len(st) && (st[i+2] == 'Z' || st[i+2] == 'X') {
				continue
			}
		}
		out = append(out, pid)
	}
	return out
}

// counterLine is one line of migcount: counter, getpid(), heap checksum.
type counterLine struct {
	n   int
	pid int
	sum string
}

func parseCounter(t *testing.T, where, s string) []counterLine {
	t.Helper()
	var out []counterLine
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		if l == "" {
			continue
		}
		f := strings.Fields(l)
		if len(f) != 3 {
			t.Fatalf("%s: line %q: want \"N PID SUM\"", where, l)
		}
		n, err1 := strconv.Atoi(f[0])
		pid, err2 := strconv.Atoi(f[1])
		if err1 != nil || err2 != nil {
			t.Fatalf("%s: line %q: want \"N PID SUM\"", where, l)
		}
		out = append(out, counterLine{n, pid, f[2]})
	}
	return out
}

// checkRun checks that lines continue seq (its last line, if any) by one
// each, with pid and sum unchanged, and returns them appended.
func checkRun(t *testing.T, where string, seq, lines []counterLine) []counterLine {
	t.Helper()
	for _, l := range lines {
		if len(seq) > 0 {
			prev := seq[len(seq)-1]
			if l.n != prev.n+1 {
				t.Fatalf("%s: counter %d after %d: want %d (a gap or a repeat)", where, l.n, prev.n, prev.n+1)
			}
			if l.pid != prev.pid || l.sum != prev.sum {
				t.Fatalf("%s: line %d: getpid %d sum %s, want %d %s", where, l.n, l.pid, l.sum, prev.pid, prev.sum)
			}
		}
		seq = append(seq, l)
	}
	return seq
}

func workloadOn(nd *testNode, id string) (api.Workload, error) {
	return nd.client.Workload(context.Background(), id)
}

// TestMigrateAround moves a stateful counter around a 3-node cluster,
// each node in its own network namespace with its own data directory:
// A→B→C→A, then once more, from an agent restarted meanwhile (which
// adopted the workload: not its child), to the node placement picks.
// The workload runs as a PID namespace of its own, which moves whole.
// After each move: the workload runs on the target with the same PID in
// its namespace (getpid() says so too) and a new one on the host (the
// source's copy held the old one until the commit: all test hosts share
// one PID namespace), exactly one copy of the program runs,
// the counter in the logs continues with no gap and no repeat and the
// heap checksum is unchanged, and the source's workload directory is
// removed, `pclusterctl logs` still answering from every node. At the end
// the workload is stopped: SIGTERM makes it exit 7, which must reach the
// state, reaped by the last target's agent.
func TestMigrateAround(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	_, nodes := startLab(t, c, 100+int(c.prefix[2])%50)
	var w api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, "-name", "counter", bin, "20")
	c.waitFor(20*time.Second, "the counter to run", func() error {
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State != "running" || got.PID == 0 {
			return fmt.Errorf("%+v (%v)", got.State, err)
		}
		w = got
		return nil
	})
	pid, nsPid := w.PID, w.NSPID
	if nsPid <= 0 || nsPid == pid || w.InitPID <= 0 {
		t.Fatalf("workload pid %d, ns pid %d, init %d: want it in a PID namespace of its own", pid, nsPid, w.InitPID)
	}
	checkMigrateRefusals(t, c, nodes, w)
	var seq []counterLine
	byName := map[string]*testNode{}
	for _, nd := range nodes {
		byName[nd.name] = nd
	}
	// A→B→C→A by name, then once more wherever placement puts it (-1).
	for hop, to := range []int{1, 2, 0, -1} {
		cur, err := workloadOn(nodes[0], w.ID)
		if err != nil {
			t.Fatal(err)
		}
		from := byName[cur.Node]
		if to < 0 {
			// The last move is from an agent that adopted the workload
			// after a restart: not its child, still movable.
			c.stop(from)
			c.launch(from)
			c.waitFor(30*time.Second, from.name+" to adopt the counter", func() error {
				if b, _ := os.ReadFile(from.logPath); !strings.Contains(string(b), "adopted running workload") {
					return fmt.Errorf("no adoption in its log")
				}
				return converged(from, 3)
			})
			// Its leave marked the node down and the workload lost; the
			// adopting agent's report makes it running again.
			c.waitFor(30*time.Second, "the counter running again on "+from.name, func() error {
				got, err := workloadOn(nodes[1], w.ID)
				if err != nil || got.State != "running" || got.Node != from.name || got.PID != pid || got.NSPID != nsPid {
					return fmt.Errorf("%s on %s pid %d/%d (%v)", got.State, got.Node, got.PID, got.NSPID, err)
				}
				return nil
			})
		}
		args := []string{"migrate", "counter"}
		var target *testNode
		if to >= 0 {
			target = nodes[to]
			args = []string{"migrate", "-node", target.name, "counter"}
		}
		if got := copies(bin); len(got) != 1 {
			t.Fatalf("before move %d: copies of the counter %v, want exactly one", hop+1, got)
		}
		// Ask any node: the API forwards to the leader.
		out := c.ctl(nodes[hop%3], args...)
		t.Logf("move %d:\n%s", hop+1, out)
		if target == nil {
			got, err := workloadOn(nodes[0], w.ID)
			if err != nil || byName[got.Node] == nil || got.Node == from.name {
				t.Fatalf("move %d by placement: workload on %q (%v), want another node than %s", hop+1, got.Node, err, from.name)
			}
			target = byName[got.Node]
		}
		if !strings.Contains(out, "done") || !strings.Contains(out, "moved "+w.ID) {
			t.Fatalf("migrate output lacks the phases or the summary:\n%s", out)
		}
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State != "running" || got.Node != target.name {
			t.Fatalf("after move %d: workload %s on %s (%v), want running on %s", hop+1, got.State, got.Node, err, target.name)
		}
		if got.NSPID != nsPid || got.PID == pid || got.PID <= 0 {
			t.Errorf("after move %d: pid %d, %d in its namespace: want %d there and a new one on the host (was %d)",
				hop+1, got.PID, got.NSPID, nsPid, pid)
		}
		if ids := nsIDs(t, got.PID); ids[0] != got.PID || ids[1] != nsPid {
			t.Errorf("after move %d: NSpid of pid %d: %v, want [%d %d]", hop+1, got.PID, ids, got.PID, nsPid)
		}
		pid = got.PID
		if cs := copies(bin); len(cs) != 1 || cs[0] != pid {
			t.Fatalf("after move %d: copies of the counter %v, want exactly [%d]", hop+1, cs, pid)
		}
		// The source's log is complete: its process is gone. Then the
		// source forgets the workload: nothing on the target reads it.
		dir := filepath.Join(from.dataDir, "workloads", w.ID)
		b, err := os.ReadFile(filepath.Join(dir, "stdout.log"))
		if err != nil {
			t.Fatalf("the source's log: %v", err)
		}
		seq = checkRun(t, from.name+"'s log", seq, parseCounter(t, from.name+"'s log", string(b)))
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		if seq[0].pid != nsPid {
			t.Fatalf("getpid %d, want %d (its pid in its namespace)", seq[0].pid, nsPid)
		}
		// The target's log continues it, read through every node.
		for _, via := range nodes {
			var lines []counterLine
			c.waitFor(20*time.Second, "the target's log through "+via.name, func() error {
				logs := c.ctl(via, "logs", w.ID)
				lines = parseCounter(t, target.name+"'s log", logs)
				if len(lines) < 3 {
					return fmt.Errorf("%d lines", len(lines))
				}
				return nil
			})
			checkRun(t, target.name+"'s log through "+via.name, seq, lines[:3])
		}
	}
	var ms []api.Migration
	c.ctlJSON(nodes[1], &ms, "migrations", "-a")
	if len(ms) != 4 {
		t.Fatalf("migrations -a lists %d, want 4", len(ms))
	}
	for _, m := range ms {
		if m.State != "done" || m.Bytes == 0 {
			t.Errorf("migration %s: %s with %d bytes, want done with the stream's size", m.ID, m.State, m.Bytes)
		}
		if m.Origin != "operator" {
			t.Errorf("migration %s: origin %q, want operator (pclusterctl migrate)", m.ID, m.Origin)
		}
	}
	c.ctl(nodes[2], "stop", w.ID)
	c.waitFor(30*time.Second, "the exit status in the state", func() error {
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State == "running" {
			return fmt.Errorf("%s (%v)", got.State, err)
		}
		if got.ExitCode != 7 {
			t.Fatalf("workload ended %s with exit code %d (%s), want 7 reaped by its node", got.State, got.ExitCode, got.Message)
		}
		return nil
	})
	if cs := copies(bin); len(cs) != 0 {
		t.Errorf("copies of the counter after the stop: %v", cs)
	}
}

// nsIDs returns the NSpid line of pid's status: its PID on the host, then
// in each nested PID namespace.
func nsIDs(t *testing.T, pid int) []int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
			var ids []int
			for _, f := range strings.Fields(v) {
				n, _ := strconv.Atoi(f)
				ids = append(ids, n)
			}
			if len(ids) == 2 {
				return ids
			}
			t.Fatalf("pid %d: NSpid %q: want two levels", pid, v)
		}
	}
	t.Fatalf("pid %d: no NSpid", pid)
	return nil
}

// isWatchdog reports whether pid is a pclusterd's fence watchdog (a child
// it keeps for as long as it runs: node.WatchdogName), not a workload.
func isWatchdog(pid int) bool {
	b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	argv0, _, _ := strings.Cut(string(b), "\x00")
	return argv0 == node.WatchdogName
}

// childrenOf lists pid's children with their state letters.
func childrenOf(pid int) map[int]byte {
	out := map[int]byte{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 {
			if ppid, _ := strconv.Atoi(f[1]); ppid == pid && !isWatchdog(child) {
				out[child] = f[0][0]
			}
		}
	}
	return out
}

// runTicking runs bin with args on node nd and waits for its first tick in
// the node's log; it returns the workload as running (with its PID) and
// the path of its stdout log.
func runTicking(c *testCluster, nd *testNode, bin string, args ...string) (api.Workload, string) {
	var w api.Workload
	c.ctlJSON(nd, &w, append([]string{"run", "-node", nd.name, bin}, args...)...)
	logPath := filepath.Join(nd.dataDir, "workloads", w.ID, "stdout.log")
	c.waitFor(30*time.Second, filepath.Base(bin)+" to tick", func() error {
		if lastTick(logPath) < 1 {
			return fmt.Errorf("no tick yet")
		}
		return nil
	})
	w, _ = workloadOn(nd, w.ID)
	return w, logPath
}

// lastTick returns the last "tick N" of bigheap's log at path.
func lastTick(path string) int {
	b, _ := os.ReadFile(path)
	last := -1
	for _, l := range strings.Split(string(b), "\n") {
		if n, err := strconv.Atoi(strings.TrimPrefix(l, "tick ")); err == nil && strings.HasPrefix(l, "tick ") {
			last = n
		}
	}
	return last
}

// TestMigrateFailureResumes breaks a migration before its commit, once by
// killing the target's half-built process and once by cutting the target's
// link mid-stream: the migration is aborted, `migrate` exits 1, and the
// original resumes on the source where it was (same PID, its ticks go
// on), the only copy; the target keeps no process of it.
func TestMigrateFailureResumes(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "bigheap")
	lab, nodes := startLab(t, c, 100+int(c.prefix[3])%50)
	src, dst := nodes[0], nodes[1]
	for _, fault := range []string{"kill the half-built process", "cut the link"} {
		w, logPath := runTicking(c, src, bin, "32")
		pid := w.PID
		// Slow the stream down (the source's egress) so the fault lands
		// while the target builds.
		lab.Hosts[0].Shape(t, "20mbit")
		type result struct {
			out, errs string
			code      int
		}
		done := make(chan result, 1)
		go func() {
			out, errs, code := c.ctlRun("migrate", "-address", src.socket, "-node", dst.name, w.ID)
			done <- result{out, errs, code}
		}()
		c.waitFor(30*time.Second, "the target to build", func() error {
			for child, st := range childrenOf(dst.cmd.Process.Pid) {
				if st == 't' {
					if fault == "cut the link" {
						lab.Cut(t, 1, true)
					} else {
						syscall.Kill(child, syscall.SIGKILL)
					}
					return nil
				}
			}
			return fmt.Errorf("no traced child of %s", dst.name)
		})
		var r result
		select {
		case r = <-done:
		case <-time.After(2 * time.Minute):
			t.Fatalf("%s: migrate did not end", fault)
		}
		if fault == "cut the link" {
			lab.Cut(t, 1, false)
		}
		lab.Hosts[0].Shape(t, "")
		t.Logf("%s: migrate exit %d:\n%s%s", fault, r.code, r.out, r.errs)
		if r.code != 1 || !strings.Contains(r.errs, "aborted") {
			t.Fatalf("%s: migrate exit %d, stderr %q: want 1 and the abort", fault, r.code, r.errs)
		}
		got, err := workloadOn(src, w.ID)
		if err != nil || got.State != "running" || got.Node != src.name || got.PID != pid {
			t.Fatalf("%s: workload %s on %s pid %d (%v), want running on %s pid %d", fault, got.State, got.Node, got.PID, err, src.name, pid)
		}
		if cs := copies(bin); len(cs) != 1 || cs[0] != pid {
			t.Fatalf("%s: copies %v, want exactly [%d]", fault, cs, pid)
		}
		at := lastTick(logPath)
		c.waitFor(30*time.Second, "the original to tick on", func() error {
			if n := lastTick(logPath); n < at+2 {
				return fmt.Errorf("last tick %d", n)
			}
			return nil
		})
		c.waitFor(30*time.Second, "the target to keep nothing", func() error {
			if kids := childrenOf(dst.cmd.Process.Pid); len(kids) > 0 {
				return fmt.Errorf("children of %s: %v", dst.name, kids)
			}
			return nil
		})
		c.ctl(src, "stop", w.ID)
		c.waitFor(30*time.Second, "the stop", func() error {
			if cs := copies(bin); len(cs) > 0 {
				return fmt.Errorf("copies %v", cs)
			}
			return nil
		})
	}
}

// checkMigrateRefusals holds the one-line refusals of migrate and of the
// transfer endpoint, with pclusterctl's exit codes, while w runs on
// nodes[0].
func checkMigrateRefusals(t *testing.T, c *testCluster, nodes []*testNode, w api.Workload) {
	t.Helper()
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"migrate", "-address", nodes[1].socket}, 2, "exactly one workload"},
		{[]string{"migrate", "-address", nodes[1].socket, "wnosuch"}, 3, "not found"},
		{[]string{"migrate", "-address", nodes[1].socket, "-node", "nosuchnode", w.ID}, 3, "node nosuchnode: not found"},
		{[]string{"migrate", "-address", nodes[1].socket, "-node", nodes[0].name, w.ID}, 1, "is the node it runs on"},
	} {
		_, errs, code := c.ctlRun(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") > 0 {
			t.Errorf("pclusterctl %v: exit %d, stderr %q; want exit %d and one line with %q", tc.args[3:], code, errs, tc.code, tc.want)
		}
	}
	// An ineligible target is refused by the state.
	c.ctl(nodes[1], "node", "eligibility", "-disable", nodes[2].name)
	_, errs, code := c.ctlRun("migrate", "-address", nodes[1].socket, "-node", nodes[2].name, w.ID)
	if code != 1 || !strings.Contains(errs, "not eligible") {
		t.Errorf("migrate to an ineligible node: exit %d, stderr %q; want 1 and \"not eligible\"", code, errs)
	}
	c.ctl(nodes[1], "node", "eligibility", "-enable", nodes[2].name)
	// The transfer endpoint: only over mutual TLS, only for a migration
	// the target's replica lists.
	path := api.PathMigrations + "/m999999/transfer?attempt=1"
	if code, ans := post(t, nodes[1], path, ""); code != http.StatusForbidden || !strings.Contains(ans, "mutual TLS") {
		t.Errorf("transfer over the socket: %d %q, want 403", code, ans)
	}
	key, err := pki.ReadKeyFile(c.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := key.CA()
	cert, _ := ca.Issue("impostor")
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS(cert),
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialIn(nodes[1].netns, addr) }}}
	resp, err := hc.Post("https://"+nodes[1].api+path, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(b), "m999999: not found") {
		t.Errorf("transfer of an unknown migration: %d %s, want 404", resp.StatusCode, b)
	}
	hc.CloseIdleConnections()
}

// dialIn connects to addr from network namespace ns: from a thread of its
// own that enters ns and is never given back (it ends with its goroutine).
func dialIn(ns, addr string) (net.Conn, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread goes with the goroutine
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			ch <- res{nil, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- res{nil, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		ch <- res{c, err}
	}()
	r := <-ch
	return r.c, r.err
}
