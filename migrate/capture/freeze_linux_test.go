package capture_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// wait bounds each wait for a fixture's output: a failure bound, not a
// measure.
const wait = 20 * time.Second

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the restore clones the saved PID (CAP_CHECKPOINT_RESTORE)")
	}
}

// lastTick returns the number on the last line p printed ("tick N" or
// "N"), once every line that arrived is consumed.
func lastTick(t *testing.T, l *fixture.Lines) int {
	t.Helper()
	l.Drain()
	seen := l.Last()
	if len(seen) == 0 {
		t.Fatal("no line printed")
	}
	n, err := strconv.Atoi(strings.TrimPrefix(seen[len(seen)-1], "tick "))
	if err != nil {
		t.Fatalf("last line %q: %v", seen[len(seen)-1], err)
	}
	return n
}

// TestFreezeBuildStart freezes a counting process with halt into the
// loader of this same process, in memory: the commit builds the copy, the
// original is killed only once Build succeeded, and the copy, started
// after, has the original's PID and prints the next number.
func TestFreezeBuildStart(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "countforever"))
	orig.Expect(t, `^3$`, wait)
	srcTr, dstTr := ptrace.NewTracer(), ptrace.NewTracer()
	defer srcTr.Close()
	defer dstTr.Close()
	out, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	copyOut := fixture.FollowReader(t, out)

	pr, w := io.Pipe()
	type built struct {
		p   *loader.Process
		err error
	}
	builds := make(chan built, 1)
	go func() {
		p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(pr), loader.Options{Stdio: [3]*os.File{nil, pw, pw}})
		pr.CloseWithError(err)
		builds <- built{p, err}
	}()
	var b built
	var origAtCommit bool
	err = capture.Freeze(context.Background(), srcTr, pid, w, true, func() error {
		w.Close()
		b = <-builds
		origAtCommit = syscall.Kill(pid, 0) == nil
		return b.err
	})
	pw.Close()
	if b.p != nil {
		defer func() {
			syscall.Kill(b.p.Pid(), syscall.SIGKILL)
			b.p.Wait()
		}()
	}
	if err != nil {
		t.Fatalf("freeze: %v", err)
	}
	if !origAtCommit {
		t.Errorf("the original was gone before the commit")
	}
	select {
	case <-orig.Done():
	case <-time.After(wait):
		t.Fatalf("the original %d still runs after a halt", pid)
	}
	last := lastTick(t, orig.Lines)
	if err := b.p.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	if b.p.Pid() != pid {
		t.Errorf("the copy runs as pid %d, want the original's %d", b.p.Pid(), pid)
	}
	for want := last + 1; want <= last+3; want++ {
		got, err := copyOut.Next(wait)
		if err != nil || got != strconv.Itoa(want) {
			t.Fatalf("the copy printed %q (%v), want %d", got, err, want)
		}
	}
}

// cancelWriter cancels a context once n bytes were written to it, and
// discards them: a freeze interrupted in the middle of its snapshot.
type cancelWriter struct {
	n      atomic.Int64
	cancel context.CancelCauseFunc
}

func (c *cancelWriter) Write(p []byte) (int, error) {
	if c.n.Add(-int64(len(p))) <= 0 {
		c.cancel(errStop)
	}
	return len(p), nil
}

var errStop = errors.New("agent stops")

// TestFreezeResumes: a freeze cancelled by its context in the middle of
// the snapshot, and one whose commit fails, both leave the original
// running where it was (the next tick follows the last), with an error
// that says so; a halt freeze never kills it then.
func TestFreezeResumes(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "bigheap"), "8")
	orig.Expect(t, `^tick 1$`, wait)
	tr := ptrace.NewTracer()
	defer tr.Close()

	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	cw := &cancelWriter{cancel: cancel}
	cw.n.Store(1 << 20)
	err := capture.Freeze(ctx, tr, pid, cw, true, func() error {
		return errors.New("commit reached after a cancellation")
	})
	if !errors.Is(err, errStop) || !strings.Contains(err.Error(), "resumed") {
		t.Errorf("cancelled freeze: got %v, want the cause and the process resumed", err)
	}
	n := lastTick(t, orig.Lines)
	if got, err := orig.Next(wait); err != nil || got != "tick "+strconv.Itoa(n+1) {
		t.Fatalf("after the cancelled freeze the original printed %q (%v), want tick %d", got, err, n+1)
	}

	refused := errors.New("the target refused")
	err = capture.Freeze(context.Background(), tr, pid, io.Discard, true, func() error { return refused })
	if !errors.Is(err, refused) || !strings.Contains(err.Error(), "process resumed") {
		t.Errorf("failed commit: got %v, want the commit's error and the process resumed", err)
	}
	n = lastTick(t, orig.Lines)
	if got, err := orig.Next(wait); err != nil || got != "tick "+strconv.Itoa(n+1) {
		t.Fatalf("after the failed commit the original printed %q (%v), want tick %d", got, err, n+1)
	}
	// The holder a halt makes at the stop (holdmm_linux.go) is killed
	// and reaped before the process runs again: it has no child.
	if kids, err := procfs.Children(pid); err != nil || len(kids) != 0 {
		t.Errorf("children of %d after the failed freezes: %v (%v), want none", pid, kids, err)
	}
}

