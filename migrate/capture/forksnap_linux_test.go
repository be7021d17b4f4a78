package capture_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// slowSink keeps what is written to it, at rate bytes per second at
// most so that the copy lasts while the process writes, and notes for each write
// whether pid was stopped (in a tracing stop) when it came. fail, if
// positive, fails the write that would pass that many bytes.
type slowSink struct {
	pid          int
	rate         int // bytes per second
	fail         int
	buf          bytes.Buffer
	whileRunning int // bytes written while pid was not in a tracing stop
}

var errSinkFull = errors.New("sink full")

func (s *slowSink) Write(p []byte) (int, error) {
	if s.fail > 0 && s.buf.Len()+len(p) > s.fail {
		return 0, errSinkFull
	}
	if st, err := os.ReadFile("/proc/" + strconv.Itoa(s.pid) + "/stat"); err == nil {
		if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) && st[i+2] != 't' {
			s.whileRunning += len(p)
		}
	}
	time.Sleep(time.Duration(len(p)) * time.Second / time.Duration(s.rate))
	return s.buf.Write(p)
}

// dirtierCheck asks dirtier (whose output l follows) to check every page
// and returns the longest stop it saw, in µs; a mismatch fails the test.
func dirtierCheck(t *testing.T, pid int, l *fixture.Lines, what string) int {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	got, err := l.Match(`^check .*`, wait)
	if err != nil {
		t.Fatalf("%s: check: %v", what, err)
	}
	if !strings.HasPrefix(got[0], "check ok ") {
		t.Fatalf("%s: %s", what, got[0])
	}
	_, gap, _ := strings.Cut(got[0], "maxgap_us=")
	us, _ := strconv.Atoi(gap)
	return us
}

// noChildren fails if pid has a child (the snapshot's, alive or a zombie:
// procfs.Children lists zombies, fixture.Children does not).
func noChildren(t *testing.T, pid int) {
	t.Helper()
	if kids, err := procfs.Children(pid); err != nil || len(kids) != 0 {
		t.Errorf("pid %d has children %v (%v) after the checkpoint, want none", pid, kids, err)
	}
}

// tracer returns the TracerPid of pid.
func tracerOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// TestCOWCheckpointExact checkpoints, leaving it running, the dirtier
// fixture (64 MiB, two threads writing 16 MiB/s, one write in 64 freeing
// the page) into a sink slow enough (64 MiB/s) that the copy takes about
// a second:
// most of the snapshot must be written while the process runs, the
// process must be left with no child and no tracer, and the copy
// restored from the snapshot (the original killed) must find every page
// as its ledger says: the memory at the stop, not pages read while the
// writers changed them.
func TestCOWCheckpointExact(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "dirtier"), "64", "2", "16384")
	orig.Expect(t, `^ready$`, wait)
	tr := ptrace.NewTracer()
	defer tr.Close()
	sink := &slowSink{pid: pid, rate: 64 << 20}
	var st capture.COWStats
	err := capture.FreezeWith(context.Background(), tr, pid, sink, capture.FreezeOptions{COWStats: &st,
		Notice: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatalf("checkpoint: %v", err)
	}
	t.Logf("stop %v (fork %v), copy %v, %d bytes read during the stop; %d of %d bytes written while the process ran",
		st.Stop, st.Fork, st.Copy, st.StopBytes, sink.whileRunning, sink.buf.Len())
	if st.Fallback {
		t.Fatalf("no snapshot child: stopped for the whole copy")
	}
	if sink.whileRunning < sink.buf.Len()/2 {
		t.Errorf("%d of %d bytes of the snapshot written while the process ran, want most", sink.whileRunning, sink.buf.Len())
	}
	noChildren(t, pid)
	if tp := tracerOf(t, pid); tp != "0" {
		t.Errorf("pid %d is traced by %s after the checkpoint", pid, tp)
	}
	dirtierCheck(t, pid, orig.Lines, "the original after the checkpoint")

	restoreChecked(t, pid, orig, &sink.buf)
}

