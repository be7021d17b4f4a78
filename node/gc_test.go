package node

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// TestAgentForgetsCollected checks what the agent does around the GC. An
// ended workload's log directory goes with its record (logs would pile up
// forever). A lost workload's process, the only copy of the workload,
// survives a GC pass and a partition of any length: the GC never removes a
// lost workload, and when the node comes back its agent reports the
// process and the workload is running again with the same PID. Only once
// an operator stopped it (while lost) and the GC removed it does the agent
// stop the process.
func TestAgentForgetsCollected(t *testing.T) {
	l := &fakeLeader{fsm: scheduler.NewFSM()}
	dir := t.TempDir()
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	for id, args := range map[string][]string{"wdone": {"-c", "echo hi"}, "wlost": {"-c", "sleep 300"}} {
		if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{
			ID: id, Command: "sh", Args: args, UID: -1, GID: -1, DesiredNode: "a"}}); err != nil {
			t.Fatal(err)
		}
	}
	a, _ := runAgent(t, l, dir)
	l.wait(t, "wdone", scheduler.StateExited)
	pid := l.wait(t, "wlost", scheduler.StateRunning).PID
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	ticks, err := startTicks(pid)
	if err != nil {
		t.Fatal(err)
	}
	waitFor := func(what string, cond func() error) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			err := cond()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %v", what, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// Its node declared down (a partition), then a retention passes, and
	// the GC lists both: only the ended one goes, with its logs.
	if err := l.apply(scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: "a", Status: scheduler.NodeDown, At: 1}); err != nil {
		t.Fatal(err)
	}
	if err := l.apply(scheduler.CmdWorkloadGC, &scheduler.WorkloadGCCmd{IDs: []string{"wdone", "wlost"}, Before: time.Now().UnixNano()}); err != nil {
		t.Fatal(err)
	}
	waitFor("wdone's logs removed after the GC", func() error {
		_, err := os.Stat(filepath.Join(dir, "workloads", "wdone"))
		if !os.IsNotExist(err) {
			return fmt.Errorf("stat: %v", err)
		}
		return nil
	})
	// The node comes back: the process was never touched, and the
	// workload is running again with it.
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}, At: 2}); err != nil {
		t.Fatal(err)
	}
	if w := l.wait(t, "wlost", scheduler.StateRunning); w.PID != pid {
		t.Fatalf("wlost after its node came back: PID %d, want %d (the same process)", w.PID, pid)
	}
	if got, err := startTicks(pid); err != nil || got != ticks {
		t.Fatalf("process %d after the node came back: start ticks %d (%v), want %d: the lost workload's process was stopped", pid, got, err, ticks)
	}

	// Lost again, stopped by an operator, collected: now the agent stops
	// the process (the operator's decision) and forgets it.
	if err := l.apply(scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: "a", Status: scheduler.NodeDown, At: 3}); err != nil {
		t.Fatal(err)
	}
	if err := l.apply(scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "wlost", At: 4}); err != nil {
		t.Fatal(err)
	}
	if err := l.apply(scheduler.CmdWorkloadGC, &scheduler.WorkloadGCCmd{IDs: []string{"wlost"}, Before: 4}); err != nil {
		t.Fatal(err)
	}
	waitFor("after the stop and the GC: the process ended, nothing watched", func() error {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/cmdline", pid)); !os.IsNotExist(err) {
			return fmt.Errorf("process %d: %v", pid, err)
		}
		if n := a.Workloads(); n != 0 {
			return fmt.Errorf("agent watches %d", n)
		}
		return nil
	})
}
