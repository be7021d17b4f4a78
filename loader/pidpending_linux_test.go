package loader_test

import (
	"bytes"
	"context"
	"os"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestPIDPending: a copy built while the original still holds its PID on
// this host waits for it (PIDPending), and takes it at the start once the
// original is gone; a copy built into a new PID namespace does not wait,
// and starts while the original still runs (a cluster's target starts on
// the state's commit then, without the source's kill).
func TestPIDPending(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "countforever"))
	orig.Expect(t, `^3$`, waitFor)
	srcTr, dstTr := ptrace.NewTracer(), ptrace.NewTracer()
	defer srcTr.Close()
	defer dstTr.Close()
	var snap bytes.Buffer
	if err := capture.Freeze(context.Background(), srcTr, pid, &snap, false, nil); err != nil {
		t.Fatalf("freeze: %v", err)
	}
	build := func(pidns bool) (*loader.Process, *fixture.Lines) {
		t.Helper()
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pr.Close() })
		out := fixture.FollowReader(t, pr)
		p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(bytes.NewReader(snap.Bytes())),
			loader.Options{Stdio: [3]*os.File{nil, pw, pw}, PIDNamespace: pidns})
		pw.Close()
		if err != nil {
			t.Fatalf("build (pidns %v): %v", pidns, err)
		}
		return p, out
	}

	ns, nsOut := build(true)
	if ns.PIDPending() {
		t.Errorf("a copy in a new PID namespace: PIDPending true, want false (its PID is its namespace's)")
	}
	if err := ns.Start(); err != nil {
		t.Fatalf("start in a new PID namespace, the original running: %v", err)
	}
	defer func() {
		for _, m := range ns.Pids() {
			syscall.Kill(m, syscall.SIGKILL)
		}
		ns.Wait()
	}()
	if !alive(pid) {
		t.Fatalf("the original %d is gone; the test needs it running", pid)
	}
	nsOut.Expect(t, `^[0-9]+$`, waitFor)

	host, out := build(false)
	if !host.PIDPending() {
		t.Errorf("a copy built while the original holds pid %d: PIDPending false, want true", pid)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	<-orig.Exited()
	if err := host.Start(); err != nil {
		t.Fatalf("start once the original is gone: %v", err)
	}
	defer reap(t, host)
	if host.Pid() != pid {
		t.Errorf("the copy runs as pid %d, want the original's %d", host.Pid(), pid)
	}
	out.Expect(t, `^[0-9]+$`, waitFor)
}
