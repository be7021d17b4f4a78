package main

import (
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

// tasksOf returns pid's thread ids as printed by the fixtures.
func tasksOf(t *testing.T, pid int) []int {
	t.Helper()
	tids, err := fixture.Tasks(pid)
	if err != nil {
		t.Fatal(err)
	}
	return tids
}

// TestThreads8: eight pthreads counting in TLS under a mutex keep their
// TIDs and their counts; the invariants the program checks keep holding.
func TestThreads8(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "threads8"))
	tids := p.Lines.Expect(t, `^threads 8 tids=([\d,]+)$`, waitFor)[1]
	p.Lines.Expect(t, `^tick 3 `, waitFor)
	before := tasksOf(t, p.Pid())
	th := migrate(t, p)
	for i := 0; i < 5; i++ {
		if line := th.out.Expect(t, `^(tick \d+ total=\d+|FAIL.*)$`, waitFor)[0]; strings.HasPrefix(line, "FAIL") {
			t.Fatalf("got %q after thaw", line)
		}
	}
	pid := th.restoredPid(t)
	if after := tasksOf(t, pid); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("threads after thaw %v, want %v (printed tids %s)", after, before, tids)
	}
}

// TestPythonThreads: CPython with 4 threads (and its GIL) carries on.
func TestPythonThreads(t *testing.T) {
	needRoot(t)
	py := fixture.Python(t)
	p := fixture.Start(t, py, fixture.Build(t, "pythreads"))
	p.Lines.Expect(t, `^py threads 4 tids=`, waitFor)
	p.Lines.Expect(t, `^py tick 3 `, waitFor)
	th := migrate(t, p)
	for i := 0; i < 5; i++ {
		if line := th.out.Expect(t, `^(py tick \d+ total=\d+|FAIL.*)$`, waitFor)[0]; strings.HasPrefix(line, "FAIL") {
			t.Fatalf("got %q after thaw", line)
		}
	}
}

// TestGoRuntime: a Go program (the runtime alone runs several threads)
// with goroutines mutating shared state carries on.
func TestGoRuntime(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "gohttp"), "-nonet", "8")
	p.Lines.Expect(t, `^tick 3 `, waitFor)
	if n := len(tasksOf(t, p.Pid())); n < 2 {
		t.Logf("only %d thread(s)", n)
	}
	th := migrate(t, p)
	for i := 0; i < 5; i++ {
		if line := th.out.Expect(t, `^(tick \d+ sum=\d+|FAIL.*)$`, 2*waitFor)[0]; strings.HasPrefix(line, "FAIL") {
			t.Fatalf("got %q after thaw", line)
		}
	}
}

// TestPIDNamespace is the seed's getpid demo, cloned while the original
// still holds its PID: restored into a new PID namespace it keeps its PID
// and prints no PID change (its parent changes, as in the seed).
func TestPIDNamespace(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "getpid"))
	pid := atoi(t, p.Lines.Expect(t, `^pid=(\d+) ppid=\d+$`, waitFor)[1])
	snap := t.TempDir() + "/snap"
	freeze(t, "-pid", fmt.Sprint(pid), "-dest", snap) // a checkpoint: the original keeps its PID
	th := thaw(t, "-src", snap, "-pidns")
	th.out.Expect(t, `^PPID changed from \d+ to 1$`, waitFor)
	line := th.out.Expect(t, `^(no change \d+|PID changed.*)$`, waitFor)[0]
	if strings.HasPrefix(line, "PID changed") {
		t.Fatalf("got %q, want no PID change", line)
	}
	th.restoredPid(t) // pthaw's child is the namespace's init
	if !strings.Contains(th.stderr.String(), fmt.Sprintf("restored as pid %d in a new PID namespace", pid)) {
		t.Errorf("pthaw stderr %q does not say which way was taken", th.stderr.String())
	}
	// The original is untouched.
	p.Lines.Expect(t, `^no change \d+$`, waitFor)
}

// TestPIDNamespaceExitStatus: the namespace's init passes the restored
// process's exit status on to pthaw.
func TestPIDNamespaceExitStatus(t *testing.T) { testExitStatus(t, "-pidns") }

// TestPendingSignal: a blocked signal pending in the process is pending in
// the restored one too (queued while every signal is blocked, so no
// injected call can swallow it).
func TestPendingSignal(t *testing.T) {
	needRoot(t)
	py := fixture.Python(t)
	p := fixture.Start(t, py, "-c", `import signal, time
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGUSR2])
print("ready", flush=True)
while True:
    time.sleep(0.1)
    print("pending", sorted(int(s) for s in signal.sigpending()), flush=True)`)
	p.Lines.Expect(t, `^ready$`, waitFor)
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	p.Lines.Expect(t, `^pending \[10\]$`, waitFor)
	th := migrate(t, p)
	for i := 0; i < 3; i++ {
		th.out.Expect(t, `^pending \[10\]$`, waitFor)
	}
}

// TestSIGPIPEResumes: pfreeze writing to a reader that goes away fails
// with one line and the process carries on (the seed's pipes, misused).
func TestSIGPIPEResumes(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "countforever"), "5")
	p.Lines.Expect(t, `^3$`, waitFor)
	cmd := exec.Command("sh", "-c", fmt.Sprintf("%s -pid %d | head -c 100 > /dev/null", filepath.Join(binDir, "pfreeze"), p.Pid()))
	cmd.Run()
	n := atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
	for i := 1; i <= 10; i++ {
		p.Lines.Expect(t, fmt.Sprintf(`^%d$`, n+i), waitFor)
	}
}

