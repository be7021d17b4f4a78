package ptrace

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
)

// frameTracerEnv makes the test binary the tracer of
// TestInjectFrameKilledRestarts: "PID:STEP" injects one call into PID's main
// thread through a sigreturn frame and stops for good at STEP
// (frameStep; 0: in the interrupt stop, before any call).
const frameTracerEnv = "PCLUSTER_TEST_FRAME_TRACER"

// TestInjectFrameKilledRestarts has a tracer die at each step of a call made
// through the frame into a thread stopped in a blocking call of each
// restart kind (fixture restarts), with or without a SIGUSR1 sent while
// the thread was stopped, pending when the call starts. The thread must then see what it sees when its
// tracer dies with it merely stopped (step 0, the kernel's own detach):
// the handler and EINTR, or the handler and the call restarted
// (SA_RESTART), not the call restarted after a handler that should have
// ended it; without a signal, its call goes on (a sleep is not cut
// short).
func TestInjectFrameKilledRestarts(t *testing.T) {
	if os.Getenv(frameTracerEnv) != "" {
		t.Skip("the tracer's own run")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace (CI runs as root)")
	}
	for _, c := range []struct {
		call string
		nr   int
	}{
		{"pause", unix.SYS_PAUSE},
		{"sigsuspend", unix.SYS_RT_SIGSUSPEND},
		{"ppoll", unix.SYS_PPOLL},
		{"nanosleep", unix.SYS_NANOSLEEP},
		{"read", unix.SYS_READ},
		{"futex", unix.SYS_FUTEX},
		{"futext", unix.SYS_FUTEX},
	} {
		for _, flags := range []string{"restart", "norestart"} {
			for _, signal := range []bool{false, true} {
				name := c.call + "/" + flags + "/quiet"
				if signal {
					name = c.call + "/" + flags + "/signalled"
				}
				t.Run(name, func(t *testing.T) {
					want := frameKilledOutcome(t, c.call, c.nr, flags, signal, 0)
					for step := 1; step <= 6; step++ {
						if got := frameKilledOutcome(t, c.call, c.nr, flags, signal, step); got != want {
							t.Errorf("tracer killed at step %d: got %q, want %q (as killed with the thread merely stopped)", step, got, want)
						}
					}
				})
			}
		}
	}
}

// frameKilledOutcome starts fixture restarts, has a tracer stop its main
// thread, sends SIGUSR1 (if signal), has the tracer make a call through
// the frame and stop for good at step, kills the tracer, and
// returns what the program reports up to the call's first return after
// the handler (a second SIGUSR1 or a wake is sent after the first
// handler: a call restarted shows as a second handler or its result).
func frameKilledOutcome(t *testing.T, call string, nr int, flags string, signal bool, step int) string {
	t.Helper()
	p := fixture.Start(t, fixture.Build(t, "restarts"), call, flags)
	p.Expect(t, `^ready \d+$`, waitFor)
	pid := p.Pid()
	waitIn(t, pid, nr)
	cmd := exec.Command(os.Args[0], "-test.run=^TestInjectFrameTracer$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d:%d", frameTracerEnv, pid, step))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	said := bufio.NewReader(out)
	expect := func(want string) {
		if l, err := said.ReadString('\n'); err != nil || l != want+"\n" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("%s %s step %d: tracer said %q (%v), want %q", call, flags, step, l, err, want)
		}
	}
	expect("stopped")
	if signal {
		// Sent while the thread is merely stopped: pending (shared,
		// sent to the process) before the call starts.
		if err := p.Signal(syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		for !pendingIn(pid, "ShdPnd", unix.SIGUSR1) {
			time.Sleep(time.Millisecond)
		}
	}
	if _, err := in.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	expect(fmt.Sprintf("step %d", step))
	cmd.Process.Kill()
	cmd.Wait()
	if !signal {
		// Back in its call, or returned from it: the wake ends it.
		waitIn(t, pid, nr, unix.SYS_RESTART_SYSCALL)
		if err := p.WriteLine("wake"); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	handlers := 0
	for {
		l, err := p.Next(waitFor)
		if err != nil {
			t.Fatalf("%s %s step %d: after %q: %v", call, flags, step, got, err)
		}
		got = append(got, l)
		if l == "handler" {
			if handlers++; handlers == 1 && signal {
				// Back in the call (after EINTR, the next one), not
				// still in the handler, where the wake's signal
				// would be held.
				waitIn(t, pid, nr, unix.SYS_RESTART_SYSCALL)
				if err := p.WriteLine("wake"); err != nil {
					t.Fatal(err)
				}
			}
		}
		if strings.HasPrefix(l, "ret ") && (handlers > 0 || !signal) {
			return strings.Join(got, "; ")
		}
	}
}

// TestInjectFrameTracer is TestInjectFrameKilledRestarts's tracer (run only by it).
func TestInjectFrameTracer(t *testing.T) {
	pid, step, ok := strings.Cut(os.Getenv(frameTracerEnv), ":")
	if !ok {
		t.Skip("run by TestInjectFrameKilledRestarts")
	}
	tid, _ := strconv.Atoi(pid)
	at, _ := strconv.Atoi(step)
	park := func(s int) {
		if s == at {
			fmt.Printf("step %d\n", s)
			select {}
		}
	}
	tr := NewTracer()
	err := tr.Do(func() error {
		if err := Seize(tid, unix.PTRACE_O_TRACESYSGOOD); err != nil {
			return err
		}
		if err := Interrupt(tid); err != nil {
			return err
		}
		if _, err := Wait(tid); err != nil {
			return err
		}
		in, err := NewSeizedInjector(tid, 0)
		if err != nil {
			return err
		}
		xs, err := GetXState(tid)
		if err != nil {
			return err
		}
		g, gl, low := frameArea(t, tid, in.Saved().Rsp)
		if err := in.SetSigreturn(g, gl, low, (in.Saved().Rsp-128-64)&^63, xs); err != nil {
			return err
		}
		fmt.Println("stopped")
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			return err
		}
		park(0)
		frameStep = park
		_, err = in.Syscall(unix.SYS_GETPID)
		return err
	})
	t.Fatalf("step %d not reached: %v", at, err)
}

