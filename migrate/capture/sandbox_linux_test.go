package capture

import (
	"context"
	"io"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestInjectSeccompRefused freezes a process whose seccomp filter refuses
// a call the capture injects (prctl: PR_GET_TID_ADDRESS, securebits),
// killing it for it or failing it with EPERM. The freeze must fail with
// one line naming the thread and the call, without making it, and leave
// the process running: an injected call the filter kills for would take
// the process with it.
func TestInjectSeccompRefused(t *testing.T) {
	for _, mode := range []string{"kill", "errno"} {
		t.Run(mode, func(t *testing.T) {
			tr := ptrace.NewTracer()
			defer tr.Close()
			p := fixture.Start(t, fixture.Build(t, "sandbox"), strconv.Itoa(unix.SYS_PRCTL), mode)
			p.Expect(t, `^3$`, waitFor)
			err := FreezeWith(context.Background(), tr, p.Pid(), io.Discard, FreezeOptions{StopAndCopy: true})
			t.Logf("freeze: %v", err)
			if err == nil || !strings.Contains(err.Error(), "seccomp") || !strings.Contains(err.Error(), "157") {
				t.Errorf("freeze of a process whose filter refuses prctl: got %v, want an error naming its seccomp filter and call 157", err)
			}
			p.Drain()
			for range 2 {
				if _, err := p.Lines.Match(`^\d+$`, waitFor); err != nil {
					t.Fatalf("after the freeze: %v (signal %v)", err, p.ExitSignal())
				}
			}
		})
	}
}

// TestInjectSeccompNoFrame: a thread whose filter refuses rt_sigreturn
// gets no sigreturn frame (its calls are stepped): let go by a dead
// tracer, it would make the rt_sigreturn and be killed for it, or, told
// EPERM, run on from the sequence on borrowed registers.
func TestInjectSeccompNoFrame(t *testing.T) {
	for _, c := range []struct {
		nr    int
		frame bool
	}{{unix.SYS_RT_SIGRETURN, false}, {unix.SYS_GETPRIORITY, true}} {
		tr := ptrace.NewTracer() // before the fixture: see TestInjectTracerKilledTinyStacks
		t.Cleanup(tr.Close)      // after the fixture's end
		p := fixture.Start(t, fixture.Build(t, "sandbox"), strconv.Itoa(c.nr), "errno")
		p.Expect(t, `^3$`, waitFor)
		pid := p.Pid()
		err := tr.Do(func() error {
			if err := ptrace.Seize(pid, seizeOptions); err != nil {
				return err
			}
			defer ptrace.Detach(pid, 0)
			if err := ptrace.Interrupt(pid); err != nil {
				return err
			}
			if err := waitInterrupt(pid); err != nil {
				return err
			}
			in, err := ptrace.NewSeizedInjector(pid, 0)
			if err != nil {
				return err
			}
			maps, err := procfs.Maps(pid)
			if err != nil {
				return err
			}
			xs, err := ptrace.GetXState(pid)
			if err != nil {
				return err
			}
			g, gl := sigreturnGadget(ptrace.NewMem(pid), maps)
			guardCalls(in, g, gl, pid, pid, in.Saved().Rsp, maps, xs, 0)
			if in.Guarded() != c.frame {
				t.Errorf("filter refusing syscall %d: frame %v, want %v", c.nr, in.Guarded(), c.frame)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}
