package capture

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// BenchmarkInjectedCall measures what one injected call costs a stopped
// process: single-stepped (the way without a frame), made through a
// sigreturn frame (safe against our death, sigframe_linux.go) and settled
// after each, and through the frame chained (Injector.Chain, as the
// capture makes them: settled once after the batch), in alternating
// batches of 200 getpid calls on the same process; it reports each and
// their ratios to stepped.
func BenchmarkInjectedCall(b *testing.B) {
	p := fixture.Start(b, fixture.Build(b, "bigheap"), "8")
	p.Lines.Expect(b, `^tick 1$`, 10*time.Second)
	tr := ptrace.NewTracer()
	defer tr.Close()
	const calls = 200
	var took [3]time.Duration // stepped, framed, chained
	for i := 0; i < b.N; i++ {
		for mode := range took {
			framed := mode > 0
			f, err := Attach(tr, p.Pid())
			if err != nil {
				b.Fatal(err)
			}
			err = tr.Do(func() error {
				maps, err := procfs.MapsLayout(p.Pid())
				if err != nil {
					return err
				}
				site, err := vdsoSyscallSite(f.mem, maps)
				if err != nil {
					return err
				}
				in, err := ptrace.NewSeizedInjector(p.Pid(), uintptr(site))
				if err != nil {
					return err
				}
				f.threads[0].in = in
				if framed {
					xs, err := ptrace.GetXState(p.Pid())
					if err != nil {
						return err
					}
					g, gl := f.gadget(maps)
					if err := in.SetSigreturn(g, gl, 0, (in.Saved().Rsp-128-scratchLen-64)&^63, xs); err != nil {
						return err
					}
				}
				in.Chain = mode == 2
				t0 := time.Now()
				for j := 0; j < calls; j++ {
					if _, err := in.Syscall(unix.SYS_GETPID); err != nil {
						return err
					}
				}
				if err := in.Settle(); err != nil {
					return err
				}
				took[mode] += time.Since(t0)
				return nil
			})
			if rerr := f.Resume(); err == nil {
				err = rerr
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	}
	n := float64(b.N * calls)
	b.ReportMetric(float64(took[0].Microseconds())/n, "stepped-us/call")
	b.ReportMetric(float64(took[1].Microseconds())/n, "framed-us/call")
	b.ReportMetric(float64(took[2].Microseconds())/n, "chained-us/call")
	b.ReportMetric(float64(took[1])/float64(took[0]), "framed/stepped")
	b.ReportMetric(float64(took[2])/float64(took[0]), "chained/stepped")
}
