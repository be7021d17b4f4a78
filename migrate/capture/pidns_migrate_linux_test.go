package capture_test

import (
	"context"
	"errors"
	"io"
	"os"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// worker are the ids nsinit's worker sees in its namespace.
var worker = fixture.IDs{Pid: 2, PPid: 1, Pgid: 2, Sid: 1}

// nsinitReport reads the next line of l: the worker's report number
// count, with its ids and heap checksum sum (any, for "").
func nsinitReport(t *testing.T, l *fixture.Lines, count int, sum string) fixture.NsinitReport {
	t.Helper()
	line, err := l.Next(wait)
	if err != nil {
		t.Fatalf("nsinit: %v (last lines %q)", err, l.Last())
	}
	r, ok := fixture.ParseNsinit(line)
	if !ok || r.Count != count || r.IDs != worker || (sum != "" && r.Sum != sum) {
		t.Fatalf("nsinit printed %q, want count %d with ids %+v and sum %q", line, count, worker, sum)
	}
	return r
}

// TestFreezeTreeBuildPIDNamespace moves nsinit's PID namespace twice in
// this process, as an agent does: FreezeTree with halt on its init into
// loader.Build with PIDNamespace, then Start; the second time from the
// namespace the first restore made, the init our child. The worker's
// count goes on with its ids and heap, and its exit status reaches Wait
// through its init.
func TestFreezeTreeBuildPIDNamespace(t *testing.T) {
	needRoot(t)
	srcTr, dstTr := ptrace.NewTracer(), ptrace.NewTracer()
	defer srcTr.Close()
	defer dstTr.Close()
	orig := fixture.Start(t, fixture.Build(t, "nsinit"))
	r := nsinitReport(t, orig.Lines, 1, "")
	sum, last := r.Sum, r.Count
	kids, err := fixture.Children(orig.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("nsinit %d has children %v (%v), want its namespace's init", orig.Pid(), kids, err)
	}
	init := kids[0]
	t.Cleanup(func() {
		syscall.Kill(init, syscall.SIGKILL)
		orig.Wait(wait)
	})
	lines, halted := orig.Lines, func(round int) {
		if code, err := orig.Wait(wait); err != nil || code != 128+int(syscall.SIGKILL) {
			t.Errorf("round %d: nsinit exit code %d (%v), want %d: its init killed", round, code, err, 128+int(syscall.SIGKILL))
		}
	}
	var p *loader.Process
	for round := 1; round <= 2; round++ {
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
			p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(pr),
				loader.Options{PIDNamespace: true, Stdio: [3]*os.File{nil, pw, pw}})
			pr.CloseWithError(err)
			builds <- built{p, err}
		}()
		var b built
		err = capture.FreezeTree(context.Background(), srcTr, init, w, true, func() error {
			w.Close()
			b = <-builds
			return b.err
		})
		pw.Close()
		started := false
		if b.p != nil {
			// A namespace built and not started is aborted: its init,
			// killed, would wait for members only their tracer releases.
			defer func(p *loader.Process) {
				if !started {
					p.Abort()
					return
				}
				syscall.Kill(p.WaitPid(), syscall.SIGKILL)
				p.Wait()
			}(b.p)
		}
		if err != nil {
			t.Fatalf("round %d: freeze: %v", round, err)
		}
		// The halted namespace's lines end, each the next count.
		for {
			line, err := lines.Next(wait)
			if errors.Is(err, io.EOF) {
				break
			}
			if rr, ok := fixture.ParseNsinit(line); err != nil || !ok || rr.Count != last+1 {
				t.Fatalf("round %d: the halted namespace printed %q (%v) after count %d", round, line, err, last)
			}
			last++
		}
		halted(round)
		if err := b.p.Start(); err != nil {
			t.Fatalf("round %d: start: %v", round, err)
		}
		started = true
		last = nsinitReport(t, copyOut, last+1, sum).Count
		p, init, lines = b.p, b.p.WaitPid(), copyOut
		// The init is our child, and FreezeTree, its tracer in this same
		// process, leaves its exit status to our own wait when it halts
		// it (as an agent's wait4(pid) for its workload needs).
		prev := b.p
		halted = func(round int) {
			if ws, err := prev.Wait(); err != nil || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Errorf("round %d: the halted init %d: wait = %v (%v), want killed by SIGKILL", round, prev.WaitPid(), ws, err)
			}
		}
	}
	workers, err := fixture.Children(init)
	if err != nil || len(workers) != 1 {
		t.Fatalf("the restored init %d has children %v (%v), want the worker", init, workers, err)
	}
	syscall.Kill(workers[0], syscall.SIGUSR1)
	lines.Expect(t, `^exit 7$`, wait)
	if ws, err := p.Wait(); err != nil || !ws.Exited() || ws.ExitStatus() != 7 {
		t.Errorf("the namespace ended with %#x (%v), want exit status 7 (the worker's, through its init)", uint32(ws), err)
	}
}
