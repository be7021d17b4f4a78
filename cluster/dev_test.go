package cluster_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// TestDevMode runs `pclusterd -dev`, the single-node cluster with nothing
// to set up, drives it with pclusterctl, reads /metrics from its socket,
// and checks that it removes its temporary data dir on SIGTERM.
func TestDevMode(t *testing.T) {
	c := newTestCluster(t)
	tmp := t.TempDir()
	sock := filepath.Join(tmp, "dev.sock")
	logf, _ := os.Create(filepath.Join(tmp, "dev.log"))
	defer logf.Close()
	cmd := exec.Command(c.daemon, "-dev", "-node", c.prefix+"-dev", "-socket", sock)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	nd := &testNode{name: c.prefix + "-dev", socket: sock}
	nd.client, _ = api.New(sock, nil)
	c.waitFor(15*time.Second, "dev cluster leader", func() error { return converged(nd, 1) })

	var w api.Workload
	c.ctlJSON(nd, &w, "run", "-restart", "on-failure", "-max-restarts", "2", "--", "sh", "-c", "echo run; exit 3")
	w = waitState(c, nd, w.ID, "failed", 15*time.Second)
	if w.Restarts != 2 || w.ExitCode != 3 {
		t.Errorf("on-failure with 2 restarts: got restarts %d exit %d, want 2 and 3", w.Restarts, w.ExitCode)
	}
	if out := c.ctl(nd, "logs", w.ID); out != "run\nrun\nrun\n" {
		t.Errorf("logs across attempts: got %q", out)
	}
	if out := c.ctl(nd, "node", "status", nd.name); !strings.Contains(out, "ready") {
		t.Errorf("node status: %q", out)
	}
	// The command pclusterd -dev suggests works as printed.
	logb, _ := os.ReadFile(logf.Name())
	m := regexp.MustCompile(`(?m)dev cluster up; .*; try: pclusterctl (.*)$`).FindSubmatch(logb)
	if m == nil {
		t.Fatalf("pclusterd -dev suggests no pclusterctl command:\n%s", logb)
	}
	if out, errs, code := c.ctlRun(strings.Fields(string(m[1]))...); code != 0 || !strings.Contains(out, nd.name) {
		t.Errorf("the suggested pclusterctl %s: exit %d, %q%s, want 0 and the node", m[1], code, out, errs)
	}

	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://pclusterd/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{"pcluster_members 1", "pcluster_leader_changes_total", `pcluster_workloads{state="failed"} 1`, "pcluster_raft_apply_seconds_count"} {
		if !strings.Contains(string(body), m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}

	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v %v, want 0600", st.Mode(), err)
	}
	dirs, _ := filepath.Glob(filepath.Join(tmp, "pclusterd-dev-*"))
	if len(dirs) != 1 {
		t.Fatalf("dev data dirs: %v, want one", dirs)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("pclusterd -dev did not stop on SIGTERM")
	}
	if _, err := os.Stat(dirs[0]); !os.IsNotExist(err) {
		t.Errorf("dev data dir %s left behind", dirs[0])
	}
}
