package capture

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	code := m.Run()
	fixture.Cleanup()
	os.Exit(code)
}

const waitFor = 10 * time.Second

// TestStopTimeoutLetsGo attaches, without the up-front vfork check (as if
// the process entered vfork just after it), to a process whose main
// thread waits in vfork while a second thread counts (fixture vforker
// thread). The main thread cannot stop: stopAll must give up once the
// bound on the wait passes, naming the vfork, and Attach's failure path
// must let the counting thread, already stopped, go on at once; once the
// tracer is closed nothing may be traced or stopped, and the main thread
// must carry on when its child ends (the interrupt it never reached is
// dropped, not delivered later).
func TestStopTimeoutLetsGo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace (CI runs as root)")
	}
	// The tracer first, so that its thread cannot be the one the fixture
	// is forked from: the fixture's parent-death signal fires when that
	// thread exits, and the tracer's exits at Close.
	tr := ptrace.NewTracer()
	t.Cleanup(tr.Close)
	p := fixture.StartGroup(t, fixture.Build(t, "vforker"), "thread")
	pid := p.Pid()
	p.Expect(t, `^parent `+strconv.Itoa(pid)+`$`, waitFor)
	child, err := strconv.Atoi(p.Expect(t, `^child (\d+) tick \d+$`, waitFor)[1])
	if err != nil {
		t.Fatal(err)
	}
	p.Expect(t, `^counter tick \d+$`, waitFor)
	for deadline := time.Now().Add(waitFor); threadState(pid, pid) != 'D'; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("thread %d in state %c, want D (in vfork)", pid, threadState(pid, pid))
		}
	}

	f := &Frozen{Pid: pid, tr: tr, mem: ptrace.NewMem(pid)}
	err = tr.Do(f.stopAll)
	f.detach() // as Attach does on failure
	f.mem.Close()
	if err == nil {
		t.Fatal("stopped every thread of a process waiting in vfork")
	}
	if want := "waiting in vfork for its child " + strconv.Itoa(child); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	// The counting thread runs again before the tracer is gone.
	p.Drain()
	p.Expect(t, `^counter tick \d+$`, waitFor)
	tr.Close()
	tasks, err := fixture.Tasks(pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, tid := range tasks {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(tid) + "/status")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, _ := strings.Cut(line, ":")
			v = strings.TrimSpace(v)
			if k == "TracerPid" && v != "0" || k == "State" && (strings.HasPrefix(v, "t") || strings.HasPrefix(v, "T")) {
				t.Errorf("thread %d: %s %s", tid, k, v)
			}
		}
	}
	syscall.Kill(child, syscall.SIGKILL)
	p.Expect(t, `^parent resumed child=9$`, waitFor)
}