// frameArea returns the rt_sigreturn sequence in pid's libc and the start
// of the mapping holding rsp.
func frameArea(t *testing.T, pid int, rsp uint64) (gadget uint64, glen int, low uint64) {
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := NewMem(pid)
	defer m.Close()
	for _, line := range strings.Split(string(maps), "\n") {
		var lo, hi uint64
		var perms string
		if _, err := fmt.Sscanf(line, "%x-%x %s", &lo, &hi, &perms); err != nil {
			continue
		}
		if lo <= rsp && rsp < hi {
			low = lo
		}
		if gadget == 0 && perms == "r-xp" && strings.Contains(line, "libc") {
			b := make([]byte, hi-lo)
			if err := m.Read(lo, b); err != nil {
				t.Fatal(err)
			}
			for _, g := range [][]byte{GadgetRAX, GadgetEAX} {
				if i := bytes.Index(b, g); i >= 0 && gadget == 0 {
					gadget, glen = lo+uint64(i), len(g)
				}
			}
		}
	}
	if gadget == 0 || low == 0 {
		t.Fatalf("pid %d: no sigreturn sequence in libc or no stack", pid)
	}
	return gadget, glen, low
}

// waitIn waits until pid's main thread sleeps in one of the system calls
// nrs.
func waitIn(t *testing.T, pid int, nrs ...int) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		f := strings.Fields(string(b))
		for _, nr := range nrs {
			if len(f) > 0 && f[0] == strconv.Itoa(nr) && bytes.Contains(st, []byte(") S ")) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d not in syscall %v: %q", pid, nrs, b)
		}
		time.Sleep(time.Millisecond)
	}
}

// pendingIn reports whether sig is in the /proc/PID/status field (SigPnd,
// ShdPnd) of pid.
func pendingIn(pid int, field string, sig unix.Signal) bool {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && m&(1<<(sig-1)) != 0
		}
	}
	return false
}

// TestInjectFrameQueryChecked: the frame's own query of a handler's
// SA_RESTART (a thread stopped in read, a signal with a handler pending)
// is an injected call like any other, which the thread's seccomp filters
// (Check) must be asked about first; refused, it is not made.
func TestInjectFrameQueryChecked(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace (CI runs as root)")
	}
	tr := NewTracer()
	t.Cleanup(tr.Close)
	p := fixture.Start(t, fixture.Build(t, "restarts"), "read", "norestart")
	p.Expect(t, `^ready \d+$`, waitFor)
	pid := p.Pid()
	waitIn(t, pid, unix.SYS_READ)
	var asked []uintptr
	err := tr.Do(func() error {
		if err := Seize(pid, unix.PTRACE_O_TRACESYSGOOD); err != nil {
			return err
		}
		defer Detach(pid, 0)
		if err := Interrupt(pid); err != nil {
			return err
		}
		if _, err := Wait(pid); err != nil {
			return err
		}
		if err := p.Signal(syscall.SIGUSR1); err != nil {
			return err
		}
		for !pendingIn(pid, "ShdPnd", unix.SIGUSR1) {
			time.Sleep(time.Millisecond)
		}
		in, err := NewSeizedInjector(pid, 0)
		if err != nil {
			return err
		}
		xs, err := GetXState(pid)
		if err != nil {
			return err
		}
		g, gl, low := frameArea(t, pid, in.Saved().Rsp)
		if err := in.SetSigreturn(g, gl, low, (in.Saved().Rsp-128-64)&^63, xs); err != nil {
			return err
		}
		in.Check = func(nr uintptr, ip uint64, args []uintptr) error {
			asked = append(asked, nr)
			if nr == unix.SYS_RT_SIGACTION {
				return fmt.Errorf("refused")
			}
			return nil
		}
		got, err := in.Syscall(unix.SYS_GETPID)
		if err != nil || int(got) != pid {
			return fmt.Errorf("getpid: %d %v, want %d", got, err, pid)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(asked) != fmt.Sprint([]uintptr{unix.SYS_GETPID, unix.SYS_RT_SIGACTION}) {
		t.Errorf("calls checked: %v, want [getpid rt_sigaction] (%d %d)", asked, unix.SYS_GETPID, unix.SYS_RT_SIGACTION)
	}
	// The signal still pending: the handler runs and the read ends.
	p.Expect(t, `^handler$`, waitFor)
	p.Expect(t, `^ret -1 errno 4 `, waitFor)
}
