package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestZombieLeaderLive moves a process whose main thread ended with
// pthread_exit (fixture zombieleader) by pfreeze -live -halt to a
// listening pthaw: as with a plain -halt (TestZombieLeader) the main
// thread is a zombie again with the same PID and TIDs, the ticks go on,
// and the last thread's exit(7) is pthaw's status.
func TestZombieLeaderLive(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "zombieleader"))
	m := p.Lines.Expect(t, `^ready (\d+),(\d+)$`, waitFor)
	pid := p.Pid()
	sock := filepath.Join(t.TempDir(), "thaw.sock")
	th := thaw(t, "-src", "unix:"+sock)
	th.listening(t)
	freeze(t, "-pid", strconv.Itoa(pid), "-halt", "-live", "-dest", "unix:"+sock)
	<-p.Exited()
	checkZombieLeader(t, th, pid, pid, []int{atoi(t, m[1]), atoi(t, m[2])}, false)
}

// TestZombieLeaderVirtualPID restores the same process with -virtpid while
// the original still runs (its PID and TIDs taken): the copy's main
// thread is a zombie, its two threads run on under new TIDs, and the last
// thread's exit(7) is pthaw's status.
func TestZombieLeaderVirtualPID(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "zombieleader"))
	p.Lines.Expect(t, `^ready (\d+),(\d+)$`, waitFor)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-dest", snap)
	th := thaw(t, "-src", snap, "-virtpid")
	pid := th.restoredPid(t)
	if pid == p.Pid() {
		t.Fatalf("restored pid %d is the original's, which still runs", pid)
	}
	tasks, err := fixture.Tasks(pid)
	if err != nil || len(tasks) != 3 {
		t.Fatalf("restored tasks %v (%v), want 3", tasks, err)
	}
	checkZombieLeader(t, th, pid, pid, slices.DeleteFunc(tasks, func(tid int) bool { return tid == pid }), false)
}

// checkZombieLeader checks a restored zombieleader: ticks go on, main
// thread pid a zombie, threads the running ones; then SIGUSR1 makes the
// last thread exit(7): pthaw's status, or in a tree the copy ends.
func checkZombieLeader(t *testing.T, th *thawed, want, pid int, threads []int, tree bool) {
	t.Helper()
	if got := th.restoredPid(t); got != want {
		t.Fatalf("restored pid %d, want %d", got, want)
	}
	th.out.Expect(t, `^tick \d+$`, waitFor)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := statusField(t, pid, pid, "State"); !strings.HasPrefix(got, "Z") {
		t.Errorf("restored main thread state %q, want Z (zombie)", got)
	}
	tasks, err := fixture.Tasks(pid)
	all := append([]int{pid}, threads...)
	slices.Sort(all)
	if err != nil || fmt.Sprint(tasks) != fmt.Sprint(all) {
		t.Errorf("restored tasks %v (%v), want %v", tasks, err, all)
	}
	for _, tid := range threads {
		if got := statusField(t, pid, tid, "State"); strings.HasPrefix(got, "Z") {
			t.Errorf("restored thread %d state %q, want running", tid, got)
		}
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	th.out.Expect(t, `^bye$`, waitFor)
	if !tree {
		if code := th.exit(t); code != 7 {
			t.Errorf("pthaw exit code %d, want the process's 7", code)
		}
		return
	}
	// The shell waits for the PID it forked, which the copy does not
	// have: its status is not zombieleader's. The copy ends.
	if err := fixture.WaitExit(pid, waitFor); err != nil {
		t.Errorf("restored zombieleader after its exit(7): %v", err)
	}
}

// TestZombieLeaderTreeLive: zombieleader as the child of a shell that
// exits with its status, moved with -tree -halt -live to a listening
// pthaw (every member's memory pre-copied, zombieleader's through a thread
// that runs). On this one host the live receiver builds while the
// original's PIDs are still taken, so the members get new ones (pthaw says
// so): the child's main thread is a zombie again beside its two threads,
// the ticks go on, and it ends at its exit(7).
func TestZombieLeaderTreeLive(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, "/bin/sh", "-c", `"$0"; exit $?`, fixture.Build(t, "zombieleader"))
	p.Lines.Expect(t, `^ready (\d+),(\d+)$`, waitFor)
	sh := p.Pid()
	zl := childOf(t, sh)
	sock := filepath.Join(t.TempDir(), "thaw.sock")
	th := thaw(t, "-src", "unix:"+sock)
	th.listening(t)
	freeze(t, "-pid", strconv.Itoa(sh), "-tree", "-halt", "-live", "-dest", "unix:"+sock)
	if _, err := p.Wait(waitFor); err != nil {
		t.Fatalf("after pfreeze -tree -halt -live: %v", err)
	}
	waitReaped(t, zl)
	root := th.restoredPid(t)
	child := childOf(t, root)
	killTreeAtCleanup(t, root, child)
	tasks, err := fixture.Tasks(child)
	if err != nil || len(tasks) != 3 {
		t.Fatalf("restored zombieleader %d has tasks %v (%v), want 3", child, tasks, err)
	}
	checkZombieLeader(t, th, root, child, slices.DeleteFunc(tasks, func(tid int) bool { return tid == child }), true)
}
