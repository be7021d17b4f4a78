package capture

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// injectLoopEnv makes the test binary the tracer of TestInjectTracerKilled:
// it captures the process it names again and again, until killed.
const injectLoopEnv = "PCLUSTER_TEST_INJECT_LOOP"

// TestInjectTracerKilled SIGKILLs a tracer at random moments while it
// injects calls into a process (the start of a live pre-copy: the
// userfaultfd made and closed in the process; the description of a
// stop-and-copy freeze: some twenty calls per thread), 60 times. The
// process must come out of each as it was: alive, running, every ymm
// register and every general one intact (fixture avx checks its ymm
// registers without end and would crash on a wrong rip or rsp). Stepped
// calls, which left a thread on borrowed registers or in the step's
// SIGTRAP stop, lost it in about one trial in twenty (pfreeze -live killed
// at random: "Trace/breakpoint trap").
func TestInjectTracerKilled(t *testing.T) {
	if os.Getenv(injectLoopEnv) != "" {
		t.Skip("the tracer's own run")
	}
	p := fixture.Start(t, fixture.Build(t, "avx"), "7", "18")
	first, err := p.Next(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if first == "noavx" {
		t.Skip("no AVX2 here")
	}
	killTracers(t, p, 60)
	for _, l := range p.Drain() {
		if strings.HasPrefix(l, "FAIL") {
			t.Fatalf("avx: %s", l)
		}
	}
	// Still checking its registers: two more rounds of checks.
	for n := 0; n < 2; {
		l, err := p.Next(10 * time.Second)
		if err != nil {
			t.Fatalf("avx after 60 killed tracers: %v", err)
		}
		if strings.HasPrefix(l, "FAIL") {
			t.Fatalf("avx after 60 killed tracers: %s", l)
		}
		n++
	}
}

// TestInjectTracerKilledSleeping is TestInjectTracerKilled for a process
// stopped inside a system call (bigheap in nanosleep, which the kernel
// restarts through restart_syscall): a thread let go by a dead tracer
// restores itself from the frame with the call rewound, as the kernel
// would have resumed it; its ticks go on.
func TestInjectTracerKilledSleeping(t *testing.T) {
	if os.Getenv(injectLoopEnv) != "" {
		t.Skip("the tracer's own run")
	}
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "8")
	p.Lines.Expect(t, `^tick 1$`, 10*time.Second)
	killTracers(t, p, 40)
	p.Drain()
	for n := 0; n < 3; n++ {
		if _, err := p.Lines.Match(`^tick \d+$`, 10*time.Second); err != nil {
			t.Fatalf("bigheap after 40 killed tracers: %v", err)
		}
	}
}

// killTracers runs n tracers on p, each SIGKILLed at a random moment of
// its first 3 ms of injecting, and checks p alive and running after each.
func killTracers(t *testing.T, p *fixture.Proc, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestInjectLoop$")
		cmd.Env = append(os.Environ(), injectLoopEnv+"="+strconv.Itoa(p.Pid()))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Killed once it injects: at a random point of its next
		// captures (each some milliseconds long).
		if l, err := bufio.NewReader(out).ReadString('\n'); err != nil || !strings.HasPrefix(l, "injecting") {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("trial %d: tracer: %q %v", i, l, err)
		}
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		cmd.Process.Kill()
		cmd.Wait()
		if st := stateOf(p.Pid()); st != 'S' && st != 'R' {
			// It may be caught stopped for a moment: the kernel's
			// detach ends the stop at once.
			time.Sleep(50 * time.Millisecond)
			if st := stateOf(p.Pid()); st != 'S' && st != 'R' {
				p.Wait(time.Second)
				t.Fatalf("trial %d: process %d in state %c after its tracer died (signal %v; output %q)", i, p.Pid(), st, p.ExitSignal(), p.Drain())
			}
		}
	}
}

// TestInjectLoop is TestInjectTracerKilled's tracer (run only by it).
func TestInjectLoop(t *testing.T) {
	pid, err := strconv.Atoi(os.Getenv(injectLoopEnv))
	if err != nil {
		t.Skip("run by TestInjectTracerKilled")
	}
	tr := ptrace.NewTracer()
	defer tr.Close()
	fmt.Println("injecting")
	for i := 0; ; i++ {
		if i%2 == 0 {
			pc, err := startPrecopy(tr, pid, LiveOptions{})
			if err != nil {
				t.Fatal(err)
			}
			pc.close()
			continue
		}
		if err := FreezeWith(context.Background(), tr, pid, io.Discard, FreezeOptions{StopAndCopy: true}); err != nil {
			t.Fatal(err)
		}
	}
}

