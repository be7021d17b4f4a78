package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestIncrementalCLI: pfreeze -parent writes a snapshot of a counter
// against an earlier one (compressed and encrypted), the second with
// -halt; pthaw restores it from the chain, finding the parent by the path
// recorded or by -parent, and the counter carries on. A parent replaced
// by another snapshot is refused with one line and nothing restored; so
// are -parent with -live and a -dest that is the parent.
func TestIncrementalCLI(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "countforever")
	p := fixture.Start(t, bin, "5")
	p.Lines.Expect(t, `^3$`, waitFor)
	dir, keyfile := keyDir(t)
	snaps := t.TempDir()
	parent, child, other := filepath.Join(snaps, "parent"), filepath.Join(snaps, "child"), filepath.Join(snaps, "other")
	pid := strconv.Itoa(p.Pid())
	enc := []string{"-encrypt", "aes-gcm:" + keyfile}
	freeze(t, append([]string{"-pid", pid, "-dest", parent, "-compress", "snappy"}, enc...)...)
	freeze(t, append([]string{"-pid", pid, "-dest", other}, enc...)...)
	for _, bad := range [][]string{
		{"-pid", pid, "-dest", "unix:" + filepath.Join(snaps, "sock"), "-halt", "-live", "-parent", parent},
		{"-pid", pid, "-dest", parent, "-parent", parent},
		{"-pid", pid, "-dest", child, "-parent", filepath.Join(snaps, "none")},
	} {
		if msg := freezeFails(t, bad...); !strings.Contains(msg, "parent") {
			t.Errorf("pfreeze %v: %q, want one line about the parent", bad, msg)
		}
	}
	last := atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
	freeze(t, append([]string{"-pid", pid, "-dest", child, "-parent", parent, "-compress", "zstd", "-halt"}, enc...)...)
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatalf("pid %s still running after pfreeze -halt", pid)
	}
	// A counter's memory is mostly the same from one snapshot to the
	// next (its metadata is not: it is in every snapshot).
	if ps, cs := size(t, parent), size(t, child); cs >= ps {
		t.Errorf("child of %d bytes, parent %d: want it smaller", cs, ps)
	}

	// The parent swapped for another snapshot: refused, one line.
	if err := os.Rename(parent, parent+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(other, parent); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(binDir, "pthaw"), "-src", child, "-keydir", dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatal("pthaw restored a snapshot from a wrong parent")
	}
	if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.Contains(msg, "wrong parent snapshot") || !strings.Contains(msg, parent) {
		t.Errorf("stderr %q, want one line naming %s the wrong parent", msg, parent)
	}
	if pids := processesOf(bin); len(pids) > 0 {
		t.Errorf("processes %v left behind", pids)
	}

	// The right one, given by -parent under its new name.
	th := thaw(t, "-src", child, "-keydir", dir, "-parent", other, "-parent", parent+".moved")
	first := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1])
	if first <= last {
		t.Fatalf("restored process printed %d, want more than %d", first, last)
	}
	th.out.Expect(t, `^`+strconv.Itoa(first+1)+`$`, waitFor)
}

// freezeFails runs pfreeze with args, which must fail with one line, and
// returns that line.
func freezeFails(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatalf("pfreeze %v succeeded", args)
	}
	msg := stderr.String()
	if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pfreeze: ") {
		t.Errorf("pfreeze %v: stderr %q, want one line", args, msg)
	}
	return msg
}

func size(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestIncrementalTree: pfreeze -tree -parent of a parent and its two
// workers, which count in one MAP_SHARED|MAP_ANONYMOUS page, against a
// snapshot of the tree taken earlier: restored from the chain, the three
// carry on with their PIDs and the parent's check shared == w1 + w2
// keeps holding.
func TestIncrementalTree(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "forkserver"))
	m := p.Lines.Expect(t, `^workers (\d+) (\d+)$`, waitFor)
	w1, w2 := atoi(t, m[1]), atoi(t, m[2])
	forkTick(t, p.Lines)
	root := p.Pid()
	snaps := t.TempDir()
	parent, child := filepath.Join(snaps, "parent"), filepath.Join(snaps, "child")
	freeze(t, "-pid", strconv.Itoa(root), "-tree", "-dest", parent)
	var s0, a0, b0 int
	for i := 0; i < 3; i++ {
		_, s0, a0, b0 = forkTick(t, p.Lines)
	}
	freeze(t, "-pid", strconv.Itoa(root), "-tree", "-halt", "-parent", parent, "-dest", child)
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatalf("pid %d still running after pfreeze -tree -halt", root)
	}
	for _, pid := range []int{w1, w2} {
		waitReaped(t, pid) // its group's id is the root's PID
	}
	if ps, cs := size(t, parent), size(t, child); cs >= ps {
		t.Errorf("child of %d bytes, parent %d: want it smaller", cs, ps)
	}
	th := thaw(t, "-src", child)
	killTreeAtCleanup(t, root, w1, w2)
	var s, a, b int
	for i := 0; i < 5; i++ {
		_, s, a, b = forkTick(t, th.out)
	}
	if s <= s0 || a <= a0 || b <= b0 {
		t.Fatalf("after thaw shared=%d w1=%d w2=%d, want each above shared=%d w1=%d w2=%d", s, a, b, s0, a0, b0)
	}
	expectTree(t, th, root, w1, w2)
}

// TestIncrementalCow: a parent and the child sharing 16 MiB copy-on-write
// (cowshare) are checkpointed whole (the child's shared pages only in its
// parent's records), then the child writes its first page and the two are
// frozen again, incrementally, with -halt: restored from the chain, the
// child reads its write, the parent its own contents.
func TestIncrementalCow(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "cowshare"))
	m := p.Lines.Expect(t, `^ready (\d+) (\d+) ?(\d*)$`, waitFor)
	parent, child := atoi(t, m[1]), atoi(t, m[2])
	procs := cowProcs{parent: parent, child: child, sparent: parent, schild: child}
	_, p0, _ := cowReport(t, p.Lines, procs)
	snaps := t.TempDir()
	full, inc := filepath.Join(snaps, "full"), filepath.Join(snaps, "inc")
	freeze(t, "-pid", strconv.Itoa(parent), "-tree", "-dest", full)
	syscall.Kill(child, syscall.SIGUSR2)
	p.Lines.Expect(t, `^child wrote$`, waitFor)
	freeze(t, "-pid", strconv.Itoa(parent), "-tree", "-halt", "-parent", full, "-dest", inc)
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatalf("pid %d still running after pfreeze -tree -halt", parent)
	}
	// Reaped, not only a zombie: until then it keeps its process
	// group's id, the parent's PID, which the restore takes again.
	waitReaped(t, child)
	// The child, which shared its pages with its parent in the full
	// snapshot (cow: its own records had none of them) and no longer
	// does, is saved in full; the parent refers to the full snapshot.
	t.Logf("full snapshot %d bytes, incremental %d", size(t, full), size(t, inc))
	th := thaw(t, "-src", inc)
	killTreeAtCleanup(t, parent, child)
	expectTree(t, th, parent, child)
	c, pr, _ := cowReport(t, th.out, procs)
	if c[0] != "ab" || pr != p0 {
		t.Errorf("restored from the chain: child first=%s, parent %v; want ab and %v", c[0], pr, p0)
	}
}
