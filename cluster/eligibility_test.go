package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// ctlFail runs pclusterctl against nd expecting exit code want, and returns
// stderr, which must be one line.
func (c *testCluster) ctlFail(nd *testNode, want int, args ...string) string {
	c.tb.Helper()
	_, errs, code := c.ctlRun(withFlags(args, "-address", nd.socket)...)
	if code != want {
		c.tb.Errorf("pclusterctl %v: exit %d, want %d (%s)", args, code, want, strings.TrimSpace(errs))
	}
	if strings.Count(errs, "\n") != 1 {
		c.tb.Errorf("pclusterctl %v: stderr not one line: %q", args, errs)
	}
	return errs
}

// TestNodeEligibilityDev: on a -dev cluster, `node eligibility -disable`
// makes the only node ineligible (node status says so), a run is then
// refused with one line, and -enable makes runs work again. Bad input is a
// usage error (2), an unknown node not found (3).
func TestNodeEligibilityDev(t *testing.T) {
	c := newTestCluster(t)
	nd := startDev(t, c, filepath.Join(c.dir, "dev.sock"))
	if out := c.ctl(nd, "node", "eligibility", "-disable", nd.name); out != "node "+nd.name+": ineligible\n" {
		t.Errorf("node eligibility -disable: got %q", out)
	}
	var n api.Node
	c.ctlJSON(nd, &n, "node", "status", nd.name)
	if n.Eligible {
		t.Errorf("node status -json after -disable: eligible true")
	}
	if out := c.ctl(nd, "node", "status", nd.name); !strings.Contains(out, "Eligible:   false") {
		t.Errorf("node status after -disable:\n%s", out)
	}
	if out := c.ctl(nd, "node", "status"); !strings.Contains(out, "ELIGIBLE") || !strings.Contains(out, " false ") {
		t.Errorf("node status list after -disable:\n%s", out)
	}
	if errs := c.ctlFail(nd, 1, "run", "--", "sleep", "600"); !strings.Contains(errs, "no eligible node") {
		t.Errorf("run on an ineligible cluster: %q", errs)
	}
	if errs := c.ctlFail(nd, 1, "run", "-node", nd.name, "--", "sleep", "600"); !strings.Contains(errs, "node is not eligible") {
		t.Errorf("run pinned to an ineligible node: %q", errs)
	}
	if out := c.ctl(nd, "node", "eligibility", "-enable", nd.name); out != "node "+nd.name+": eligible\n" {
		t.Errorf("node eligibility -enable: got %q", out)
	}
	var w api.Workload
	c.ctlJSON(nd, &w, "run", "--", "sleep", "600")
	if w.DesiredNode != nd.name {
		t.Errorf("run after -enable: placed on %q", w.DesiredNode)
	}
	c.ctlFail(nd, 3, "node", "eligibility", "-disable", "nosuchnode")
	c.ctlFail(nd, 2, "node", "eligibility", "-disable", "-enable", nd.name)
	c.ctlFail(nd, 2, "node", "eligibility", nd.name)
	c.ctlFail(nd, 2, "node", "eligibility", "-disable")
	c.ctlFail(nd, 1, "node", "eligibility", "-disable", strings.Repeat("n", 300))

	// The API needs "eligible" said: a body without it changes nothing.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", nd.socket)
	}}}
	for _, body := range []string{`{}`, `{"eligible": false, "drain": true}`, `{"eligible": "no"}`} {
		resp, err := hc.Post("http://pclusterd"+api.PathNodes+"/"+nd.name+"/eligibility", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("eligibility body %s: got %d %s, want 400", body, resp.StatusCode, b)
		}
	}
	c.ctlJSON(nd, &n, "node", "status", nd.name)
	if !n.Eligible {
		t.Errorf("refused eligibility requests changed the node: eligible false")
	}
}

// TestNodeEligibilityThreeNodes: a node made ineligible (through a
// follower: the write is forwarded to the leader) receives no new workload,
// pinned or placed, while the others do; every node's view agrees.
func TestNodeEligibilityThreeNodes(t *testing.T) {
	c := newTestCluster(t)
	nodes := startThree(c)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	var leader string
	c.waitFor(10*time.Second, "a leader", func() error {
		ms, err := n1.client.Members(t.Context())
		if leader = leaderOf(ms); err == nil && leader == "" {
			err = fmt.Errorf("no leader")
		}
		return err
	})
	via := n2 // a follower
	for _, nd := range nodes {
		if nd.name != leader && nd.name != n1.name {
			via = nd
		}
	}
	c.ctl(via, "node", "eligibility", "-disable", n1.name)
	for _, nd := range nodes {
		var n api.Node
		c.ctlJSON(nd, &n, "node", "status", n1.name)
		if n.Eligible {
			t.Errorf("%s's view of %s: eligible", nd.name, n1.name)
		}
	}
	placed := map[string]int{}
	for range 6 {
		var w api.Workload
		c.ctlJSON(n1, &w, "run", "--", "sleep", "600")
		placed[w.DesiredNode]++
	}
	if placed[n1.name] != 0 || placed[n2.name] == 0 || placed[n3.name] == 0 {
		t.Errorf("placements with %s ineligible: %v", n1.name, placed)
	}
	if errs := c.ctlFail(n3, 1, "run", "-node", n1.name, "--", "sleep", "600"); !strings.Contains(errs, "node is not eligible") {
		t.Errorf("run pinned to the ineligible node: %q", errs)
	}
	c.ctl(n3, "node", "eligibility", "-enable", n1.name)
	var w api.Workload
	c.ctlJSON(n2, &w, "run", "-node", n1.name, "--", "sleep", "600")
	waitState(c, n2, w.ID, "running", 10*time.Second)
}

// TestPathNamesOneLine: a node name or workload id in a request's path (or
// run's node) is echoed in the error only once checked, so a newline in it
// (URL-decoded from %0A) cannot make the one-line error two lines.
func TestPathNamesOneLine(t *testing.T) {
	c := newTestCluster(t)
	nd := startDev(t, c, filepath.Join(c.dir, "dev.sock"))
	for _, args := range [][]string{
		{"node", "status", "a\nb"},
		{"node", "eligibility", "-disable", "a\nb"},
		{"status", "a\nb"},
		{"stop", "a\nb"},
		{"logs", "a\nb"},
		{"run", "-node", "a\nb", "--", "true"},
	} {
		c.ctlFail(nd, 1, args...)
	}
}