// restoreChecked kills the original pid (under the shell orig), restores
// its snapshot from buf under its PID and has it check its pages twice.
func restoreChecked(t *testing.T, pid int, orig *fixture.Proc, buf *bytes.Buffer) {
	t.Helper()
	syscall.Kill(pid, syscall.SIGKILL)
	select {
	case <-orig.Exited():
	case <-time.After(wait):
		t.Fatalf("the original %d does not end", pid)
	}
	copyOut, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer copyOut.Close()
	lines := fixture.FollowReader(t, copyOut)
	dstTr := ptrace.NewTracer()
	defer dstTr.Close()
	p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(buf), loader.Options{Stdio: [3]*os.File{nil, pw, pw}})
	pw.Close()
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	defer func() {
		syscall.Kill(p.Pid(), syscall.SIGKILL)
		p.Wait()
	}()
	if err := p.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	for i := 0; i < 2; i++ {
		dirtierCheck(t, p.Pid(), lines, "the restored checkpoint")
	}
}

// TestCOWCheckpointUnforkedAreas checkpoints forkmarks, whose writer
// rewrites pages of a shared anonymous area and of areas marked
// MADV_DONTFORK and MADV_WIPEONFORK (which a fork shares, leaves out or
// zeroes) during a copy slowed to about two seconds: those are read
// during the stop, and the copy restored finds every page as its ledger
// says. Without a MADV_DONTFORK area ("nodontfork") the wiped area is
// found by its pages (the process's smaps is not read in the stop).
func TestCOWCheckpointUnforkedAreas(t *testing.T) {
	needRoot(t)
	for _, tc := range []struct {
		args []string
		stop uint64 // bytes read in the stop, at least
	}{{[]string{"4096"}, 12 << 20}, {[]string{"4096", "nodontfork"}, 8 << 20}} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "forkmarks"), tc.args...)
			orig.Expect(t, `^ready$`, wait)
			tr := ptrace.NewTracer()
			defer tr.Close()
			sink := &slowSink{pid: pid, rate: 8 << 20}
			var st capture.COWStats
			if err := capture.FreezeWith(context.Background(), tr, pid, sink, capture.FreezeOptions{COWStats: &st}); err != nil {
				t.Fatalf("checkpoint: %v", err)
			}
			t.Logf("stop %v, copy %v, %d bytes read during the stop", st.Stop, st.Copy, st.StopBytes)
			if st.Fallback || st.StopBytes < tc.stop {
				t.Errorf("fallback %v, %d bytes read during the stop; want a fork, and the areas it does not copy (%d bytes) read in the stop", st.Fallback, st.StopBytes, tc.stop)
			}
			noChildren(t, pid)
			dirtierCheck(t, pid, orig.Lines, "the original after the checkpoint")
			restoreChecked(t, pid, orig, &sink.buf)
		})
	}
}

// TestCOWCheckpointFailsRunning: a checkpoint whose sink fails in the
// middle of the copy, while the process runs, returns the sink's error
// and leaves the process running untraced, with no child, its pages
// intact (the writers go on: they park for the check).
func TestCOWCheckpointFailsRunning(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "dirtier"), "64", "2", "16384")
	orig.Expect(t, `^ready$`, wait)
	tr := ptrace.NewTracer()
	defer tr.Close()
	sink := &slowSink{pid: pid, rate: 256 << 20, fail: 32 << 20}
	var st capture.COWStats
	err := capture.FreezeWith(context.Background(), tr, pid, sink, capture.FreezeOptions{COWStats: &st})
	if !errors.Is(err, errSinkFull) {
		t.Fatalf("checkpoint into a failing sink: got %v, want the sink's error", err)
	}
	if st.Fallback || sink.whileRunning == 0 {
		t.Fatalf("the sink failed before the process ran again (fallback %v, %d bytes while it ran)", st.Fallback, sink.whileRunning)
	}
	noChildren(t, pid)
	if tp := tracerOf(t, pid); tp != "0" {
		t.Errorf("pid %d is traced by %s after the failed checkpoint", pid, tp)
	}
	dirtierCheck(t, pid, orig.Lines, "the original after the failed checkpoint")
}

