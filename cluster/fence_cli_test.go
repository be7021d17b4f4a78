package cluster_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/pcluster/pcluster/cluster/api"
)

// TestFenceModes: -fence on run and on checkpoint policies takes freeze
// or off, anything else is one line naming the field; the mode is kept
// and shown by status and policy list.
func TestFenceModes(t *testing.T) {
	c := newTestCluster(t)
	nd := startDev(t, c, filepath.Join(t.TempDir(), "d.sock"))
	for _, args := range [][]string{
		{"run", "-address", nd.socket, "-fence", "thaw", "--", "/bin/true"},
		{"checkpoint", "policy", "set", "-address", nd.socket, "-interval", "5s", "-fence", "thaw", "p"},
	} {
		_, errs, code := c.ctlRun(args...)
		if code != 1 || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, `fence: "thaw": want freeze or off`) {
			t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line naming fence", args, code, errs)
		}
	}
	var w api.Workload
	c.ctlJSON(nd, &w, "run", "-fence", "off", "--", "sleep", "300")
	if out := c.ctl(nd, "status", w.ID); !strings.Contains(out, "Fence:     off") {
		t.Errorf("status of a workload run with -fence off: %q, want its Fence line", out)
	}
	if out := c.ctl(nd, "checkpoint", "policy", "set", "-interval", "5s", "-fence", "off", "p"); !strings.Contains(out, ", fence off") {
		t.Errorf("policy set -fence off: %q, want it said", out)
	}
	if out := c.ctl(nd, "checkpoint", "policy", "list"); !strings.Contains(out, "FENCE") || !strings.Contains(out, " off") {
		t.Errorf("policy list: %q, want the FENCE column with off", out)
	}
	c.ctl(nd, "stop", w.ID)
}
