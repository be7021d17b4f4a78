package cluster_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// post sends body to the API on nd's socket and returns the status and the
// answer.
func post(t *testing.T, nd *testNode, path, body string) (int, string) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", nd.socket)
	}}}
	resp, err := hc.Post("http://pclusterd"+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestRunCredentialRange checks that uids and gids outside 0..2^32−2 are
// refused by the API with one line naming the field, from the CLI and from
// a raw request, instead of wrapping (2^32 → 0) or meaning "the daemon's"
// (−7 used to be dropped by the CLI and the workload ran as root).
func TestRunCredentialRange(t *testing.T) {
	c := newTestCluster(t)
	nd := startDev(t, c, filepath.Join(t.TempDir(), "d.sock"))
	for _, args := range [][]string{
		{"-uid", "4294967296"}, {"-uid", "-7"}, {"-gid", "4294967295"}, {"-gid", "-1"},
	} {
		_, errs, code := c.ctlRun(append(append([]string{"run", "-address", nd.socket}, args...), "--", "/bin/true")...)
		if code != 1 || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, args[0][1:]+" "+args[1]+": out of range 0..4294967294") {
			t.Errorf("run %v: exit %d, stderr %q; want exit 1 and one line naming the field and the range", args, code, errs)
		}
	}
	for _, body := range []string{`{"command":"/bin/true","uid":-5}`, `{"command":"/bin/true","gid":4294967296}`} {
		if code, ans := post(t, nd, "/v1/workloads", body); code != http.StatusBadRequest || !strings.Contains(ans, "out of range 0..4294967294") {
			t.Errorf("POST %s: %d %s; want 400 naming the range", body, code, ans)
		}
	}
	if ws, err := nd.client.Workloads(context.Background()); err != nil || len(ws) != 0 {
		t.Errorf("workloads after refused requests: %v %v, want none", ws, err)
	}
}