// TestCOWCheckpointTree checkpoints, leaving it running, a tree: a shell
// waiting for dirtier (as TestCOWCheckpointExact's, into a slow sink).
// Both members are forked and run on during the copy, neither is left
// with an extra child; the tree restored from the snapshot (the
// originals killed) has dirtier find every page as its ledger says.
func TestCOWCheckpointTree(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "dirtier"), "64", "2", "16384")
	orig.Expect(t, `^ready$`, wait)
	shell := orig.Pid()
	tr := ptrace.NewTracer()
	defer tr.Close()
	sink := &slowSink{pid: pid, rate: 64 << 20}
	var st capture.COWStats
	err := capture.FreezeWith(context.Background(), tr, shell, sink, capture.FreezeOptions{Tree: true, COWStats: &st,
		Notice: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatalf("checkpoint of the tree: %v", err)
	}
	t.Logf("stop %v (fork %v), copy %v; %d of %d bytes written while the tree ran", st.Stop, st.Fork, st.Copy, sink.whileRunning, sink.buf.Len())
	if st.Fallback || sink.whileRunning < sink.buf.Len()/2 {
		t.Errorf("fallback %v, %d of %d bytes written while the tree ran: want a snapshot, most of it copied while it runs", st.Fallback, sink.whileRunning, sink.buf.Len())
	}
	if kids, err := procfs.Children(shell); err != nil || len(kids) != 1 || kids[0] != pid {
		t.Errorf("the shell %d has children %v (%v) after the checkpoint, want only dirtier %d", shell, kids, err, pid)
	}
	noChildren(t, pid)
	dirtierCheck(t, pid, orig.Lines, "the original after the checkpoint")

	syscall.Kill(pid, syscall.SIGKILL)
	orig.Wait(wait)
	copyOut, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer copyOut.Close()
	lines := fixture.FollowReader(t, copyOut)
	dstTr := ptrace.NewTracer()
	defer dstTr.Close()
	p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(&sink.buf), loader.Options{Stdio: [3]*os.File{nil, pw, pw}})
	pw.Close()
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	started := false
	defer func() {
		if !started {
			p.Abort()
			return
		}
		syscall.Kill(pid, syscall.SIGKILL)
		syscall.Kill(p.Pid(), syscall.SIGKILL)
		p.Wait()
	}()
	if err := p.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	started = true
	dirtierCheck(t, pid, lines, "the restored tree's dirtier")
}

// TestCOWCheckpointSeccomp: the seccomp filters of the process decide.
// noclone's filter kills it for a clone: the checkpoint must not fork it
// (it says so and copies while it is stopped), and the process counts on.
// The seccomp fixture's filters refuse other calls only: it is forked.
func TestCOWCheckpointSeccomp(t *testing.T) {
	needRoot(t)
	tr := ptrace.NewTracer()
	defer tr.Close()

	p := fixture.Start(t, fixture.Build(t, "noclone"))
	p.Expect(t, `^3$`, wait)
	var st capture.COWStats
	var notices []string
	err := capture.FreezeWith(context.Background(), tr, p.Pid(), &bytes.Buffer{}, capture.FreezeOptions{COWStats: &st,
		Notice: func(s string) { notices = append(notices, s) }})
	if err != nil {
		t.Fatalf("checkpoint of noclone: %v", err)
	}
	if !st.Fallback || len(notices) != 1 || !strings.Contains(notices[0], "do not allow clone") {
		t.Errorf("checkpoint of noclone: fallback %v, notices %q; want stop-and-copy, said once", st.Fallback, notices)
	}
	n := lastTick(t, p.Lines)
	if got, err := p.Next(wait); err != nil || got != strconv.Itoa(n+1) {
		t.Fatalf("noclone after the checkpoint printed %q (%v), want %d", got, err, n+1)
	}

	s := fixture.Start(t, fixture.Build(t, "seccomp"))
	s.Expect(t, `^ready$`, wait)
	st = capture.COWStats{}
	if err := capture.FreezeWith(context.Background(), tr, s.Pid(), &bytes.Buffer{}, capture.FreezeOptions{COWStats: &st}); err != nil {
		t.Fatalf("checkpoint of seccomp: %v", err)
	}
	if st.Fallback {
		t.Errorf("checkpoint of seccomp: stopped for the whole copy, want a fork (its filters allow clone)")
	}
	noChildren(t, s.Pid())
}

