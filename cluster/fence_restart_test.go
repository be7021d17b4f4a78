package cluster_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/netlab"
	"golang.org/x/sys/unix"
)

// fenceLease is the part of a node's fence lease (node/watchdog_linux.go)
// the tests read.
type fenceLease struct {
	Owner   string `json:"owner"`
	Contact int64  `json:"contact"` // CLOCK_MONOTONIC ns
	Cgroups []struct {
		Workload string `json:"workload"`
	} `json:"cgroups"`
}

func readFenceLease(nd *testNode) (fenceLease, error) {
	var l fenceLease
	b, err := os.ReadFile(filepath.Join(nd.dataDir, "fence.lease"))
	if err == nil {
		err = json.Unmarshal(b, &l)
	}
	return l, err
}

func monoNow() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// TestFenceQuickRestart: a pclusterd SIGKILLed and started again at once
// is back in contact with the raft majority before its fence time has
// passed since its last contact, so nothing is frozen: not by the dead
// daemon's watchdog (which stands down when the new daemon writes the
// lease, and exits), not by the new daemon's fence (which counts from the
// lease's contact). The workload — one a failover could replace (restart
// on-failure), listed in the lease — runs on, adopted with the same PID.
// The cluster runs with -fence-after 5s (-failover-after 3s keeps the
// relation) so that a restart on a loaded machine is still quick.
func TestFenceQuickRestart(t *testing.T) {
	const fenceAfter = 5 * time.Second
	c := newTestCluster(t)
	lab := netlab.New(t, 3, 100+int(c.prefix[6])%50)
	var nodes []*testNode
	for i := 1; i <= 3; i++ {
		extra := []string{"-bootstrap-expect", "3", "-failover-after", "3s", "-fence-after", fenceAfter.String()}
		if i > 1 {
			extra = append(extra, "-join", lab.Hosts[0].Addr+":7946")
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
	victim, reader := nodes[2], nodes[0]
	var w api.Workload
	c.ctlJSON(reader, &w, "run", "-node", victim.name, "-restart", "on-failure", "-name", "quick", "/bin/sleep", "1000")
	c.waitFor(30*time.Second, "the workload running", func() error {
		got, err := workloadOn(reader, w.ID)
		if err != nil || got.State != "running" || got.PID == 0 {
			return fmt.Errorf("%s %v", got.State, err)
		}
		w = got
		return nil
	})
	var old fenceLease
	c.waitFor(10*time.Second, "the workload in "+victim.name+"'s fence lease", func() error {
		var err error
		if old, err = readFenceLease(victim); err != nil {
			return err
		}
		for _, cg := range old.Cgroups {
			if cg.Workload == w.ID {
				return nil
			}
		}
		return fmt.Errorf("lease %+v", old)
	})
	if len(processesWith(old.Owner)) == 0 {
		t.Fatalf("no fence watchdog runs for %s's agent (lease owner %s)", victim.name, old.Owner)
	}
	b, _ := os.ReadFile(victim.logPath)
	fences := bytes.Count(b, []byte("fenced: workload frozen"))

	killed := monoNow()
	c.kill(victim)
	c.launch(victim)
	var back time.Duration
	// Past the old watchdog's deadline (the lease's contact, at most the
	// kill, + the fence time) by a second.
	for deadline := killed + fenceAfter + time.Second; monoNow() < deadline; time.Sleep(20 * time.Millisecond) {
		if frozen(victim, w.ID, w.Attempt) {
			t.Fatalf("%v after the kill: the workload's cgroup on %s is frozen (new daemon back in contact: %v)",
				monoNow()-killed, victim.name, back)
		}
		if l, err := readFenceLease(victim); back == 0 && err == nil && l.Owner != old.Owner && l.Contact > int64(killed) {
			back = monoNow() - killed
		}
	}
	if back == 0 {
		t.Fatalf("the restarted daemon on %s did not renew the lease with a contact after the kill within %v", victim.name, fenceAfter+time.Second)
	}
	t.Logf("restarted daemon back in contact %v after the kill (fence after %v)", back.Round(time.Millisecond), fenceAfter)
	b, _ = os.ReadFile(victim.logPath)
	if n := bytes.Count(b, []byte("fenced: workload frozen")); n != fences {
		t.Errorf("%s's log: %d new \"fenced\" lines after a quick restart, want none", victim.name, n-fences)
	}
	c.waitFor(10*time.Second, "the old daemon's watchdog to exit", func() error {
		if pids := processesWith(old.Owner); len(pids) > 0 {
			return fmt.Errorf("still running: %v", pids)
		}
		return nil
	})
	got, err := workloadOn(reader, w.ID)
	if err != nil || got.State != "running" || got.Node != victim.name || got.Attempt != w.Attempt || got.PID != w.PID {
		t.Fatalf("after the restart: %s on %s attempt %d pid %d (%v); want running on %s attempt %d pid %d",
			got.State, got.Node, got.Attempt, got.PID, err, victim.name, w.Attempt, w.PID)
	}
	exe, _ := filepath.EvalSymlinks("/bin/sleep")
	if p := copies(exe); !containsPID(p, w.PID) {
		t.Fatalf("the workload's process %d is gone (sleep processes: %v)", w.PID, p)
	}
	c.ctl(reader, "stop", w.ID)
}

// processesWith lists the processes whose command line holds s.
func processesWith(s string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), s) {
			out = append(out, e.Name())
		}
	}
	return out
}

func containsPID(pids []int, pid int) bool {
	for _, p := range pids {
		if p == pid {
			return true
		}
	}
	return false
}
