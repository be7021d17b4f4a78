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
	"time"

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
	parent, child, grandchild    int
	sparent, schild, sgrandchild int // grandchild: with deep only
}

// cowReport asks the processes of cowshare for their area's first byte
// and sum, child first, each as [first, sum]; the grandchild's is zero
// without one.
func cowReport(t *testing.T, l *fixture.Lines, p cowProcs) (c, pr, g [2]string) {
	t.Helper()
	if p.grandchild != 0 {
		syscall.Kill(p.grandchild, syscall.SIGUSR1)
		m := l.Expect(t, fmt.Sprintf(`^grandchild %d first=(\w+) sum=(\d+)$`, p.sgrandchild), waitFor)
		g = [2]string{m[1], m[2]}
	}
	syscall.Kill(p.child, syscall.SIGUSR1)
	syscall.Kill(p.parent, syscall.SIGUSR1)
	m := l.Expect(t, fmt.Sprintf(`^child %d first=(\w+) sum=(\d+)$`, p.schild), waitFor)
	c = [2]string{m[1], m[2]}
	m = l.Expect(t, fmt.Sprintf(`^parent %d first=(\w+) sum=(\d+)$`, p.sparent), waitFor)
	pr = [2]string{m[1], m[2]}
	return c, pr, g
}

// TestCowShared moves a parent and the child it forked after filling 16
// MiB of private anonymous memory that neither wrote since (zdtm's
// cow00): after the thaw the pages are shared again, not two copies (the
// child's proportional set size is about half its resident size, as
// before the freeze), both read the same contents, and a write in the
// child after the thaw does not show in the parent.
func TestCowShared(t *testing.T) { testCowShared(t, "", false) }

// TestCowSharedPIDNamespace: the same, restored with -pidns into a new
// PID namespace, where both keep their saved PIDs.
func TestCowSharedPIDNamespace(t *testing.T) { testCowShared(t, "pidns", false) }

// TestCowSharedWholeNamespace: the same for cowshare run in a PID
// namespace of its own under a shell as its init (a workload's shape:
// pid 1 and the workload under it), frozen whole with -tree on the init
// and restored with -pidns.
func TestCowSharedWholeNamespace(t *testing.T) { testCowShared(t, "whole", false) }

// TestCowSharedVirtualPID: the same, cloned with -virtpid while the
// original runs on and holds both PIDs.
func TestCowSharedVirtualPID(t *testing.T) { testCowShared(t, "virtpid", false) }

// TestCowSharedSubtree: the child shares the pages not as a leaf but as
// the leader of a session and process group of its own, with a
// grandchild in them that shares the same pages: after the thaw all
// three map one copy (each Pss about a third of its Rss).
func TestCowSharedSubtree(t *testing.T) { testCowShared(t, "", true) }

// TestCowSharedSubtreeWholeNamespace: the same in a PID namespace frozen
// whole, a workload's shape.
func TestCowSharedSubtreeWholeNamespace(t *testing.T) { testCowShared(t, "whole", true) }

// TestCowSharedSubtreeVirtualPID: the same cloned with -virtpid.
func TestCowSharedSubtreeVirtualPID(t *testing.T) { testCowShared(t, "virtpid", true) }