// TestCOWCheckpointPIDNamespace checkpoints nsinit's PID namespace (its
// init and the worker, as an agent's checkpoint does) leaving it running:
// both are forked, neither keeps a child of ours, the namespace counts
// on; then, the original gone, the snapshot restored into a new PID
// namespace goes on counting from where it was with the worker's ids and
// heap.
func TestCOWCheckpointPIDNamespace(t *testing.T) {
	needRoot(t)
	srcTr, dstTr := ptrace.NewTracer(), ptrace.NewTracer()
	defer srcTr.Close()
	defer dstTr.Close()
	orig := fixture.Start(t, fixture.Build(t, "nsinit"))
	r := nsinitReport(t, orig.Lines, 1, "")
	kids, err := fixture.Children(orig.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("nsinit %d has children %v (%v), want its namespace's init", orig.Pid(), kids, err)
	}
	init := kids[0]
	t.Cleanup(func() {
		syscall.Kill(init, syscall.SIGKILL)
		orig.Wait(wait)
	})
	workers, err := fixture.Children(init)
	if err != nil || len(workers) != 1 {
		t.Fatalf("init %d has children %v (%v), want the worker", init, workers, err)
	}
	var buf bytes.Buffer
	var st capture.COWStats
	if err := capture.FreezeWith(context.Background(), srcTr, init, &buf, capture.FreezeOptions{Tree: true, COWStats: &st,
		Notice: func(s string) { t.Log(s) }}); err != nil {
		t.Fatalf("checkpoint of the namespace: %v", err)
	}
	t.Logf("stop %v (fork %v), copy %v", st.Stop, st.Fork, st.Copy)
	if st.Fallback {
		t.Errorf("the namespace was stopped for the whole copy, want its members forked")
	}
	if kids, err := procfs.Children(init); err != nil || len(kids) != 1 || kids[0] != workers[0] {
		t.Errorf("init %d has children %v (%v) after the checkpoint, want only the worker %d", init, kids, err, workers[0])
	}
	noChildren(t, workers[0])
	// It counts on; the last count before it is killed is where the copy
	// must go on from, at most.
	last := nsinitReport(t, orig.Lines, r.Count+1, r.Sum).Count
	syscall.Kill(init, syscall.SIGKILL)
	orig.Wait(wait)
	for {
		line, err := orig.Lines.Next(wait)
		if err != nil {
			break
		}
		if rr, ok := fixture.ParseNsinit(line); ok {
			last = rr.Count
		}
	}
	out, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	copyOut := fixture.FollowReader(t, out)
	p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(&buf), loader.Options{PIDNamespace: true, Stdio: [3]*os.File{nil, pw, pw}})
	pw.Close()
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	started := false
	defer func() {
		if !started {
			p.Abort()
			return
		}
		syscall.Kill(p.WaitPid(), syscall.SIGKILL)
		p.Wait()
	}()
	if err := p.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	started = true
	line, err := copyOut.Next(wait)
	if err != nil {
		t.Fatalf("the restored namespace: %v", err)
	}
	rr, ok := fixture.ParseNsinit(line)
	if !ok || rr.IDs != worker || rr.Sum != r.Sum || rr.Count < r.Count+1 || rr.Count > last {
		t.Fatalf("the restored namespace printed %q, want a count in %d..%d with ids %+v and sum %s", line, r.Count+1, last, worker, r.Sum)
	}
	nsinitReport(t, copyOut, rr.Count+1, r.Sum)
}
