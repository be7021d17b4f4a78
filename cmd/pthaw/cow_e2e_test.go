package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

// anonKB returns the anonymous resident and proportional set sizes of
// pid in KiB (Anonymous, Pss_Anon)
// from /proc/PID/smaps_rollup.
func anonKB(t *testing.T, pid int) (rss, pss int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	field := func(key string) int {
		m := regexp.MustCompile(`(?m)^` + key + `:\s+(\d+) kB$`).FindSubmatch(b)
		if m == nil {
			t.Fatalf("no %s in the smaps_rollup of %d", key, pid)
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	return field("Anonymous"), field("Pss_Anon")
}

// cowProcs are cowshare's two processes: their PIDs here, for signals
// and /proc, and the PIDs they print (their own namespace's, or the
// saved ones a -virtpid restore shows them).
type cowProcs struct {
	parent, child   int
	sparent, schild int
}

// cowReport asks both processes of cowshare for their area's first byte
// and sum, child first.
func cowReport(t *testing.T, l *fixture.Lines, p cowProcs) (cfirst, csum, pfirst, psum string) {
	t.Helper()
	syscall.Kill(p.child, syscall.SIGUSR1)
	syscall.Kill(p.parent, syscall.SIGUSR1)
	c := l.Expect(t, fmt.Sprintf(`^child %d first=(\w+) sum=(\d+)$`, p.schild), waitFor)
	pr := l.Expect(t, fmt.Sprintf(`^parent %d first=(\w+) sum=(\d+)$`, p.sparent), waitFor)
	return c[1], c[2], pr[1], pr[2]
}

// TestCowShared moves a parent and the child it forked after filling 16
// MiB of private anonymous memory that neither wrote since (zdtm's
// cow00): after the thaw the pages are shared again, not two copies (the
// child's proportional set size is about half its resident size, as
// before the freeze), both read the same contents, and a write in the
// child after the thaw does not show in the parent.
func TestCowShared(t *testing.T) { testCowShared(t, "") }

// TestCowSharedPIDNamespace: the same, restored with -pidns into a new
// PID namespace, where both keep their saved PIDs.
func TestCowSharedPIDNamespace(t *testing.T) { testCowShared(t, "pidns") }

// TestCowSharedWholeNamespace: the same for cowshare run in a PID
// namespace of its own under a shell as its init (a workload's shape:
// pid 1 and the workload under it), frozen whole with -tree on the init
// and restored with -pidns.
func TestCowSharedWholeNamespace(t *testing.T) { testCowShared(t, "whole") }

// TestCowSharedVirtualPID: the same, cloned with -virtpid while the
// original runs on and holds both PIDs.
func TestCowSharedVirtualPID(t *testing.T) { testCowShared(t, "virtpid") }

func testCowShared(t *testing.T, mode string) {
	needRoot(t)
	bin := fixture.Build(t, "cowshare")
	var p *fixture.Proc
	if mode == "whole" {
		unshare, err := exec.LookPath("unshare")
		if err != nil {
			t.Skip("unshare (util-linux) not installed")
		}
		// The shell forks cowshare (it is not the last command): pid 1
		// is the shell, cowshare's parent and child 2 and 3.
		p = fixture.StartGroup(t, unshare, "--pid", "--fork", "/bin/sh", "-c", `"$0"; exit 1`, bin)
	} else {
		p = fixture.StartGroup(t, bin)
	}
	m := p.Lines.Expect(t, `^ready (\d+) (\d+)$`, waitFor)
	before := cowProcs{sparent: atoi(t, m[1]), schild: atoi(t, m[2])}
	before.parent, before.child = before.sparent, before.schild
	init := 0
	if mode == "whole" {
		kids, err := fixture.Children(p.Pid())
		if err != nil || len(kids) != 1 {
			t.Fatalf("unshare %d has children %v (%v), want the namespace's init", p.Pid(), kids, err)
		}
		init = kids[0]
		killNSAtCleanup(t, init)
		ns := nsMembers(t, init)
		before.parent, before.child = ns[before.sparent], ns[before.schild]
		if before.parent == 0 || before.child == 0 {
			t.Fatalf("no pids %d and %d in the namespace of %d: %v", before.sparent, before.schild, init, ns)
		}
	}
	_, sum0, _, psum0 := cowReport(t, p.Lines, before)
	if sum0 != psum0 {
		t.Fatalf("before: child sum %s, parent sum %s", sum0, psum0)
	}
	rss0, pss0 := anonKB(t, before.child)
	t.Logf("before the freeze: child Anonymous %d kB, Pss_Anon %d kB", rss0, pss0)
	var snap string
	switch mode {
	case "whole":
		snap = filepath.Join(t.TempDir(), "snap")
		freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-dest", snap)
		if _, err := p.Wait(waitFor); err != nil {
			t.Fatalf("after pfreeze -tree -halt: %v", err)
		}
	case "virtpid":
		snap = filepath.Join(t.TempDir(), "snap")
		freeze(t, "-pid", strconv.Itoa(before.parent), "-tree", "-dest", snap) // no -halt: the originals keep their PIDs
	default:
		snap = haltTreeToFile(t, p, before.child)
	}
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil {
		t.Fatalf("pthaw -debug: %v: %s", err, desc)
	}
	if !regexp.MustCompile(fmt.Sprintf(`(?m)^  pid %d ppid %d .* cow \(forked from its parent, sharing pages\)$`, before.schild, before.sparent)).Match(desc) {
		t.Errorf("pthaw -debug does not show the child as cow:\n%s", desc)
	}
	after := before
	var th *thawed
	switch mode {
	case "":
		th = thaw(t, "-src", snap)
		killTreeAtCleanup(t, before.parent, before.child)
		expectTree(t, th, before.parent, before.child)
	case "virtpid":
		th = thaw(t, "-src", snap, "-virtpid")
		after.parent = th.virtRoot(t)
		after.child = th.restoredAs(t, before.schild)
		killTreeAtCleanup(t, after.parent, after.child)
	default:
		th = thaw(t, "-src", snap, "-pidns")
		init := th.restoredPid(t)
		killNSAtCleanup(t, init)
		ns := nsMembers(t, init)
		after.parent, after.child = ns[before.sparent], ns[before.schild]
		if after.parent == 0 || after.child == 0 {
			t.Fatalf("no pids %d and %d in the new namespace of %d: %v", before.sparent, before.schild, init, ns)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	cfirst, csum, pfirst, psum := cowReport(t, th.out, after)
	if cfirst != "01" || pfirst != "01" || csum != sum0 || psum != sum0 {
		t.Errorf("after the thaw: child first=%s sum=%s, parent first=%s sum=%s; want first=01 sum=%s", cfirst, csum, pfirst, psum, sum0)
	}
	rss, pss := anonKB(t, after.child)
	prss, ppss := anonKB(t, after.parent)
	t.Logf("after the thaw: child Anonymous %d kB, Pss_Anon %d kB; parent Anonymous %d kB, Pss_Anon %d kB", rss, pss, prss, ppss)
	// 16 MiB shared by two: each is charged about 8 MiB of it.
	if rss < 16<<10 || 4*pss > 3*rss {
		t.Errorf("child Anonymous %d kB, Pss_Anon %d kB: want at least 16384 kB resident, mostly shared (Pss under 3/4 of Rss); before the freeze %d and %d", rss, pss, rss0, pss0)
	}
	syscall.Kill(after.child, syscall.SIGUSR2)
	th.out.Expect(t, `^child wrote$`, waitFor)
	cfirst, _, pfirst, psum = cowReport(t, th.out, after)
	if cfirst != "ab" || pfirst != "01" || psum != sum0 {
		t.Errorf("after the child's write: child first=%s, parent first=%s sum=%s; want ab, 01 and %s", cfirst, pfirst, psum, sum0)
	}
}
