package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster"
	"github.com/pcluster/pcluster/cluster/api"
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
	var eb api.ErrorBody
	if resp.StatusCode/100 != 2 && json.Unmarshal(b, &eb) == nil && eb.Error != "" {
		return resp.StatusCode, eb.Error
	}
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

// TestAPILimits checks the API's refusals, each one line naming the field
// and the limit (issue 9): unknown fields, bodies over 1 MiB, out-of-range
// values, oversized strings; then the paginated list, and the GC that
// removes ended workloads after the retention (-workload-gc-after).
func TestAPILimits(t *testing.T) {
	c := newTestCluster(t)
	nd := startDev(t, c, filepath.Join(t.TempDir(), "d.sock"), "-workload-gc-after", "2s")
	for _, tc := range []struct {
		body   string
		status int
		want   string
	}{
		{`{"command":"/bin/true","uidx":5}`, 400, `unknown field "uidx"`},
		{`{"command":"/bin/true","name":"` + strings.Repeat("x", 2<<20) + `"}`, 413, "request body over 1048576 bytes (1 MiB)"},
		{`{"command":"/bin/true","max_restarts":-1}`, 400, "max_restarts -1: out of range 0..10000"},
		{`{"command":"/bin/true","cpu_milli":-5}`, 400, "cpu_milli -5: out of range"},
		{`{"command":"/bin/true","name":"` + strings.Repeat("x", 900<<10) + `"}`, 400, "name: 921600 bytes, limit 256"},
		{`{"command":"/bin/true","labels":{"k":"` + strings.Repeat("v", 300) + `"}}`, 400, "labels k: 300 bytes, limit 256"},
		{`{"command":"/bin/true","uid":1e30}`, 400, "field uid"},
		{`{"command":"/bin/true\u001b[2J"}`, 400, "command: control character U+001B at byte 9"},
		{`{"command":"/bin/sh","args":["-c","echo \u001b]0;x\u0007"]}`, 400, "args[1]: control character U+001B"},
		{`{"command":"/bin/true","cwd":"/tmp\n"}`, 400, "cwd: control character U+000A"},
		{`{"command":"/bin/true"} {"command":"/bin/true"}`, 400, "trailing data"},
		{``, 400, "empty request body"},
	} {
		code, ans := post(t, nd, "/v1/workloads", tc.body)
		short := tc.body
		if len(short) > 60 {
			short = short[:60] + "..."
		}
		if code != tc.status || !strings.Contains(ans, tc.want) || strings.Count(strings.TrimSpace(ans), "\n") != 0 {
			t.Errorf("POST %s: %d %.200s; want %d with %q, one line", short, code, ans, tc.status, tc.want)
		}
	}
	for _, args := range [][]string{
		{"-name", strings.Repeat("n", 300)}, {"-max-restarts", "-1"}, {"-label", "k=" + strings.Repeat("v", 300)},
	} {
		_, errs, code := c.ctlRun(append(append([]string{"run", "-address", nd.socket}, args...), "--", "/bin/true")...)
		if code != 1 || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, "limit") && !strings.Contains(errs, "out of range") {
			t.Errorf("run %.40v: exit %d, stderr %q; want exit 1, one line naming the limit", args, code, errs)
		}
	}
	if ws, err := nd.client.Workloads(context.Background()); err != nil || len(ws) != 0 {
		t.Fatalf("workloads after refused requests: %d %v, want none", len(ws), err)
	}

	// Pages: five workloads, two per page.
	var ids []string
	for i := 0; i < 5; i++ {
		var w api.Workload
		c.ctlJSON(nd, &w, "run", "--", "sleep", "300")
		ids = append(ids, w.ID)
	}
	var got []string
	token, pages := "", 0
	for {
		page, next, err := nd.client.WorkloadsPage(context.Background(), 2, token)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) > 2 {
			t.Errorf("page of %d, asked for 2", len(page))
		}
		for _, w := range page {
			got = append(got, w.ID)
		}
		pages++
		if next == "" {
			break
		}
		token = next
	}
	if strings.Join(got, " ") != strings.Join(ids, " ") || pages != 3 {
		t.Errorf("paginated list: %v in %d pages, want %v in 3", got, pages, ids)
	}
	var listed []api.Workload
	c.ctlJSON(nd, &listed, "ps", "-a", "-per-page", "2")
	if len(listed) != 5 {
		t.Errorf("ps -per-page 2: %d workloads, want 5", len(listed))
	}
	for _, q := range []string{"per_page=0", "per_page=5000", "next_token=garbage"} {
		hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", nd.socket)
		}}}
		resp, err := hc.Get("http://pclusterd/v1/workloads?" + q)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(string(b), strings.SplitN(q, "=", 2)[0]) {
			t.Errorf("GET ?%s: %s %s; want 400 naming the parameter", q, resp.Status, b)
		}
	}

	// Agent reports are checked where they are proposed, as run requests
	// are: the FSM applies whatever is committed.
	// The exit report below is the agent's for a running workload: wait
	// until it runs (the agent starts it once its replica is current).
	var w4 api.Workload
	c.waitFor(20*time.Second, "the workload to run", func() error {
		c.ctlJSON(nd, &w4, "status", ids[4])
		if w4.State != "running" || w4.Node == "" {
			return fmt.Errorf("%s on %q", w4.State, w4.Node)
		}
		return nil
	})
	at := time.Now().UTC().Format(time.RFC3339Nano)
	for _, tc := range []struct{ body, want string }{
		{`{"kind":"started","id":"` + w4.ID + `","node":"` + w4.DesiredNode + `","attempt":1,"pid":-1,"exit_code":0,"at":"` + at + `"}`, "pid -1: out of range"},
		{`{"kind":"started","id":"` + strings.Repeat("w", 65) + `","node":"` + w4.DesiredNode + `","attempt":1,"exit_code":0,"at":"` + at + `"}`, "id: 65 bytes, limit 64"},
		{`{"kind":"exited","id":"` + w4.ID + `","node":"a\u001b[2Jb","attempt":1,"exit_code":1,"at":"` + at + `"}`, "node: control character"},
	} {
		if code, ans := post(t, nd, api.PathReport, tc.body); code != http.StatusBadRequest || !strings.Contains(ans, tc.want) {
			t.Errorf("POST %s %.60s...: %d %.200s; want 400 with %q", api.PathReport, tc.body, code, ans, tc.want)
		}
	}
	body := `{"kind":"exited","id":"` + w4.ID + `","node":"` + w4.DesiredNode + `","attempt":1,"exit_code":1,"message":"` +
		strings.Repeat("m", 2048) + `","at":"` + at + `"}`
	if code, ans := post(t, nd, api.PathReport, body); code != http.StatusNoContent {
		t.Fatalf("exit report with a 2 KiB message: %d %.200s; want 204", code, ans)
	}
	c.ctlJSON(nd, &w4, "status", ids[4])
	if len(w4.Message) != 1024 {
		t.Errorf("exit message: %d bytes in the state, want cut to 1024", len(w4.Message))
	}

	// Ended workloads are removed after the retention.
	for _, id := range ids {
		c.ctl(nd, "stop", id)
	}
	c.waitFor(60*time.Second, "ended workloads to be collected", func() error {
		ws, err := nd.client.Workloads(context.Background())
		if err != nil {
			return err
		}
		if len(ws) != 0 {
			return fmt.Errorf("%d workloads left, first %s %s", len(ws), ws[0].ID, ws[0].State)
		}
		return nil
	})
	if _, errs, code := c.ctlRun("status", "-address", nd.socket, ids[0]); code != 3 {
		t.Errorf("status of a collected workload: exit %d %s, want 3 (not found)", code, errs)
	}
}

// TestStartRefusesBadNodeName: a node name goes into the state and every
// list; pclusterd refuses one the leader would not register, at start,
// with one line.
func TestStartRefusesBadNodeName(t *testing.T) {
	for name, want := range map[string]string{"a\x1b[2Jb": "start: node: control character U+001B at byte 1",
		strings.Repeat("n", 300): "start: node: 300 bytes, limit 256"} {
		s, err := cluster.Start(cluster.Config{Name: name})
		if err == nil {
			s.Shutdown()
		}
		if err == nil || err.Error() != want {
			t.Errorf("start as %.20q: got %v, want %q", name, err, want)
		}
	}
}
