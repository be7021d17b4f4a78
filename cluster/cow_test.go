package cluster_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
)

// TestCowSharedMigrate moves a forking workload (cowshare: a parent and
// the child it forked after filling 16 MiB that neither wrote since) from
// one node to another, live, as the cluster moves workloads by default:
// on the target the child's pages are still its parent's, one frame each
// (its Pss_Anon about half its Anonymous, as before the move), not a
// copy each (docs/pfreeze.md, "Live migration"). Both read what they
// had, and a write in the child after the move does not show in the
// parent.
func TestCowSharedMigrate(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "cowshare")
	_, nodes := startLab(t, c, 100+int(c.prefix[3])%50)
	var w api.Workload
	c.ctlJSON(nodes[0], &w, "run", "-node", nodes[0].name, bin)
	logOf := func(n *testNode) string {
		b, _ := os.ReadFile(filepath.Join(n.dataDir, "workloads", w.ID, "stdout.log"))
		return string(b)
	}
	c.waitFor(30*time.Second, "cowshare ready", func() error {
		if !regexp.MustCompile(`(?m)^ready \d+ \d+$`).MatchString(logOf(nodes[0])) {
			return fmt.Errorf("not ready")
		}
		got, err := workloadOn(nodes[0], w.ID)
		if err != nil || got.State != "running" || got.PID == 0 {
			return fmt.Errorf("%s, pid %d (%v)", got.State, got.PID, err)
		}
		w = got
		return nil
	})
	child := func(parent int) int {
		kids := childrenOf(parent)
		if len(kids) != 1 {
			t.Fatalf("cowshare %d has children %v, want one", parent, kids)
		}
		for k := range kids {
			return k
		}
		return 0
	}
	// report asks both for their area's first byte and sum, in the log
	// of node n, and returns the child's and the parent's.
	seen := map[*testNode]int{}
	report := func(n *testNode, parent, kid int) (cr, pr string) {
		syscall.Kill(kid, syscall.SIGUSR1)
		syscall.Kill(parent, syscall.SIGUSR1)
		rx := regexp.MustCompile(`(?m)^(child|parent) \d+ (first=\w+ sum=\d+)$`)
		c.waitFor(20*time.Second, "both reports", func() error {
			ms := rx.FindAllStringSubmatch(logOf(n), -1)
			if len(ms) < seen[n]+2 {
				return fmt.Errorf("%d reports", len(ms)-seen[n])
			}
			for _, m := range ms[seen[n] : seen[n]+2] {
				if m[1] == "child" {
					cr = m[2]
				} else {
					pr = m[2]
				}
			}
			seen[n] += 2
			return nil
		})
		return cr, pr
	}
	kid := child(w.PID)
	c0, p0 := report(nodes[0], w.PID, kid)
	if c0 != p0 {
		t.Fatalf("before: child %s, parent %s", c0, p0)
	}
	rss0, pss0 := anonKiB(t, kid)
	c.ctl(nodes[0], "migrate", "-node", nodes[1].name, w.ID)
	got, err := workloadOn(nodes[0], w.ID)
	if err != nil || got.State != "running" || got.Node != nodes[1].name {
		t.Fatalf("after the move: %s on %s (%v), want running on %s", got.State, got.Node, err, nodes[1].name)
	}
	kid = child(got.PID)
	rss, pss := anonKiB(t, kid)
	t.Logf("child Anonymous/Pss_Anon: %d/%d kB before the move, %d/%d kB after", rss0, pss0, rss, pss)
	if rss < 16<<10 || 4*2*pss > 5*rss {
		t.Errorf("child Anonymous %d kB, Pss_Anon %d kB after the move: want at least the 16384 kB area, shared with its parent (Pss under 5/4 of Rss/2)", rss, pss)
	}
	if c1, p1 := report(nodes[1], got.PID, kid); c1 != c0 || p1 != p0 {
		t.Errorf("after the move: child %s, parent %s; want both %s", c1, p1, c0)
	}
	syscall.Kill(kid, syscall.SIGUSR2)
	c.waitFor(20*time.Second, "the child's write", func() error {
		if !regexp.MustCompile(`(?m)^child wrote$`).MatchString(logOf(nodes[1])) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if c2, p2 := report(nodes[1], got.PID, kid); c2 == c0 || p2 != p0 {
		t.Errorf("after the child's write: child %s, parent %s; want the child's changed, the parent's %s", c2, p2, p0)
	}
}

// anonKiB returns pid's Anonymous and Pss_Anon from smaps_rollup, in kB.
func anonKiB(t *testing.T, pid int) (rss, pss int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	field := func(key string) int {
		m := regexp.MustCompile(`(?m)^` + key + `:\s+(\d+) kB$`).FindSubmatch(b)
		if m == nil {
			t.Fatalf("no %s in the smaps_rollup of %d", key, pid)
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	return field("Anonymous"), field("Pss_Anon")
}
