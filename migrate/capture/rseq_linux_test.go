package capture

import (
	"context"
	"io"
	"strconv"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestInjectRseqAborted checkpoints (three times) a thread that spins
// inside an rseq critical section (fixture rseqspin): stopped there, it
// was preempted, and the kernel aborts the section when it returns to user
// mode, as after a bare ptrace stop. Injected calls return it to user mode
// outside the section first (at the syscall site, at the sigreturn
// sequence), where the kernel, finding no section, forgets it: put back
// into it afterwards, the thread spun on with its section disarmed,
// never aborted again.
func TestInjectRseqAborted(t *testing.T) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	p := fixture.Start(t, fixture.Build(t, "rseqspin"))
	if l, err := p.Next(waitFor); err != nil || l != "ready" {
		t.Skipf("no rseq area registered by glibc: %q %v", l, err)
	}
	count := func() int {
		t.Helper()
		if err := p.WriteLine("count"); err != nil {
			t.Fatal(err)
		}
		m := p.Expect(t, `^count (\d+)$`, waitFor)
		n, _ := strconv.Atoi(m[1])
		return n
	}
	// aborted waits until the section was aborted since it counted n.
	aborted := func(what string, n int) {
		t.Helper()
		deadline := time.Now().Add(waitFor)
		for count() <= n {
			if time.Now().After(deadline) {
				t.Fatalf("after %s: the section is not aborted any more (%d aborts)", what, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	round := func(what string, stop func(pid int)) {
		t.Helper()
		// Spinning in the section: it has been aborted and armed again
		// since we last looked (the rest of the loop is a few
		// instructions, the section all the rest).
		aborted("the round before", count())
		n := count()
		stop(p.Pid())
		aborted(what, n)
	}
	round("a ptrace stop", func(pid int) { plainStop(t, tr, pid) })
	for range 3 {
		round("a checkpoint", func(pid int) {
			if err := FreezeWith(context.Background(), tr, pid, io.Discard, FreezeOptions{StopAndCopy: true}); err != nil {
				t.Fatalf("checkpoint %d: %v", pid, err)
			}
		})
	}
}
