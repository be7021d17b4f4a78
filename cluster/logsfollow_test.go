package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
)

// counterLines counts the complete lines of a log file.
func counterLines(path string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), "\n")
}

// TestLogsFollowAcrossMigration: pclusterctl logs -f, asked on a node that
// never runs the workload, follows a counter from a to b and back to a
// (whose log file then holds both of its visits) and ends by itself when
// the workload is stopped: the counter it printed runs from 0 to the last
// line the process wrote, with no gap and no repeat.
func TestLogsFollowAcrossMigration(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "migcount")
	_, nodes := startLab(t, c, 100+int(c.prefix[4])%50)
	a, b, asker := nodes[0], nodes[1], nodes[2]

	if _, errs, code := c.ctlRun("logs", "-address", asker.socket, "-f", "wdeadbeef00"); code != 3 || strings.Count(errs, "\n") != 1 {
		t.Errorf("logs -f of an unknown workload: exit %d, %q; want 3 and one line", code, errs)
	}

	var w api.Workload
	c.ctlJSON(a, &w, "run", "-node", a.name, "-name", "counter", bin, "20")
	aLog := filepath.Join(a.dataDir, "workloads", w.ID, "stdout.log")
	bLog := filepath.Join(b.dataDir, "workloads", w.ID, "stdout.log")
	c.waitFor(20*time.Second, "the counter to tick", func() error {
		if counterLines(aLog) < 3 {
			return fmt.Errorf("%d lines", counterLines(aLog))
		}
		return nil
	})

	outPath := filepath.Join(c.dir, "follow.out")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var errb strings.Builder
	cmd := exec.Command(c.ctlBin, "logs", "-address", asker.socket, "-f", w.ID)
	cmd.Stdout, cmd.Stderr = out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	reaped := false
	defer func() {
		if !reaped {
			cmd.Process.Kill()
			<-exited
		}
	}()
	growing := func(path string, n int) {
		t.Helper()
		want := counterLines(path) + n
		c.waitFor(20*time.Second, fmt.Sprintf("%d more lines in %s", n, path), func() error {
			if got := counterLines(path); got < want {
				return fmt.Errorf("%d lines", got)
			}
			return nil
		})
	}
	growing(outPath, 3)

	c.ctl(asker, "migrate", "-node", b.name, w.ID)
	growing(bLog, 10)
	c.ctl(asker, "migrate", "-node", a.name, w.ID)
	growing(aLog, 10)
	c.ctl(asker, "stop", w.ID)

	select {
	case err := <-exited:
		reaped = true
		if err != nil {
			t.Fatalf("logs -f: %v (%s), want exit 0 when the workload ends", err, errb.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("logs -f still running 60 s after the stop (stderr %q)", errb.String())
	}
	got, err := os.ReadFile(outPath)
	if err != nil {
		t.Fatal(err)
	}
	lines := checkRun(t, "logs -f", nil, parseCounter(t, "logs -f", string(got)))
	if lines[0].n != 0 {
		t.Errorf("logs -f starts with %+v, want counter 0", lines[0])
	}
	// The events tell the same story, phase by phase, from any node.
	got2, err := w2events(t, b, w.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := "workload-placed workload-started " +
		"migration-planned migration-transferring migration-committed migration-done " +
		"migration-planned migration-transferring migration-committed migration-done " +
		"workload-stop workload-stopped"
	if got2 != want {
		t.Errorf("events of %s:\n got %s\nwant %s", w.ID, got2, want)
	}
	// It printed up to the last line the process wrote, on a.
	final := parseCounter(t, a.name+"'s log", mustRead(t, aLog))
	if last := final[len(final)-1]; lines[len(lines)-1] != last {
		t.Errorf("logs -f ends with %+v, the process's last line is %+v", lines[len(lines)-1], last)
	}
	// a's file holds both visits; b's the middle: together, what was printed.
	middle := parseCounter(t, b.name+"'s log", mustRead(t, bLog))
	if len(middle) < 10 || len(final) < 13 || len(lines) != len(final)+len(middle) {
		t.Errorf("printed %d lines; a's log %d, b's %d: want their sum", len(lines), len(final), len(middle))
	}
}

// w2events returns the types of the events about workload id that nd
// keeps, up to its stop, in order.
func w2events(t *testing.T, nd *testNode, id string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var types []string
	from := uint64(0)
	errDone := errors.New("done")
	err := nd.client.Events(ctx, &from, func(e api.Event) error {
		if e.Workload == id {
			types = append(types, e.Type)
			if e.Type == "workload-stopped" || e.Type == "workload-failed" || e.Type == "workload-exited" {
				return errDone
			}
		}
		return nil
	})
	if !errors.Is(err, errDone) {
		return strings.Join(types, " "), fmt.Errorf("events of %s from %s: %v", id, nd.name, err)
	}
	return strings.Join(types, " "), nil
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
