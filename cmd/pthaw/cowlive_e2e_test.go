package main

import (
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestCowSharedLive moves cowshare (a parent and the child it forked
// after filling 16 MiB that neither wrote since, as TestCowShared) with
// -tree -halt -live to a listening pthaw. The copy-on-write sharing is
// kept as without -live (docs/pfreeze.md, "Live migration"): the pages
// the two still share at the stop are one frame again after the move
// (the child's proportional set size about half its resident size), not
// two copies from each member's own pre-copy. And the memory is exact:
// both read the contents they had, and a write in the child after the
// move does not show in the parent. (On this one host the live receiver
// builds while the original's PIDs are taken: the copies have new ones,
// which they print.)
func TestCowSharedLive(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "cowshare"))
	m := p.Lines.Expect(t, `^ready (\d+) (\d+)$`, waitFor)
	before := cowProcs{sparent: atoi(t, m[1]), schild: atoi(t, m[2])}
	before.parent, before.child = before.sparent, before.schild
	c0, p0, _ := cowReport(t, p.Lines, before)
	if p0 != c0 {
		t.Fatalf("before: child %v, parent %v", c0, p0)
	}
	orig := [2]string{"01", c0[1]}
	rss0, pss0 := anonKB(t, before.child)

	sock := filepath.Join(t.TempDir(), "thaw.sock")
	th := thaw(t, "-src", "unix:"+sock)
	th.listening(t)
	freeze(t, "-pid", strconv.Itoa(before.parent), "-tree", "-halt", "-live", "-dest", "unix:"+sock)
	if _, err := p.Wait(waitFor); err != nil {
		t.Fatalf("after pfreeze -tree -halt -live: %v", err)
	}
	waitReaped(t, before.child)
	root := th.restoredPid(t)
	kids, err := fixture.Children(root)
	if err != nil || len(kids) != 1 {
		t.Fatalf("restored parent %d has children %v (%v), want one", root, kids, err)
	}
	killTreeAtCleanup(t, root, kids[0])
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	after := cowProcs{parent: root, child: kids[0], sparent: root, schild: kids[0]}
	if c, pr, _ := cowReport(t, th.out, after); c != orig || pr != orig {
		t.Errorf("after the move: child %v, parent %v; want both %v", c, pr, orig)
	}
	rss, pss := anonKB(t, after.child)
	t.Logf("child Anonymous/Pss_Anon: %d/%d kB before the freeze, %d/%d kB after the live move", rss0, pss0, rss, pss)
	if rss < 16<<10 || 4*2*pss > 5*rss {
		t.Errorf("child Anonymous %d kB, Pss_Anon %d kB after the move: want at least the 16384 kB area, shared with the parent (Pss under 5/4 of Rss/2); before the freeze %d and %d", rss, pss, rss0, pss0)
	}
	syscall.Kill(after.child, syscall.SIGUSR2)
	th.out.Expect(t, `^child wrote$`, waitFor)
	if c, pr, _ := cowReport(t, th.out, after); c[0] != "ab" || pr != orig {
		t.Errorf("after the child's write: child %v, parent %v; want first=ab and %v", c, pr, orig)
	}
}

// TestCowSharedLiveWholeNamespace moves cowshare under a shell as pid 1
// of its own PID namespace, frozen whole with -live, to a listening
// pthaw -pidns, which makes the tree as the rounds begin (docs/pfreeze.md,
// "Live migration"). The child, sharing its 16 MiB with its parent at the
// stop, is made again then, forked from its parent once the parent is
// built: the pages stay shared (Pss about half of Rss), the tree made
// early is kept (pthaw does not say it was rebuilt), and the memory is
// exact. The Subtree variant has a grandchild leading a session and
// group with the child, all three sharing.
func TestCowSharedLiveWholeNamespace(t *testing.T) { testCowSharedLiveNS(t, false) }

func TestCowSharedLiveSubtreeWholeNamespace(t *testing.T) { testCowSharedLiveNS(t, true) }