// TestHaltLeavesExitStatusToParent freezes with halt a process whose
// parent is the freezing process itself (a cluster agent migrating a
// workload it started): the kill after the commit must leave the exit
// status to the parent's own wait for its child, which must report the
// SIGKILL, not "no child processes".
func TestHaltLeavesExitStatusToParent(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "countforever"))
	p.Expect(t, `^3$`, wait)
	tr := ptrace.NewTracer()
	defer tr.Close()
	if err := capture.Freeze(context.Background(), tr, p.Pid(), io.Discard, true, func() error { return nil }); err != nil {
		t.Fatalf("freeze -halt %d: %v", p.Pid(), err)
	}
	// Killed means exited: a zombie for its parent, or already reaped.
	if b, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid()) + "/stat"); err == nil {
		if i := strings.LastIndexByte(string(b), ')'); i < 0 || i+2 >= len(b) || (b[i+2] != 'Z' && b[i+2] != 'X') {
			t.Errorf("pid %d after the halt freeze returned: %q, want a zombie or gone", p.Pid(), b)
		}
	}
	code, err := p.Wait(wait)
	if err != nil {
		t.Fatalf("the parent's wait for %d: got %v, want its exit status", p.Pid(), err)
	}
	if sig := p.ExitSignal(); code != -1 || sig != syscall.SIGKILL {
		t.Errorf("the parent's wait for %d: got exit %d signal %v, want killed by SIGKILL", p.Pid(), code, sig)
	}
}

// TestHaltHolder: a halt freeze of a single process keeps its memory in a
// holder past the kill (holdmm_linux.go). When Killed runs the original
// is dead while a process traced by us, stopped, holds its memory (its
// VmRSS at least the 8 MiB heap) and no file; once the freeze returned,
// that holder is no longer held and exits.
func TestHaltHolder(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "bigheap"), "8")
	orig.Expect(t, `^tick 1$`, wait)
	tr := ptrace.NewTracer()
	defer tr.Close()
	holder := 0
	killed := func() error {
		if st := procState(pid); st != 0 && st != 'Z' && st != 'X' {
			t.Errorf("pid %d when Killed runs: state %c, want dead", pid, st)
		}
		held := tracedByUs(t)
		if len(held) != 1 {
			t.Errorf("processes traced by us when Killed runs: %v, want one holder", held)
			return nil
		}
		holder = held[0]
		st, err := procfs.Status(holder)
		if err != nil {
			t.Fatalf("holder %d: %v", holder, err)
		}
		var kb int
		fmt.Sscanf(st["VmRSS"], "%d", &kb)
		if kb < 8<<10 {
			t.Errorf("holder %d: VmRSS %d kB, want the heap's 8 MiB at least", holder, kb)
		}
		if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", holder)); err != nil || len(fds) != 0 {
			t.Errorf("holder %d: %d fds open (%v), want none", holder, len(fds), err)
		}
		return nil
	}
	err := capture.FreezeWith(context.Background(), tr, pid, io.Discard, capture.FreezeOptions{Halt: true,
		Commit: func() error { return nil }, Killed: killed, Notice: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatalf("freeze -halt %d: %v", pid, err)
	}
	if holder == 0 {
		return
	}
	// No longer the program's look-alike: its exit dropped the memory
	// (a test counting the program's copies by /proc exe counts it no
	// more).
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", holder)); err == nil {
		t.Errorf("holder %d after the freeze: exe %s, want its memory dropped", holder, exe)
	}
	// Let go to exit, it frees the memory on its own: it must end.
	for deadline := time.Now().Add(wait); ; time.Sleep(time.Millisecond) {
		st := procState(holder)
		if st == 0 || st == 'Z' || st == 'X' {
			break
		}
		if st == 't' || time.Now().After(deadline) {
			t.Fatalf("holder %d after the freeze: state %c, want it exiting", holder, st)
		}
	}
}

// procState returns the state letter of pid, 0 if it is gone.
func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

// tracedByUs lists the live processes a thread of this test process
// traces.
func tracedByUs(t *testing.T) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := procfs.Status(pid)
		if err != nil || st["TracerPid"] == "0" || strings.HasPrefix(st["State"], "Z") {
			continue
		}
		// TracerPid is the tracing thread's id: one of ours?
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%s", os.Getpid(), st["TracerPid"])); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

// TestHaltHolderOurs: when the freezing process is the reaper the
// original's children go to (a subreaper here; an agent running as a PID
// namespace's init), the holder let go after the kill is its child, and
// it must reap it by its PID: nothing is left, not even a zombie.
func TestHaltHolderOurs(t *testing.T) {
	needRoot(t)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("subreaper: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "bigheap"), "8")
	orig.Expect(t, `^tick 1$`, wait)
	tr := ptrace.NewTracer()
	defer tr.Close()
	holder := 0
	killed := func() error {
		if held := tracedByUs(t); len(held) == 1 {
			holder = held[0]
		}
		return nil
	}
	err := capture.FreezeWith(context.Background(), tr, pid, io.Discard, capture.FreezeOptions{Halt: true,
		Commit: func() error { return nil }, Killed: killed, Notice: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatalf("freeze -halt %d: %v", pid, err)
	}
	if holder == 0 {
		t.Fatal("no holder when Killed ran")
	}
	for deadline := time.Now().Add(wait); procState(holder) != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("holder %d, our child, still there (state %c): not reaped", holder, procState(holder))
		}
	}
}
