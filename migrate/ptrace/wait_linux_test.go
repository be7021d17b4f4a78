package ptrace

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
)

// The main goroutine stays on the main thread (package init runs there),
// so that TestMain can start a tracer from the main thread itself.
func init() { runtime.LockOSThread() }

// mainTracer is a tracer whose serve began on the main thread; one test
// run closes it.
var (
	mainTracer     *Tracer
	mainTracerUsed bool
)

func TestMain(m *testing.M) {
	mainTracer = &Tracer{reqs: make(chan func()), done: make(chan struct{})}
	started := make(chan struct{})
	mainTracer.serve(started) // on the main thread: returns once another thread serves
	<-started
	code := m.Run()
	fixture.Cleanup()
	os.Exit(code)
}

// TestTracerNotOnMainThread: a tracer started on the main thread must
// serve on another one, which Close ends; the runtime never ends the main
// thread, and a tracer there would keep its tracees after Close.
func TestTracerNotOnMainThread(t *testing.T) {
	if mainTracerUsed {
		t.Skip("the tracer started on the main thread was closed by an earlier run (-count)")
	}
	mainTracerUsed = true
	var tid int
	mainTracer.Do(func() error { tid = unix.Gettid(); return nil })
	if tid == os.Getpid() {
		t.Fatalf("the tracer runs on the main thread (%d)", tid)
	}
	mainTracer.Close()
	if _, err := os.Stat("/proc/self/task/" + strconv.Itoa(tid)); err == nil {
		t.Errorf("tracer thread %d still there after Close", tid)
	}
}

const waitFor = 10 * time.Second

// TestWaitTimeoutVforkParent interrupts a parent waiting in vfork for a
// child that never execs (fixture vforker), which cannot stop until the
// child ends: Wait must give up (ErrTimeout) instead of waiting forever,
// and once the tracer is closed the parent must be as it was: not
// traced, and when its child ends it carries on rather than stopping for
// the interrupt it never reached.
func TestWaitTimeoutVforkParent(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace (CI runs as root)")
	}
	// The tracer first, so that its thread cannot be the one the fixture
	// is forked from: the fixture's parent-death signal fires when that
	// thread exits, and the tracer's exits at Close.
	tr := NewTracer()
	t.Cleanup(tr.Close)
	p := fixture.StartGroup(t, fixture.Build(t, "vforker"))
	parent := p.Pid()
	p.Expect(t, `^parent `+strconv.Itoa(parent)+`$`, waitFor)
	child, err := strconv.Atoi(p.Expect(t, `^child (\d+) tick \d+$`, waitFor)[1])
	if err != nil {
		t.Fatal(err)
	}
	waitStatus(t, parent, "State", "D")

	err = tr.Do(func() error {
		if err := Seize(parent, 0); err != nil {
			return err
		}
		if err := Interrupt(parent); err != nil {
			return err
		}
		st, err := WaitTimeout(parent, 100*time.Millisecond)
		if err == nil {
			return errors.New("stopped: " + st.String())
		}
		return err
	})
	tr.Close()
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("wait for the stop of a parent in vfork: got %v, want %v", err, ErrTimeout)
	}
	waitStatus(t, parent, "TracerPid", "0")
	p.Drain()
	p.Expect(t, `^child `+strconv.Itoa(child)+` tick \d+$`, waitFor)
	syscall.Kill(child, syscall.SIGKILL)
	p.Expect(t, `^parent resumed child=9$`, waitFor)
}

// waitStatus waits until the field key of /proc/PID/status starts with want.
func waitStatus(t *testing.T, pid int, key, want string) {
	t.Helper()
	var got string
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && k == key {
				got = strings.TrimSpace(v)
			}
		}
		if strings.HasPrefix(got, want) {
			return
		}
	}
	t.Fatalf("pid %d: %s %q, want %q", pid, key, got, want)
}

// TestInjectedCallRegained injects a call that blocks, pause(2), into a
// stopped countforever with a short bound: Syscall must give up
// (ErrTimeout) with the thread stopped again, so that Restore puts its
// registers back; detached, it counts on from where it was, not stuck in
// pause nor killed by the single step's SIGTRAP.
func TestInjectedCallRegained(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace (CI runs as root)")
	}
	tr := NewTracer() // before the fixture: see TestWaitTimeoutVforkParent
	t.Cleanup(tr.Close)
	p := fixture.Start(t, fixture.Build(t, "countforever"), "20")
	p.Expect(t, `^3$`, waitFor)
	pid := p.Pid()
	site := syscallSite(t, pid)
	err := tr.Do(func() error {
		if err := Seize(pid, 0); err != nil {
			return err
		}
		if err := Interrupt(pid); err != nil {
			return err
		}
		if _, err := Wait(pid); err != nil {
			return err
		}
		in, err := NewInjector(pid, site)
		if err != nil {
			return err
		}
		in.Timeout = 200 * time.Millisecond
		_, err = in.Syscall(unix.SYS_PAUSE)
		if !errors.Is(err, ErrTimeout) {
			return fmt.Errorf("inject pause: got %v, want %v", err, ErrTimeout)
		}
		if err := in.Restore(); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
		return Detach(pid, 0)
	})
	if err != nil {
		t.Fatal(err)
	}
	last := -1
	for _, l := range p.Drain() {
		if n, err := strconv.Atoi(l); err == nil {
			last = n
		}
	}
	for range 3 {
		l, err := p.Next(waitFor)
		if err != nil {
			t.Fatalf("after the abandoned call: %v", err)
		}
		n, err := strconv.Atoi(l)
		if err != nil || (last >= 0 && n != last+1) {
			t.Fatalf("after the abandoned call got %q, want %d", l, last+1)
		}
		last = n
	}
}

// syscallSite returns the address of a syscall instruction in pid's vdso.
func syscallSite(t *testing.T, pid int) uintptr {
	t.Helper()
	maps, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/maps")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(maps), "\n") {
		if !strings.HasSuffix(line, "[vdso]") {
			continue
		}
		var lo, hi uint64
		if _, err := fmt.Sscanf(line, "%x-%x", &lo, &hi); err != nil {
			t.Fatal(err)
		}
		m := NewMem(pid)
		defer m.Close()
		b := make([]byte, hi-lo)
		if err := m.Read(lo, b); err != nil {
			t.Fatal(err)
		}
		if i := bytes.Index(b, []byte{0x0f, 0x05}); i >= 0 {
			return uintptr(lo) + uintptr(i)
		}
	}
	t.Fatal("no syscall instruction in the vdso")
	return 0
}
