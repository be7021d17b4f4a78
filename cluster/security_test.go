package cluster_test

import (
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/cluster/pki"
)

// TestWrongKey checks that cluster traffic is closed to whoever lacks the
// cluster key: a node with another key cannot join the gossip (nor see who
// is in it), the TLS API refuses requests without a cluster certificate or
// with one from another cluster's CA, and the remote CLI works only with
// the right key.
func TestWrongKey(t *testing.T) {
	c := newTestCluster(t)
	n1 := c.start(1, "-bootstrap-expect", "1")
	c.waitFor(15*time.Second, "n1 leader", func() error { return converged(n1, 1) })

	other, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	intruder := c.start(2, "-encrypt", other.String(), "-join", n1.bind, "-bootstrap-expect", "1")
	time.Sleep(3 * time.Second) // several gossip rounds
	for _, nd := range []*testNode{n1, intruder} {
		ms, err := nd.client.Members(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != 1 || ms[0].Name != nd.name {
			t.Errorf("%s sees members %+v; want only itself", nd.name, ms)
		}
	}
	if b, _ := os.ReadFile(intruder.logPath); !strings.Contains(string(b), "join failed") {
		t.Errorf("intruder log does not report the failed join")
	}

	// Forged API requests.
	url := "https://" + n1.api + api.PathWorkloads
	for name, cfg := range map[string]*tls.Config{
		"no client certificate": {InsecureSkipVerify: true},
		"other cluster's certificate": func() *tls.Config {
			ca, _ := other.CA()
			cert, _ := ca.Issue("forger")
			return &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}}
		}(),
	} {
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 5 * time.Second}
		resp, err := hc.Post(url, "application/json", strings.NewReader(`{"command":"/bin/true"}`))
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			t.Errorf("%s: request accepted: %s %s", name, resp.Status, b)
		}
	}

	// The remote CLI: right key works, wrong key is refused (exit 4).
	out, errs, code := c.ctlRun("members", "-address", n1.api, "-key-file", c.keyFile)
	if code != 0 || !strings.Contains(out, n1.name) {
		t.Errorf("remote CLI with the cluster key: exit %d, %s%s", code, out, errs)
	}
	bad := filepath.Join(t.TempDir(), "other.key")
	os.WriteFile(bad, []byte(other.String()), 0o600)
	_, errs, code = c.ctlRun("run", "-address", n1.api, "-key-file", bad, "--", "/bin/true")
	if code != 5 || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
		t.Errorf("remote CLI with another key: exit %d, stderr %q; want exit 5, one line", code, errs)
	}
	_, errs, code = c.ctlRun("members", "-address", n1.api)
	if code != 2 {
		t.Errorf("remote CLI without a key: exit %d, stderr %q; want 2", code, errs)
	}
	ws, err := n1.client.Workloads(context.Background())
	if err != nil || len(ws) != 0 {
		t.Errorf("workloads after forged requests: %v %v; want none", ws, err)
	}
}
