package node

import (
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// TestProcCPU checks the fallback reading of a process's CPU time against
// a process that burns CPU: it must grow, and an idle one's must not
// much.
func TestProcCPU(t *testing.T) {
	busy := exec.Command("sh", "-c", "while :; do :; done")
	if err := busy.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { busy.Process.Kill(); busy.Wait() }()
	idle := exec.Command("sleep", "30")
	if err := idle.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { idle.Process.Kill(); idle.Wait() }()
	b0, err := procCPU(busy.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	i0, _ := procCPU(idle.Process.Pid)
	// Wait on the condition, not a clock: the busy one gets CPU sooner or later.
	var b1 time.Duration
	for b1 < b0+50*time.Millisecond {
		time.Sleep(20 * time.Millisecond)
		if b1, err = procCPU(busy.Process.Pid); err != nil {
			t.Fatal(err)
		}
	}
	i1, _ := procCPU(idle.Process.Pid)
	if i1-i0 >= b1-b0 {
		t.Fatalf("idle process used %v, busy one %v: want the busy one more", i1-i0, b1-b0)
	}
	if rss, err := procRSS(busy.Process.Pid); err != nil || rss == 0 {
		t.Fatalf("rss %d, %v: want > 0", rss, err)
	}
}

// TestTreeUse: without cgroups a workload is its tree: a shell whose
// child burns CPU counts the child's time.
func TestTreeUse(t *testing.T) {
	sh := exec.Command("sh", "-c", "sh -c 'while :; do :; done' & wait")
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, c := range procChildren(sh.Process.Pid) {
			syscall.Kill(c, syscall.SIGKILL)
		}
		sh.Process.Kill()
		sh.Wait()
	}()
	own, _ := procCPU(sh.Process.Pid)
	var tree time.Duration
	for tree < own+50*time.Millisecond {
		time.Sleep(20 * time.Millisecond)
		var err error
		if tree, _, err = treeUse(sh.Process.Pid); err != nil {
			t.Fatal(err)
		}
	}
	if own2, _ := procCPU(sh.Process.Pid); own2 >= tree {
		t.Fatalf("the shell alone used %v, its tree %v: want the child's time counted", own2, tree)
	}
}
