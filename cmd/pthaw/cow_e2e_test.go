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

// cowReport asks both processes of cowshare for their area's first byte
// and sum, child first.
func cowReport(t *testing.T, l *fixture.Lines, parent, child int) (cfirst, csum, pfirst, psum string) {
	t.Helper()
	syscall.Kill(child, syscall.SIGUSR1)
	syscall.Kill(parent, syscall.SIGUSR1)
	c := l.Expect(t, fmt.Sprintf(`^child %d first=(\w+) sum=(\d+)$`, child), waitFor)
	p := l.Expect(t, fmt.Sprintf(`^parent %d first=(\w+) sum=(\d+)$`, parent), waitFor)
	return c[1], c[2], p[1], p[2]
}

// TestCowShared moves a parent and the child it forked after filling 16
// MiB of private anonymous memory that neither wrote since (zdtm's
// cow00): after the thaw the pages are shared again, not two copies (the
// child's proportional set size is about half its resident size, as
// before the freeze), both read the same contents, and a write in the
// child after the thaw does not show in the parent.
func TestCowShared(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "cowshare"))
	m := p.Lines.Expect(t, `^ready (\d+) (\d+)$`, waitFor)
	parent, child := atoi(t, m[1]), atoi(t, m[2])
	_, sum0, _, psum0 := cowReport(t, p.Lines, parent, child)
	if sum0 != psum0 {
		t.Fatalf("before: child sum %s, parent sum %s", sum0, psum0)
	}
	rss0, pss0 := anonKB(t, child)
	t.Logf("before the freeze: child Anonymous %d kB, Pss_Anon %d kB", rss0, pss0)
	snap := haltTreeToFile(t, p, child)
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil {
		t.Fatalf("pthaw -debug: %v: %s", err, desc)
	}
	if !regexp.MustCompile(fmt.Sprintf(`(?m)^  pid %d ppid %d .* cow \(forked from its parent, sharing pages\)$`, child, parent)).Match(desc) {
		t.Errorf("pthaw -debug does not show the child as cow:\n%s", desc)
	}
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, parent, child)
	expectTree(t, th, parent, child)
	rss, pss := anonKB(t, child)
	prss, ppss := anonKB(t, parent)
	t.Logf("after the thaw: child Anonymous %d kB, Pss_Anon %d kB; parent Anonymous %d kB, Pss_Anon %d kB", rss, pss, prss, ppss)
	// 16 MiB shared by two: each is charged about 8 MiB of it.
	if rss < 16<<10 || 4*pss > 3*rss {
		t.Errorf("child Anonymous %d kB, Pss_Anon %d kB: want at least 16384 kB resident, mostly shared (Pss under 3/4 of Rss); before the freeze %d and %d", rss, pss, rss0, pss0)
	}
	cfirst, csum, pfirst, psum := cowReport(t, th.out, parent, child)
	if cfirst != "01" || pfirst != "01" || csum != sum0 || psum != sum0 {
		t.Errorf("after the thaw: child first=%s sum=%s, parent first=%s sum=%s; want first=01 sum=%s", cfirst, csum, pfirst, psum, sum0)
	}
	syscall.Kill(child, syscall.SIGUSR2)
	th.out.Expect(t, `^child wrote$`, waitFor)
	cfirst, _, pfirst, psum = cowReport(t, th.out, parent, child)
	if cfirst != "ab" || pfirst != "01" || psum != sum0 {
		t.Errorf("after the child's write: child first=%s, parent first=%s sum=%s; want ab, 01 and %s", cfirst, pfirst, psum, sum0)
	}
}
