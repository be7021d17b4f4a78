package capture_test

import (
	"context"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestFreezeTreeBuildContainer moves a container (the fixture container
// as the init of unshare's PID, mount, UTS, IPC and network namespaces)
// in this process, as an agent does: FreezeTree with halt on its init
// into loader.Build with PIDNamespace, then Start. The restored init
// reports from inside its new namespaces what the original did: host
// name, System V segment, tmpfs file, a connection to its listener, its
// PIDs.
func TestFreezeTreeBuildContainer(t *testing.T) {
	needRoot(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skipf("unshare not found: %v", err)
	}
	const check = "host=ctrbox shm=sysv ok/1 tcp=ok file=tmpfs data/tmpfs data links=2 pid=1 procs=1,2"
	srcTr, dstTr := ptrace.NewTracer(), ptrace.NewTracer()
	defer srcTr.Close()
	defer dstTr.Close()
	orig := fixture.Start(t, unshare, "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net",
		fixture.Build(t, "container"), t.TempDir(), "7777")
	orig.Lines.Expect(t, `^ready shm \d+$`, wait)
	kids, err := fixture.Children(orig.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v), want the container's init", orig.Pid(), kids, err)
	}
	init := kids[0]
	t.Cleanup(func() {
		syscall.Kill(init, syscall.SIGKILL)
		orig.Wait(wait)
	})
	orig.WriteLine("check")
	orig.Lines.Expect(t, "^"+check+"$", wait)

	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer inW.Close()
	out, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	lines := fixture.FollowReader(t, out)
	pr, w := io.Pipe()
	type built struct {
		p   *loader.Process
		err error
	}
	builds := make(chan built, 1)
	go func() {
		p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(pr),
			loader.Options{PIDNamespace: true, Stdio: [3]*os.File{inR, outW, outW}})
		pr.CloseWithError(err)
		builds <- built{p, err}
	}()
	var b built
	err = capture.FreezeTree(context.Background(), srcTr, init, w, true, func() error {
		w.Close()
		b = <-builds
		return b.err
	})
	inR.Close()
	outW.Close()
	if err != nil {
		if b.p != nil {
			b.p.Abort()
		}
		t.Fatalf("freeze: %v", err)
	}
	if err := b.p.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	defer func() {
		syscall.Kill(b.p.WaitPid(), syscall.SIGKILL)
		b.p.Wait()
	}()
	for _, kind := range []string{"uts", "ipc", "net", "mnt", "pid"} {
		mine, _ := os.Readlink("/proc/self/ns/" + kind)
		theirs, _ := os.Readlink("/proc/" + strconv.Itoa(b.p.WaitPid()) + "/ns/" + kind)
		if theirs == "" || theirs == mine {
			t.Errorf("the restored init is in %s namespace %q, want a new one (ours: %s)", kind, theirs, mine)
		}
	}
	if _, err := inW.WriteString("check\n"); err != nil {
		t.Fatal(err)
	}
	lines.Expect(t, "^"+check+"$", wait)
}