func testCowShared(t *testing.T, mode string, deep bool) {
	needRoot(t)
	bin := fixture.Build(t, "cowshare")
	var args []string
	if deep {
		args = []string{"deep"}
	}
	var p *fixture.Proc
	if mode == "whole" {
		unshare, err := exec.LookPath("unshare")
		if err != nil {
			t.Skip("unshare (util-linux) not installed")
		}
		// The shell forks cowshare (it is not the last command): pid 1
		// is the shell, cowshare's parent and child 2 and 3.
		p = fixture.StartGroup(t, unshare, append([]string{"--pid", "--fork", "/bin/sh", "-c", `"$0" "$@"; exit 1`, bin}, args...)...)
	} else {
		p = fixture.StartGroup(t, bin, args...)
	}
	m := p.Lines.Expect(t, `^ready (\d+) (\d+) ?(\d*)$`, waitFor)
	before := cowProcs{sparent: atoi(t, m[1]), schild: atoi(t, m[2])}
	if deep {
		before.sgrandchild = atoi(t, m[3])
	}
	before.parent, before.child, before.grandchild = before.sparent, before.schild, before.sgrandchild
	if deep && mode != "whole" {
		// In a session of their own: out of reach of the fixture's
		// cleanup, which kills the parent's group.
		t.Cleanup(func() {
			syscall.Kill(before.child, syscall.SIGKILL)
			syscall.Kill(before.grandchild, syscall.SIGKILL)
		})
	}
	init := 0
	if mode == "whole" {
		kids, err := fixture.Children(p.Pid())
		if err != nil || len(kids) != 1 {
			t.Fatalf("unshare %d has children %v (%v), want the namespace's init", p.Pid(), kids, err)
		}
		init = kids[0]
		killNSAtCleanup(t, init)
		ns := nsMembers(t, init)
		before.parent, before.child, before.grandchild = ns[before.sparent], ns[before.schild], ns[before.sgrandchild]
		if before.parent == 0 || before.child == 0 || (deep && before.grandchild == 0) {
			t.Fatalf("no pids %d and %d in the namespace of %d: %v", before.sparent, before.schild, init, ns)
		}
	}
	c0, p0, g0 := cowReport(t, p.Lines, before)
	sum0 := c0[1]
	if p0[1] != sum0 || (deep && g0[1] != sum0) {
		t.Fatalf("before: child sum %s, parent sum %s, grandchild sum %s", sum0, p0[1], g0[1])
	}
	// Each process reads first=01 sum=sum0 until the child writes.
	orig := [2]string{"01", sum0}
	var none [2]string
	if deep {
		none = orig
	}
	rss0, pss0 := anonKB(t, before.child)
	t.Logf("before the freeze: child Anonymous %d kB, Pss_Anon %d kB", rss0, pss0)
	// Shared by two, each is charged about half; by three, a third.
	share := 2
	if deep {
		share = 3
		grss0, gpss0 := anonKB(t, before.grandchild)
		t.Logf("before the freeze: grandchild Anonymous %d kB, Pss_Anon %d kB", grss0, gpss0)
	}
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
		others := []int{before.child}
		if deep {
			others = append(others, before.grandchild)
		}
		snap = haltTreeToFile(t, p, others...)
		// Their PIDs free again: the child's parent is gone, so init
		// reaps it (and then the grandchild) in its own time.
		for _, pid := range others {
			waitReaped(t, pid)
		}
	}
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil {
		t.Fatalf("pthaw -debug: %v: %s", err, desc)
	}
	if !regexp.MustCompile(fmt.Sprintf(`(?m)^  pid %d ppid %d .* cow \(forked from its parent, sharing pages\)$`, before.schild, before.sparent)).Match(desc) {
		t.Errorf("pthaw -debug does not show the child as cow:\n%s", desc)
	}
	if deep && !regexp.MustCompile(fmt.Sprintf(`(?m)^  pid %d ppid %d .* cow \(forked from its parent, sharing pages\)$`, before.sgrandchild, before.schild)).Match(desc) {
		t.Errorf("pthaw -debug does not show the grandchild as cow:\n%s", desc)
	}
	after := before
	var th *thawed
	switch mode {
	case "":
		th = thaw(t, "-src", snap)
		root := th.restoredPid(t)
		kids, _ := fixture.Children(root)
		var grandkids []int
		for _, k := range kids {
			g, _ := fixture.Children(k)
			grandkids = append(grandkids, g...)
		}
		killTreeAtCleanup(t, root, append(kids, grandkids...)...)
		expectTree(t, th, before.parent, before.child)
		if deep && fmt.Sprint(grandkids) != fmt.Sprint([]int{before.grandchild}) {
			t.Fatalf("grandchildren after the thaw %v, want %d", grandkids, before.grandchild)
		}
	case "virtpid":
		th = thaw(t, "-src", snap, "-virtpid")
		after.parent = th.virtRoot(t)
		after.child = th.restoredAs(t, before.schild)
		killTreeAtCleanup(t, after.parent, after.child)
		if deep {
			after.grandchild = th.restoredAs(t, before.sgrandchild)
			killTreeAtCleanup(t, after.child, after.grandchild)
		}
	default:
		th = thaw(t, "-src", snap, "-pidns")
		init := th.restoredPid(t)
		killNSAtCleanup(t, init)
		ns := nsMembers(t, init)
		after.parent, after.child, after.grandchild = ns[before.sparent], ns[before.schild], ns[before.sgrandchild]
		if after.parent == 0 || after.child == 0 || (deep && after.grandchild == 0) {
			t.Fatalf("no pids %d and %d in the new namespace of %d: %v", before.sparent, before.schild, init, ns)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	if c, pr, g := cowReport(t, th.out, after); c != orig || pr != orig || g != none {
		t.Errorf("after the thaw: child %v, parent %v, grandchild %v; want %v (grandchild %v)", c, pr, g, orig, none)
	}
	rss, pss := anonKB(t, after.child)
	prss, ppss := anonKB(t, after.parent)
	t.Logf("after the thaw: child Anonymous %d kB, Pss_Anon %d kB; parent Anonymous %d kB, Pss_Anon %d kB", rss, pss, prss, ppss)
	// 16 MiB shared by share processes: each is charged about 16/share
	// MiB of it (the rest of Rss, a few pages, is its own).
	if rss < 16<<10 || 4*share*pss > 5*rss {
		t.Errorf("child Anonymous %d kB, Pss_Anon %d kB: want at least 16384 kB resident, shared by %d (Pss under 5/4 of Rss/%d); before the freeze %d and %d", rss, pss, share, share, rss0, pss0)
	}
	if deep {
		grss, gpss := anonKB(t, after.grandchild)
		t.Logf("after the thaw: grandchild Anonymous %d kB, Pss_Anon %d kB", grss, gpss)
		if grss < 16<<10 || 4*share*gpss > 5*grss {
			t.Errorf("grandchild Anonymous %d kB, Pss_Anon %d kB: want at least 16384 kB resident, shared by %d", grss, gpss, share)
		}
	}
	syscall.Kill(after.child, syscall.SIGUSR2)
	th.out.Expect(t, `^child wrote$`, waitFor)
	if c, pr, g := cowReport(t, th.out, after); c[0] != "ab" || pr != orig || g != none {
		t.Errorf("after the child's write: child %v, parent %v, grandchild %v; want first=ab, %v and %v", c, pr, g, orig, none)
	}
}

// waitReaped waits for pid, not a child of ours, to be reaped by its
// parent: gone from /proc, not only a zombie, so that a restore may take
// its PID.
func waitReaped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d not reaped after %v", pid, waitFor)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
