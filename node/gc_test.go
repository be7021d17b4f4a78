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

// TestAgentForgetsCollected checks what the agent does when the GC removes
// workloads from the state: their log directories go (they would pile up
// forever), and the process of a lost workload that still runs here is
// stopped (nothing would supervise it any more).
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
	// Its node declared down (a partition), then the retention passes.
	if err := l.apply(scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: "a", Status: scheduler.NodeDown, At: 1}); err != nil {
		t.Fatal(err)
	}
	if err := l.apply(scheduler.CmdWorkloadGC, &scheduler.WorkloadGCCmd{IDs: []string{"wdone", "wlost"}, Before: time.Now().UnixNano()}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, errProc := os.Stat(fmt.Sprintf("/proc/%d/cmdline", pid))
		_, errLogs := os.Stat(filepath.Join(dir, "workloads", "wdone"))
		if os.IsNotExist(errProc) && os.IsNotExist(errLogs) && a.Workloads() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the GC: process %d: %v; wdone logs: %v; agent watches %d; want the process ended, the logs removed, nothing watched",
				pid, errProc, errLogs, a.Workloads())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