// TestGoHTTPServer: a Go HTTP server keeps serving its in-memory state
// from the same address: its listening socket is re-created and bound,
// its epoll instance watches it again.
func TestGoHTTPServer(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "gohttp"), "127.0.0.1:0")
	addr := p.Lines.Expect(t, `^listening (\S+)$`, waitFor)[1]
	get := func(path string) string {
		t.Helper()
		c := http.Client{Timeout: waitFor}
		resp, err := c.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.TrimSpace(string(b))
	}
	for i := 1; i <= 5; i++ {
		if got := get("/inc?k=moves"); got != fmt.Sprint(i) {
			t.Fatalf("inc %d: got %q", i, got)
		}
	}
	// Idle connections would be sockets pfreeze cannot carry yet.
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	th := migrate(t, p)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := get("/get?k=moves"); got != "5" {
		t.Fatalf("after thaw: got %q, want 5", got)
	}
	if got := get("/inc?k=moves"); got != "6" {
		t.Fatalf("after thaw: inc got %q, want 6", got)
	}
}

// TestVirtualPID is the seed's A.1.5 the other way: the getpid demo
// cloned while the original still holds its PID is restored in this
// namespace under a new PID, and a seccomp filter served by pthaw makes
// getpid answer the saved one: it prints no PID change.
func TestVirtualPID(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "getpid"))
	pid := atoi(t, p.Lines.Expect(t, `^pid=(\d+) ppid=\d+$`, waitFor)[1])
	snap := t.TempDir() + "/snap"
	freeze(t, "-pid", fmt.Sprint(pid), "-dest", snap)
	th := thaw(t, "-src", snap, "-virtpid")
	th.out.Expect(t, `^PPID changed from \d+ to \d+$`, waitFor)
	line := th.out.Expect(t, `^(no change \d+|PID changed.*)$`, waitFor)[0]
	if strings.HasPrefix(line, "PID changed") {
		t.Fatalf("got %q, want no PID change", line)
	}
	if real := th.restoredPid(t); real == pid {
		t.Fatalf("restored with the original's pid %d while it runs", pid)
	}
	if !strings.Contains(th.stderr.String(), fmt.Sprintf("answer %d", pid)) {
		t.Errorf("pthaw stderr %q does not say which way was taken", th.stderr.String())
	}
	p.Lines.Expect(t, `^no change \d+$`, waitFor)
}

// TestVirtualPIDSelfSignal: under -virtpid, kill(getpid(), sig) reaches
// the restored process itself, not the original that holds that PID.
func TestVirtualPIDSelfSignal(t *testing.T) {
	needRoot(t)
	p, th, _ := cloneVirtualPython(t, `import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
print("pid", os.getpid(), flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.2)
print("self-signals", len(got), flush=True)
time.sleep(60)`)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr (the restored process's too): %s", th.stderr.String())
		}
	})
	th.out.Expect(t, `^self-signals 1$`, waitFor)
	// The original, which holds the PID the clone signalled, got nothing:
	// it is still waiting for its own line.
	p.WriteLine("go")
	p.Lines.Expect(t, `^self-signals 1$`, waitFor)
}

// cloneVirtualPython runs script with Python (it prints "pid PID", then
// waits for a line on stdin), freezes it without -halt, so that its PID
// stays taken, restores it with -virtpid and sends the clone its line. It
// returns the original, the clone's pthaw and the saved PID.
func cloneVirtualPython(t *testing.T, script string) (*fixture.Proc, *thawed, int) {
	t.Helper()
	p := fixture.Start(t, fixture.Python(t), "-c", script)
	pid := atoi(t, p.Lines.Expect(t, `^pid (\d+)$`, waitFor)[1])
	snap := t.TempDir() + "/snap"
	freeze(t, "-pid", fmt.Sprint(pid), "-dest", snap)
	th := thaw(t, "-src", snap, "-virtpid")
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "go")
	return p, th, pid
}

// TestVirtualPIDChild: a child the restored process forks shares its
// filter, but getpid in the child is the child's own PID, not the
// parent's saved one.
func TestVirtualPIDChild(t *testing.T) {
	needRoot(t)
	_, th, pid := cloneVirtualPython(t, `import os, sys, time
print("pid", os.getpid(), flush=True)
sys.stdin.readline()
r, w = os.pipe()
kid = os.fork()
if kid == 0:
    os.write(w, str(os.getpid()).encode())
    os._exit(0)
os.waitpid(kid, 0)
print("parent", os.getpid(), "child", kid, "child says", os.read(r, 32).decode(), flush=True)
time.sleep(60)`)
	m := th.out.Expect(t, `^parent (\d+) child (\d+) child says (\d+)$`, waitFor)
	if atoi(t, m[1]) != pid {
		t.Errorf("restored parent's getpid %s, want the saved %d", m[1], pid)
	}
	if m[3] != m[2] {
		t.Errorf("child %s says its getpid is %s, want its own", m[2], m[3])
	}
}