func stateOf(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 'X'
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i > 0 && i+2 < len(s) {
		return s[i+2]
	}
	return '?'
}

// TestInjectTracerKilledGo is TestInjectTracerKilled for a Go program
// (gohttp -nonet: several OS threads, goroutines checking their counts):
// its calls go through frames on Go's own rt_sigreturn sequence
// (runtime.sigreturn), on goroutine and system stacks. It must go on
// ticking, its checks passing.
func TestInjectTracerKilledGo(t *testing.T) {
	if os.Getenv(injectLoopEnv) != "" {
		t.Skip("the tracer's own run")
	}
	p := fixture.Start(t, fixture.Build(t, "gohttp"), "-nonet", "8")
	p.Lines.Expect(t, `^tick 1 `, 30*time.Second)
	killTracers(t, p, 30)
	for _, l := range p.Drain() {
		if strings.HasPrefix(l, "FAIL") {
			t.Fatalf("gohttp: %s", l)
		}
	}
	for n := 0; n < 3; n++ {
		l, err := p.Lines.Match(`^(tick \d+ |FAIL)`, 10*time.Second)
		if err != nil || strings.HasPrefix(l[0], "FAIL") {
			t.Fatalf("gohttp after 30 killed tracers: %q %v", l, err)
		}
	}
}

// TestInjectTracerKilledTinyStacks is TestInjectTracerKilled for a process
// whose threads run on 16 KiB stacks (fixture tinystack), one blocked in
// read, one sleeping: every thread's calls go through a frame of its own
// within its stack, and the threads go on (the reader still reads, the
// sleeper still ticks).
func TestInjectTracerKilledTinyStacks(t *testing.T) {
	if os.Getenv(injectLoopEnv) != "" {
		t.Skip("the tracer's own run")
	}
	// The tracer before the fixture, which dies with the thread that
	// forked it (Pdeathsig): the tracer's, locked, ends with Close.
	tr := ptrace.NewTracer()
	defer tr.Close()
	p := fixture.Start(t, fixture.Build(t, "tinystack"))
	p.Lines.Expect(t, `^ready$`, 10*time.Second)
	p.Lines.Expect(t, `^tick 1$`, 10*time.Second)
	f, err := Attach(tr, p.Pid())
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.gather(nil, nil)
	guarded := 0
	for _, th := range f.threads {
		if th.in != nil && th.in.Guarded() {
			guarded++
		}
	}
	if rerr := f.Resume(); rerr != nil {
		t.Fatal(rerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	if guarded != 3 {
		t.Errorf("%d of 3 threads' calls made through a frame", guarded)
	}
	killTracers(t, p, 30)
	if err := p.WriteLine("wake"); err != nil {
		t.Fatal(err)
	}
	p.Lines.Expect(t, `^woke 1$`, 10*time.Second)
	p.Drain()
	p.Lines.Expect(t, `^tick \d+$`, 10*time.Second)
}

// TestInjectCoroutineFrame describes a thread blocked in read on a
// coroutine stack in the heap (fixture costack: makecontext, as green
// threads and Go's goroutines run) with 1200 bytes left below it, right
// above a canary block. The memory below its stack pointer is not its to
// lend: once its altstack is known (the first call), its frame goes there
// (armed, unused). Before, the frame went below the coroutine stack, into
// the canary, and 30 tracers killed mid-capture left it corrupted.
func TestInjectCoroutineFrame(t *testing.T) {
	tr := ptrace.NewTracer() // before the fixture: see TestInjectTracerKilledTinyStacks
	defer tr.Close()
	p := fixture.Start(t, fixture.Build(t, "costack"))
	p.Lines.Expect(t, `^ready$`, 10*time.Second)
	waitInSyscall(t, p.Pid(), unix.SYS_READ)
	f, err := Attach(tr, p.Pid())
	if err != nil {
		t.Fatal(err)
	}
	r, err := f.gather(nil, nil)
	if err != nil {
		f.Resume()
		t.Fatal(err)
	}
	lo, hi := f.threads[0].in.FrameArea()
	alt := r.thrs[0]
	if alt.AltSize == 0 || lo < alt.AltSP || hi > alt.AltSP+alt.AltSize {
		t.Errorf("frame at %#x-%#x, want it within the altstack %#x-%#x", lo, hi, alt.AltSP, alt.AltSP+alt.AltSize)
	}
	if err := f.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteLine("wake"); err != nil {
		t.Fatal(err)
	}
	p.Lines.Expect(t, `^woke canary ok$`, 10*time.Second)
}
