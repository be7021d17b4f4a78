package capture_test

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
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
