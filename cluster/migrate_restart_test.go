package cluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/node"
)

// TestMigrateSourceRestartMidStream SIGKILLs the source's pclusterd while
// it streams a 32 MiB workload over a slowed link. The dead agent's
// tracer is gone, but the original's cgroup, frozen for the stop window,
// still holds it: alive and frozen (checked before the restart;
// cgroup v2 is required). The target's build fails with the stream. The
// restarted agent finds the migration transferring from its node but not
// its own, and aborts it: the migration ends within a minute (not at the
// leader's 5-minute timeout, during which the workload could not move);
// the agent thaws the original, which runs on the source, adopted, with
// its PID, the only copy. The stop window is a stop-and-copy's
// (-migrate-live=false): a live migration's is its last round, too short
// to land in; TestMigrateLiveSourceRestart kills the source in its rounds.
func TestMigrateSourceRestartMidStream(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "bigheap")
	lab, nodes := startLabWith(t, c, 100+int(c.prefix[5])%50, "-migrate-live=false")
	src, dst := nodes[0], nodes[1]
	w, logPath := runTicking(c, src, bin, "32")
	pid := w.PID
	lab.Hosts[0].Shape(t, "20mbit")
	done := make(chan int, 1)
	go func() {
		_, _, code := c.ctlRun("migrate", "-address", dst.socket, "-node", dst.name, w.ID)
		done <- code
	}()
	c.waitFor(30*time.Second, "the target to build", func() error {
		for _, st := range childrenOf(dst.cmd.Process.Pid) {
			if st == 't' {
				return nil
			}
		}
		return fmt.Errorf("no traced child of %s", dst.name)
	})
	c.kill(src)
	base, err := node.CgroupBase(src.name, src.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	events := filepath.Join(base, fmt.Sprintf("%s.%d", w.ID, w.Attempt), "cgroup.events")
	if b, err := os.ReadFile(events); err != nil || !strings.Contains(string(b), "frozen 1") {
		t.Fatalf("original's cgroup once its agent died: %q (%v), want frozen 1", b, err)
	}
	if st := procState(pid); st == 'X' || st == 'Z' {
		t.Fatalf("original pid %d once its agent died: state %c, want alive (frozen)", pid, st)
	}
	c.launch(src)
	lab.Hosts[0].Shape(t, "")
	c.waitFor(60*time.Second, "the migration to end", func() error {
		ms, err := dst.client.Migrations(context.Background(), true)
		if err != nil {
			return err
		}
		for _, m := range ms {
			if m.Workload == w.ID && m.State != "aborted" {
				return fmt.Errorf("migration %s: %s", m.ID, m.State)
			}
		}
		return nil
	})
	select {
	case code := <-done:
		if code != 1 {
			t.Errorf("migrate exit %d, want 1 (aborted)", code)
		}
	case <-time.After(time.Minute):
		t.Fatal("migrate did not end")
	}
	c.waitFor(30*time.Second, "the workload running on the source", func() error {
		got, err := workloadOn(dst, w.ID)
		if err != nil || got.State != "running" || got.Node != src.name || got.PID != pid {
			return fmt.Errorf("%s on %s pid %d (%v), want running on %s pid %d", got.State, got.Node, got.PID, err, src.name, pid)
		}
		return nil
	})
	if cs := copies(bin); len(cs) != 1 || cs[0] != pid {
		t.Fatalf("copies %v, want exactly [%d]", cs, pid)
	}
	at := lastTick(logPath)
	c.waitFor(30*time.Second, "the original to tick on", func() error {
		if n := lastTick(logPath); n < at+2 {
			return fmt.Errorf("last tick %d", n)
		}
		return nil
	})
	c.ctl(dst, "stop", w.ID)
	c.waitFor(30*time.Second, "the stop", func() error {
		if cs := copies(bin); len(cs) > 0 {
			return fmt.Errorf("copies %v", cs)
		}
		return nil
	})
}

// TestMigrateLiveSourceRestart SIGKILLs the source's pclusterd during a
// live migration's pre-copy (a 32 MiB workload over a slowed link): the
// workload was never stopped, so with its agent dead it runs on, its
// cgroup not frozen, ticking; the restarted agent aborts the migration,
// and the workload stays on the source, adopted, with its PID, the only
// copy.
func TestMigrateLiveSourceRestart(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "bigheap")
	lab, nodes := startLab(t, c, 100+int(c.prefix[5])%50)
	src, dst := nodes[0], nodes[1]
	w, logPath := runTicking(c, src, bin, "32")
	pid := w.PID
	lab.Hosts[0].Shape(t, "20mbit")
	done := make(chan int, 1)
	go func() {
		_, _, code := c.ctlRun("migrate", "-address", dst.socket, "-node", dst.name, w.ID)
		done <- code
	}()
	// The target has the transfer (the source dialled it, its rounds
	// flow: 32 MiB take some 13 s at 20 Mbit/s) and has built nothing.
	c.waitFor(30*time.Second, "the pre-copy to flow", func() error {
		b, _ := os.ReadFile(dst.logPath)
		if !strings.Contains(string(b), "incoming migration") {
			return fmt.Errorf("no incoming migration on %s", dst.name)
		}
		return nil
	})
	c.kill(src)
	base, err := node.CgroupBase(src.name, src.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	events := filepath.Join(base, fmt.Sprintf("%s.%d", w.ID, w.Attempt), "cgroup.events")
	if b, err := os.ReadFile(events); err != nil || !strings.Contains(string(b), "frozen 0") {
		t.Fatalf("original's cgroup once its agent died in the pre-copy: %q (%v), want frozen 0", b, err)
	}
	at := lastTick(logPath)
	c.waitFor(30*time.Second, "the original to tick on without its agent", func() error {
		if n := lastTick(logPath); n < at+2 {
			return fmt.Errorf("last tick %d", n)
		}
		return nil
	})
	c.launch(src)
	lab.Hosts[0].Shape(t, "")
	c.waitFor(60*time.Second, "the migration to end", func() error {
		ms, err := dst.client.Migrations(context.Background(), true)
		if err != nil {
			return err
		}
		for _, m := range ms {
			if m.Workload == w.ID && m.State != "aborted" {
				return fmt.Errorf("migration %s: %s", m.ID, m.State)
			}
		}
		return nil
	})
	select {
	case code := <-done:
		if code != 1 {
			t.Errorf("migrate exit %d, want 1 (aborted)", code)
		}
	case <-time.After(time.Minute):
		t.Fatal("migrate did not end")
	}
	c.waitFor(30*time.Second, "the workload running on the source", func() error {
		got, err := workloadOn(dst, w.ID)
		if err != nil || got.State != "running" || got.Node != src.name || got.PID != pid {
			return fmt.Errorf("%s on %s pid %d (%v), want running on %s pid %d", got.State, got.Node, got.PID, err, src.name, pid)
		}
		return nil
	})
	if cs := copies(bin); len(cs) != 1 || cs[0] != pid {
		t.Fatalf("copies %v, want exactly [%d]", cs, pid)
	}
	c.ctl(dst, "stop", w.ID)
	c.waitFor(30*time.Second, "the stop", func() error {
		if cs := copies(bin); len(cs) > 0 {
			return fmt.Errorf("copies %v", cs)
		}
		return nil
	})
}
