package capture

import (
	"bytes"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestInjectExactAfterThousandCalls makes 1000 calls through the sigreturn
// frame into fixture avx, which keeps values in every ymm register and
// checks them without end: its registers and its whole XSAVE area must be
// bit for bit what they were, and it must go on checking.
func TestInjectExactAfterThousandCalls(t *testing.T) {
	tr := ptrace.NewTracer() // before the fixture: see TestInjectTracerKilledTinyStacks
	defer tr.Close()
	p := fixture.Start(t, fixture.Build(t, "avx"), "7", "18")
	first, err := p.Next(waitFor)
	if err != nil {
		t.Fatal(err)
	}
	if first == "noavx" {
		t.Skip("no AVX2 here")
	}
	f, err := Attach(tr, p.Pid())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.gather(nil, nil); err != nil {
		f.Resume()
		t.Fatal(err)
	}
	th := f.threads[0]
	err = tr.Do(func() error {
		if !th.in.Guarded() {
			t.Errorf("thread %d: calls not made through a sigreturn frame", th.tid)
		}
		r0, err := ptrace.GetRegs(th.tid)
		if err != nil {
			return err
		}
		x0, err := ptrace.GetXState(th.tid)
		if err != nil {
			return err
		}
		for i := 0; i < 1000; i++ {
			got, err := th.in.Syscall(unix.SYS_GETPID)
			if err != nil || int(got) != p.Pid() {
				t.Fatalf("call %d: getpid %d %v, want %d", i, got, err, p.Pid())
			}
		}
		// The capture chains its calls (Injector.Chain): settled here,
		// as putBack does.
		if err := th.in.Settle(); err != nil {
			return err
		}
		r1, err := ptrace.GetRegs(th.tid)
		if err != nil {
			return err
		}
		x1, err := ptrace.GetXState(th.tid)
		if err != nil {
			return err
		}
		if *r1 != *r0 {
			t.Errorf("registers after 1000 calls:\n%+v\nwant\n%+v", *r1, *r0)
		}
		if !bytes.Equal(x1, x0) {
			for i := range x0 {
				if x0[i] != x1[i] {
					t.Errorf("xsave area after 1000 calls differs from byte %d", i)
					break
				}
			}
		}
		return nil
	})
	if rerr := f.Resume(); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	for n := 0; n < 2; n++ {
		l, err := p.Lines.Match(`^(ok \d+|FAIL.*)$`, waitFor)
		if err != nil || strings.HasPrefix(l[0], "FAIL") {
			t.Fatalf("avx after 1000 calls: %q %v", l, err)
		}
	}
}
