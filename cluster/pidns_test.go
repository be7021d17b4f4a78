package cluster_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// treeScript is a workload with a tree of processes: a shell whose
// background child only sleeps, and which prints a counter, its own PID
// and its child's, as it sees them, every 100 ms (each tick forks a sleep).
const treeScript = `sleep 100000 & c=$!; n=0; while :; do n=$((n+1)); echo "$n $$ $c"; sleep 0.1; done`

// TestMigrateTreeAround moves a shell and its children around a 3-node
// cluster, A→B→C→A. The workload runs as a PID namespace of its own: on
// every node the shell's getpid ($$) and its child's PID ($!) are what they
// were at its start, in its lines and in /proc (NSpid), while the host
// PIDs of both are new after each move (all test hosts share one PID
// namespace: the source's frozen copy still held the old ones while the
// target built the new). The counter goes on with no gap and no repeat.
// A stop then reaches the shell through its init, after the moves, and
// its real end (killed by SIGTERM) reaches the state.
func TestMigrateTreeAround(t *testing.T) {
	c := newTestCluster(t)
	_, nodes := startLab(t, c, 100+int(c.prefix[4])%50)
	var w api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, "--", "/bin/sh", "-c", treeScript)
	logPath := filepath.Join(nodes[0].dataDir, "workloads", w.ID, "stdout.log")
	c.waitFor(30*time.Second, "the shell's first line", func() error {
		b, _ := os.ReadFile(logPath)
		if len(parseCounter(t, "the log", string(b))) < 1 {
			return fmt.Errorf("no line yet")
		}
		// The process writes before its start is in the state.
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State != "running" || got.PID == 0 {
			return fmt.Errorf("%s, pid %d (%v)", got.State, got.PID, err)
		}
		w = got
		return nil
	})
	if w.NSPID <= 0 || w.InitPID <= 0 || w.NSPID == w.PID {
		t.Fatalf("workload pid %d, ns pid %d, init %d: want it in a PID namespace of its own", w.PID, w.NSPID, w.InitPID)
	}
	shell, child := w.PID, treeChild(t, w.PID)
	nsShell, nsChild := nsIDs(t, shell)[1], nsIDs(t, child)[1]
	if nsShell != w.NSPID {
		t.Fatalf("the shell's NSpid %d, the state's %d", nsShell, w.NSPID)
	}
	var seq []counterLine
	from := nodes[0]
	for hop, to := range []int{1, 2, 0} {
		target := nodes[to]
		out := c.ctl(nodes[hop%3], "migrate", "-node", target.name, w.ID)
		t.Logf("move %d:\n%s", hop+1, out)
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State != "running" || got.Node != target.name {
			t.Fatalf("after move %d: %s on %s (%v), want running on %s", hop+1, got.State, got.Node, err, target.name)
		}
		newChild := treeChild(t, got.PID)
		if got.PID == shell || newChild == child {
			t.Errorf("after move %d: host pids of the shell and its child %d %d, want new ones (were %d %d)",
				hop+1, got.PID, newChild, shell, child)
		}
		if s, k := nsIDs(t, got.PID)[1], nsIDs(t, newChild)[1]; s != nsShell || k != nsChild || got.NSPID != nsShell {
			t.Errorf("after move %d: pids in the namespace: shell %d (state %d), child %d; want %d, %d",
				hop+1, s, got.NSPID, k, nsShell, nsChild)
		}
		shell, child = got.PID, newChild
		// The source's log ends where the target's begins; what the
		// shell saw of its pids never changes.
		b, err := os.ReadFile(filepath.Join(from.dataDir, "workloads", w.ID, "stdout.log"))
		if err != nil {
			t.Fatalf("the source's log: %v", err)
		}
		seq = checkRun(t, from.name+"'s log", seq, parseCounter(t, from.name+"'s log", string(b)))
		if seq[0].pid != nsShell || seq[0].sum != strconv.Itoa(nsChild) {
			t.Fatalf("the shell printed $$ %d $! %s, want %d %d", seq[0].pid, seq[0].sum, nsShell, nsChild)
		}
		targetLog := filepath.Join(target.dataDir, "workloads", w.ID, "stdout.log")
		c.waitFor(20*time.Second, "the target's lines", func() error {
			b, _ := os.ReadFile(targetLog)
			if lines := parseCounter(t, target.name+"'s log", string(b)); len(lines) < 3 {
				return fmt.Errorf("%d lines", len(lines))
			}
			return nil
		})
		if err := os.RemoveAll(filepath.Dir(filepath.Join(from.dataDir, "workloads", w.ID, "x"))); err != nil {
			t.Fatal(err)
		}
		from = target
	}
	b, _ := os.ReadFile(filepath.Join(from.dataDir, "workloads", w.ID, "stdout.log"))
	checkRun(t, from.name+"'s log", seq, parseCounter(t, from.name+"'s log", string(b)))
	c.ctl(nodes[1], "stop", w.ID)
	c.waitFor(30*time.Second, "the exit status in the state", func() error {
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State == "running" {
			return fmt.Errorf("%s (%v)", got.State, err)
		}
		if got.ExitCode != 128+15 || got.Signal != "terminated" {
			t.Fatalf("workload ended %s with exit code %d signal %q (%s), want 143, terminated: the shell's own end",
				got.State, got.ExitCode, got.Signal, got.Message)
		}
		return nil
	})
	c.waitFor(10*time.Second, "the tree to end", func() error {
		for _, pid := range []int{shell, child} {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
				return fmt.Errorf("pid %d lives", pid)
			}
		}
		return nil
	})
}

// treeChild returns the host PID of treeScript's background sleep, a
// child of the shell, pid.
func treeChild(t *testing.T, pid int) int {
	t.Helper()
	for child := range childrenOf(pid) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", child))
		if strings.Join(strings.Split(strings.TrimRight(string(b), "\x00"), "\x00"), " ") == "sleep 100000" {
			return child
		}
	}
	t.Fatalf("shell %d has no child sleep 100000 (children %v)", pid, childrenOf(pid))
	return 0
}
