package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestZombieLeaderTree: zombieleader (its main thread ended with
// pthread_exit, two threads run on) as a member of a tree, under a shell
// that waits for it and exits with its status, is moved with -tree -halt:
// after the thaw its main thread is a zombie again with the same PID and
// TIDs, the ticks go on, and once the last thread calls exit(7) the shell
// exits 7, and so does pthaw.
func TestZombieLeaderTree(t *testing.T) { testZombieLeaderTree(t, false) }

// TestZombieLeaderWholeNamespace: the same with the shell as pid 1 of a
// PID namespace of its own (a workload's shape), frozen whole and
// restored with -pidns: the zombie main thread is pid 2 there again.
func TestZombieLeaderWholeNamespace(t *testing.T) { testZombieLeaderTree(t, true) }

func testZombieLeaderTree(t *testing.T, whole bool) {
	needRoot(t)
	bin := fixture.Build(t, "zombieleader")
	// The shell forks zombieleader (it is not the last command).
	args := []string{"/bin/sh", "-c", `"$0"; exit $?`, bin}
	if whole {
		unshare, err := exec.LookPath("unshare")
		if err != nil {
			t.Skip("unshare (util-linux) not installed")
		}
		args = append([]string{unshare, "--pid", "--fork"}, args...)
	}
	p := fixture.StartGroup(t, args[0], args[1:]...)
	m := p.Lines.Expect(t, `^ready (\d+),(\d+)$`, waitFor)
	sh := p.Pid()
	if whole {
		kids, err := fixture.Children(p.Pid())
		if err != nil || len(kids) != 1 {
			t.Fatalf("unshare %d has children %v (%v), want the namespace's init", p.Pid(), kids, err)
		}
		sh = kids[0]
		killNSAtCleanup(t, sh)
	}
	zl := childOf(t, sh)
	// The TIDs as the process sees them (its namespace's).
	tids := func(pid int) []int {
		if whole {
			return nsTIDs(t, pid)
		}
		tasks, err := fixture.Tasks(pid)
		if err != nil {
			t.Fatalf("pid %d: %v", pid, err)
		}
		return tasks
	}
	saved := tids(zl)
	want := []int{atoi(t, m[1]), atoi(t, m[2])}
	if whole {
		want = append(want, 2)
	} else {
		want = append(want, zl)
	}
	slices.Sort(want)
	if !slices.Equal(saved, want) {
		t.Fatalf("zombieleader's TIDs %v, want %v", saved, want)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	var th *thawed
	if whole {
		freeze(t, "-pid", strconv.Itoa(sh), "-tree", "-halt", "-dest", snap)
		if _, err := p.Wait(waitFor); err != nil {
			t.Fatalf("after pfreeze -tree -halt: %v", err)
		}
	} else {
		snap = haltTreeToFile(t, p, zl)
		waitReaped(t, zl)
	}
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil || !strings.Contains(string(desc), "had exited (pthread_exit)") {
		t.Errorf("pthaw -debug (%v) does not show the exited main thread:\n%s", err, desc)
	}
	if whole {
		th = thaw(t, "-src", snap, "-pidns")
		init := th.restoredPid(t)
		killNSAtCleanup(t, init)
		zl = nsMembers(t, init)[2]
	} else {
		th = thaw(t, "-src", snap)
		killTreeAtCleanup(t, sh, zl)
		if got := th.restoredPid(t); got != sh {
			t.Errorf("restored root pid %d, want %d", got, sh)
		}
		if got := childOf(t, sh); got != zl {
			t.Errorf("restored child %d, want %d", got, zl)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	th.out.Expect(t, `^tick \d+$`, waitFor)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := statusField(t, zl, zl, "State"); !strings.HasPrefix(got, "Z") {
		t.Errorf("restored main thread state %q, want Z (zombie)", got)
	}
	if got := tids(zl); !slices.Equal(got, saved) {
		t.Errorf("restored TIDs %v, want %v", got, saved)
	}
	if err := syscall.Kill(zl, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	th.out.Expect(t, `^bye$`, waitFor)
	if code := th.exit(t); code != 7 {
		t.Errorf("pthaw exit code %d, want the shell's 7, zombieleader's", code)
	}
}

// childOf returns the only child of pid, zombieleader, which
// fixture.Children does not list: its main thread is a zombie.
func childOf(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			kids = append(kids, atoi(t, e.Name()))
		}
	}
	if len(kids) != 1 {
		t.Fatalf("pid %d has children %v, want zombieleader", pid, kids)
	}
	return kids[0]
}
