package capture

import (
	"fmt"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestInjectAltstack describes a thread stopped in a signal handler on its
// sigaltstack (fixture altstack), of a size from roomy to one with little
// room below the handler: the description must say it is on its
// altstack (SS_ONSTACK), and afterwards the handler must return to a
// thread with its altstack kept and the memory below it untouched. With
// 3072 bytes (1632 left below the handler) the sigreturn frame reached
// below the altstack, and the kernel, asked with rsp there, said the
// thread was not on it.
func TestInjectAltstack(t *testing.T) {
	for _, size := range []int{65536, 8192, 4096, 3072} {
		t.Run(strconv.Itoa(size), func(t *testing.T) {
			tr := ptrace.NewTracer()
			defer tr.Close()
			p := fixture.Start(t, fixture.Build(t, "altstack"), strconv.Itoa(size))
			m := p.Expect(t, `^ready (0x[0-9a-f]+) (\d+)$`, waitFor)
			p.Expect(t, `^handler 1$`, waitFor)
			waitInSyscall(t, p.Pid(), unix.SYS_READ)
			f, err := Attach(tr, p.Pid())
			if err != nil {
				t.Fatal(err)
			}
			r, err := f.gather(nil, nil)
			if rerr := f.Resume(); rerr != nil {
				t.Fatal(rerr)
			}
			if err != nil {
				t.Fatal(err)
			}
			th := r.thrs[0]
			if got := fmt.Sprintf("%#x %d %d", th.AltSP, th.AltSize, th.AltFlags); got != fmt.Sprintf("%s %s %d", m[1], m[2], ssOnStack) {
				t.Errorf("altstack described as %s, want %s %s %d (SS_ONSTACK)", got, m[1], m[2], ssOnStack)
			}
			if err := p.WriteLine("wake"); err != nil {
				t.Fatal(err)
			}
			p.Expect(t, fmt.Sprintf(`^after %s %s 0 canary ok$`, m[1], m[2]), waitFor)
		})
	}
}

// TestInjectTracerKilledAltstack is TestInjectTracerKilled for a thread in
// a handler on its sigaltstack (fixture altstack, 8 KiB): its frame within
// the altstack, it comes back from each killed tracer still in its
// handler, the altstack kept (the frame's rt_sigreturn leaves it alone)
// and the memory below it untouched.
func TestInjectTracerKilledAltstack(t *testing.T) {
	if os.Getenv(injectLoopEnv) != "" {
		t.Skip("the tracer's own run")
	}
	p := fixture.Start(t, fixture.Build(t, "altstack"), "8192")
	m := p.Expect(t, `^ready (0x[0-9a-f]+) (\d+)$`, waitFor)
	p.Expect(t, `^handler 1$`, waitFor)
	waitInSyscall(t, p.Pid(), unix.SYS_READ)
	killTracers(t, p, 30)
	if err := p.WriteLine("wake"); err != nil {
		t.Fatal(err)
	}
	p.Expect(t, fmt.Sprintf(`^after %s %s 0 canary ok$`, m[1], m[2]), waitFor)
}
