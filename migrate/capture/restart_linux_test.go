package capture

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// restartCases are the blocking calls of fixture restarts, one of each
// restart kind, with the call's number (to see the thread in it).
var restartCases = []struct {
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
	{"epoll", unix.SYS_EPOLL_WAIT},
}

// restartOutcome starts fixture restarts in call with a SIGUSR1 handler
// (flags: restart or norestart), waits until its main thread is in the
// call, runs between (nil: nothing), sends SIGUSR1 and then "wake", and
// returns what the program reported up to the call's first return after
// the handler ran (a ptrace stop alone makes epoll_wait return EINTR: a
// "ret" line may come first): a
// signal that ends the call gives "handler; ret -1 errno 4 ...", one after
// which the call is restarted gives "handler; handler; ..." or "handler;
// ret 1 ..." (the wake ends it).
func restartOutcome(t *testing.T, call string, nr int, flags string, between func(pid int)) string {
	t.Helper()
	p := fixture.Start(t, fixture.Build(t, "restarts"), call, flags)
	p.Expect(t, `^ready \d+$`, waitFor)
	waitInSyscall(t, p.Pid(), nr)
	if between != nil {
		between(p.Pid())
		// A nanosleep or timed futex wait resumes in restart_syscall.
		waitInSyscall(t, p.Pid(), nr, unix.SYS_RESTART_SYSCALL)
	}
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		l, err := p.Next(waitFor)
		if err != nil {
			t.Fatalf("%s %s: after %q: %v", call, flags, got, err)
		}
		got = append(got, l)
		if l == "handler" && strings.Count(strings.Join(got, ";"), "handler") == 1 {
			// Back in the call (after EINTR, the next one), not still
			// in the handler, where the wake's signal would be held.
			waitInSyscall(t, p.Pid(), nr, unix.SYS_RESTART_SYSCALL)
			if err := p.WriteLine("wake"); err != nil {
				t.Fatal(err)
			}
		}
		if strings.HasPrefix(l, "ret ") && strings.Contains(strings.Join(got, ";"), "handler") {
			return strings.Join(got, "; ")
		}
	}
}

// waitInSyscall waits until pid's main thread sleeps in one of the
// system calls nrs.
func waitInSyscall(t *testing.T, pid int, nrs ...int) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
		f := strings.Fields(string(b))
		for _, nr := range nrs {
			if len(f) > 0 && f[0] == strconv.Itoa(nr) && stateOf(pid) == 'S' {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d not in syscall %v: %q", pid, nrs, b)
		}
		time.Sleep(time.Millisecond)
	}
}

// plainStop seizes pid's threads, stops them with PTRACE_INTERRUPT and
// detaches: what the kernel makes of a ptrace stop without injected calls.
func plainStop(t *testing.T, tr *ptrace.Tracer, pid int) {
	t.Helper()
	tids, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	err = tr.Do(func() error {
		for _, e := range tids {
			tid, _ := strconv.Atoi(e.Name())
			if err := ptrace.Seize(tid, seizeOptions); err != nil {
				return err
			}
			if err := ptrace.Interrupt(tid); err != nil {
				return err
			}
			if _, err := ptrace.Wait(tid); err != nil {
				return err
			}
		}
		for _, e := range tids {
			tid, _ := strconv.Atoi(e.Name())
			if err := ptrace.Detach(tid, 0); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("stop %d: %v", pid, err)
	}
}

// TestInjectRestartsAsKernel checkpoints (and lets run) a thread stopped
// in a blocking call of each restart kind, then signals it: the program
// must see what it sees after a ptrace stop without injected calls (and,
// but for epoll_wait's EINTR, without any stop) — EINTR or the call
// restarted, and its signal mask as it was (sigsuspend's temporary mask
// undone).
func TestInjectRestartsAsKernel(t *testing.T) {
	tr := ptrace.NewTracer()
	defer tr.Close()
	capture := func(pid int) {
		if err := FreezeWith(context.Background(), tr, pid, io.Discard, FreezeOptions{StopAndCopy: true}); err != nil {
			t.Fatalf("checkpoint %d: %v", pid, err)
		}
	}
	for _, c := range restartCases {
		for _, flags := range []string{"restart", "norestart"} {
			t.Run(c.call+"/"+flags, func(t *testing.T) {
				want := restartOutcome(t, c.call, c.nr, flags, func(pid int) { plainStop(t, tr, pid) })
				got := restartOutcome(t, c.call, c.nr, flags, capture)
				t.Logf("%s %s: %q", c.call, flags, got)
				if got != want {
					t.Errorf("after a checkpoint: got %q, want %q (as after a ptrace stop alone)", got, want)
				}
			})
		}
	}
}
