package debpkg

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	pnode "github.com/pcluster/pcluster/node"
)

// TestCompletionFromCluster completes workload IDs and names and node
// names in bash with the generated pclusterctl script, against a
// `pclusterd -dev`: the script asks `pclusterctl __complete`, through
// $PCLUSTER_ADDR or the -address typed on the command line, and completes
// nothing (silently) when no daemon answers.
func TestCompletionFromCluster(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: pclusterd -dev runs workloads in PID namespaces")
	}
	if _, err := exec.LookPath("bash"); err != nil {
		t.Fatalf("bash not installed: %v", err)
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin, "./cmd/pclusterd", "./cmd/pclusterctl", "./cmd/pfreeze", "./cmd/pthaw")
	build.Dir = "../.."
	if o, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, o)
	}
	tools, err := ReadTools(bin)
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(bin, "pclusterctl.bash")
	if err := os.WriteFile(script, []byte(Completion(tools["pclusterctl"])), 0o644); err != nil {
		t.Fatal(err)
	}

	tmp := t.TempDir()
	sock := filepath.Join(tmp, "dev.sock")
	node := fmt.Sprintf("compdev%d", os.Getpid())
	logf, err := os.Create(filepath.Join(tmp, "dev.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	d := exec.Command(filepath.Join(bin, "pclusterd"), "-dev", "-node", node, "-socket", sock)
	d.Env = append(os.Environ(), "TMPDIR="+tmp)
	d.Stdout, d.Stderr = logf, logf
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { d.Wait(); close(done) }()
	// Its workload cgroups outlive it: removed after it (cleanups run
	// last-in first).
	var devDirs []string // its data directory, gone once it has stopped
	t.Cleanup(func() {
		for _, dir := range devDirs {
			if err := pnode.RemoveCgroups(node, dir); err != nil {
				t.Errorf("dev node: %v", err)
			}
		}
	})
	t.Cleanup(func() {
		d.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			d.Process.Kill()
			<-done
		}
	})
	t.Cleanup(func() { devDirs, _ = filepath.Glob(filepath.Join(tmp, "pclusterd-dev-*")) })

	ctl := func(args ...string) (string, error) {
		c := exec.Command(filepath.Join(bin, "pclusterctl"), args...)
		c.Env = append(os.Environ(), "PCLUSTER_ADDR="+sock)
		o, err := c.CombinedOutput()
		return string(o), err
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for end := time.Now().Add(30 * time.Second); !ok(); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(end) {
				log, _ := os.ReadFile(logf.Name())
				t.Fatalf("waiting for %s: timed out; pclusterd log:\n%s", what, log)
			}
		}
	}
	waitFor("the dev node", func() bool {
		o, err := ctl("node", "status", node)
		return err == nil && strings.Contains(o, "ready")
	})
	// A workload that ends at once: it stays in the state, nothing runs.
	var w struct{ ID, Name, State string }
	o, err := ctl("run", "-json", "-name", "compweb", "-restart", "never", "--", "true")
	if err != nil || json.Unmarshal([]byte(o), &w) != nil || w.ID == "" {
		t.Fatalf("run: %v: %s", err, o)
	}
	waitFor("the workload to end", func() bool {
		o, err := ctl("status", "-json", w.ID)
		return err == nil && json.Unmarshal([]byte(o), &w) == nil && w.State != "pending" && w.State != "running"
	})

	complete := func(addr string, words ...string) (string, string) {
		t.Helper()
		sh := fmt.Sprintf("source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _pclusterctl; printf '%%s\\n' \"${COMPREPLY[@]}\" | sort | tr '\\n' ' '",
			script, strings.Join(words, " "), len(words)-1)
		c := exec.Command("bash", "-c", sh)
		c.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"), "PCLUSTER_ADDR="+addr)
		var stderr strings.Builder
		c.Stderr = &stderr
		out, err := c.Output()
		if err != nil {
			t.Errorf("completing %q: %v: %s", strings.Join(words, " "), err, stderr.String())
		}
		return strings.TrimSpace(string(out)), stderr.String()
	}
	ids := []string{w.ID, "compweb"}
	if w.ID > "compweb" {
		ids = []string{"compweb", w.ID}
	}
	for _, c := range []struct {
		addr  string
		words []string
		want  string
	}{
		{sock, []string{"pclusterctl", "status", "''"}, strings.Join(ids, " ")},
		{sock, []string{"pclusterctl", "logs", "-f", "comp"}, "compweb"},
		{sock, []string{"pclusterctl", "migrate", "-detach", w.ID[:4]}, w.ID},
		{sock, []string{"pclusterctl", "stop", "zz"}, ""},
		{sock, []string{"pclusterctl", "node", "drain", "''"}, node},
		{sock, []string{"pclusterctl", "drain", "-max-parallel", "2", "comp"}, node},
		{sock, []string{"pclusterctl", "node", "eligibility", "-enable", "''"}, node},
		{sock, []string{"pclusterctl", "run", "-node", "''"}, node},
		{sock, []string{"pclusterctl", "migrate", "-node", "''"}, node},
		{sock, []string{"pclusterctl", "status", "-j"}, "-json"},
		// The -address typed wins over $PCLUSTER_ADDR.
		{filepath.Join(tmp, "none.sock"), []string{"pclusterctl", "stop", "-address", sock, "comp"}, "compweb"},
		{filepath.Join(tmp, "none.sock"), []string{"pclusterctl", "node", "status", "-address=" + sock, "''"}, node},
		// As bash splits -address=PATH (COMP_WORDBREAKS has "=").
		{filepath.Join(tmp, "none.sock"), []string{"pclusterctl", "node", "status", "-address", "=", sock, "''"}, node},
		// No daemon there: nothing, and no message.
		{filepath.Join(tmp, "none.sock"), []string{"pclusterctl", "status", "''"}, ""},
		{filepath.Join(tmp, "none.sock"), []string{"pclusterctl", "run", "-node", "''"}, ""},
	} {
		got, stderr := complete(c.addr, c.words...)
		if got != c.want || stderr != "" {
			t.Errorf("completing %q with %s: got %q (stderr %q), want %q", strings.Join(c.words, " "), c.addr, got, stderr, c.want)
		}
	}
}