func testCowSharedLiveNS(t *testing.T, deep bool) {
	needRoot(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare (util-linux) not installed")
	}
	bin := fixture.Build(t, "cowshare")
	var args []string
	share := 2
	if deep {
		args, share = []string{"deep"}, 3
	}
	p := fixture.StartGroup(t, unshare, append([]string{"--pid", "--fork", "/bin/sh", "-c", `"$0" "$@"; exit 1`, bin}, args...)...)
	m := p.Lines.Expect(t, `^ready (\d+) (\d+) ?(\d*)$`, waitFor)
	before := cowProcs{sparent: atoi(t, m[1]), schild: atoi(t, m[2])}
	if deep {
		before.sgrandchild = atoi(t, m[3])
	}
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v), want the namespace's init", p.Pid(), kids, err)
	}
	init := kids[0]
	killNSAtCleanup(t, init)
	ns := nsMembers(t, init)
	before.parent, before.child, before.grandchild = ns[before.sparent], ns[before.schild], ns[before.sgrandchild]
	if before.parent == 0 || before.child == 0 || (deep && before.grandchild == 0) {
		t.Fatalf("no pids %d and %d in the namespace of %d: %v", before.sparent, before.schild, init, ns)
	}
	c0, p0, g0 := cowReport(t, p.Lines, before)
	if p0 != c0 || (deep && g0 != c0) {
		t.Fatalf("before: child %v, parent %v, grandchild %v", c0, p0, g0)
	}
	orig := [2]string{"01", c0[1]}
	var none [2]string
	if deep {
		none = orig
	}
	rss0, pss0 := anonKB(t, before.child)

	sock := filepath.Join(t.TempDir(), "thaw.sock")
	th := thaw(t, "-src", "unix:"+sock, "-pidns")
	th.listening(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-live", "-dest", "unix:"+sock)
	if _, err := p.Wait(waitFor); err != nil {
		t.Fatalf("after pfreeze -tree -halt -live: %v", err)
	}
	rinit := th.restoredPid(t)
	killNSAtCleanup(t, rinit)
	ns = nsMembers(t, rinit)
	after := before
	after.parent, after.child, after.grandchild = ns[before.sparent], ns[before.schild], ns[before.sgrandchild]
	if after.parent == 0 || after.child == 0 || (deep && after.grandchild == 0) {
		t.Fatalf("no pids %d and %d in the new namespace of %d: %v", before.sparent, before.schild, rinit, ns)
	}
	if strings.Contains(th.stderr.String(), "rebuilt at the stop") {
		t.Errorf("pthaw rebuilt the tree at the stop, want the tree made early kept: %s", th.stderr.String())
	}
	if c, pr, g := cowReport(t, th.out, after); c != orig || pr != orig || g != none {
		t.Errorf("after the move: child %v, parent %v, grandchild %v; want %v (grandchild %v)", c, pr, g, orig, none)
	}
	rss, pss := anonKB(t, after.child)
	t.Logf("child Anonymous/Pss_Anon: %d/%d kB before the freeze, %d/%d kB after the live move", rss0, pss0, rss, pss)
	if rss < 16<<10 || 4*share*pss > 5*rss {
		t.Errorf("child Anonymous %d kB, Pss_Anon %d kB after the move: want at least the 16384 kB area, shared by %d (Pss under 5/4 of Rss/%d)", rss, pss, share, share)
	}
	if deep {
		grss, gpss := anonKB(t, after.grandchild)
		t.Logf("grandchild Anonymous/Pss_Anon: %d/%d kB after the live move", grss, gpss)
		if grss < 16<<10 || 4*share*gpss > 5*grss {
			t.Errorf("grandchild Anonymous %d kB, Pss_Anon %d kB after the move: want at least 16384 kB, shared by %d", grss, gpss, share)
		}
	}
	syscall.Kill(after.child, syscall.SIGUSR2)
	th.out.Expect(t, `^child wrote$`, waitFor)
	if c, pr, g := cowReport(t, th.out, after); c[0] != "ab" || pr != orig || g != none {
		t.Errorf("after the child's write: child %v, parent %v, grandchild %v; want first=ab, %v and %v", c, pr, g, orig, none)
	}
}
