package main

import (
	"path/filepath"
	"strconv"
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
