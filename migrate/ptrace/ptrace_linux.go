package ptrace

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Seize attaches to tid without stopping it, with options.
// Runs on the tracer thread.
func Seize(tid int, options int) error {
	return ptrace(unix.PTRACE_SEIZE, tid, 0, uintptr(options))
}

// Interrupt asks a seized thread to stop (PTRACE_INTERRUPT).
// Runs on the tracer thread.
func Interrupt(tid int) error { return unix.PtraceInterrupt(tid) }

// Stop describes why a tracee stopped.
type Stop struct {
	Status unix.WaitStatus
}

// Event returns the PTRACE_EVENT_* of an event stop, or 0.
func (s Stop) Event() int {
	if !s.Status.Stopped() {
		return 0
	}
	return int(s.Status>>16) & 0xff
}

// Sig returns the stop signal.
func (s Stop) Sig() unix.Signal { return s.Status.StopSignal() }

// IsEventStop reports a PTRACE_EVENT_STOP (interrupt or group stop).
func (s Stop) IsEventStop() bool { return s.Event() == unix.PTRACE_EVENT_STOP }

func (s Stop) String() string {
	switch {
	case s.Status.Exited():
		return fmt.Sprintf("exited with status %d", s.Status.ExitStatus())
	case s.Status.Signaled():
		return fmt.Sprintf("killed by %v", s.Status.Signal())
	case s.Status.Stopped():
		if e := s.Event(); e != 0 {
			return fmt.Sprintf("stopped (event %d, %v)", e, s.Sig())
		}
		return fmt.Sprintf("stopped by %v", s.Sig())
	}
	return fmt.Sprintf("status %#x", uint32(s.Status))
}

// ErrExited is returned by Wait when the tracee is gone.
var ErrExited = errors.New("process exited")

// ErrTimeout is returned by Wait when the tracee neither stopped nor
// exited within its deadline.
var ErrTimeout = errors.New("timed out")

// StopTimeout bounds every Wait: a tracee that is asked to stop (an
// interrupt, a single step, an injected call, a kill) and neither stops
// nor exits within it is given up on, whatever it is doing (a parent
// waiting in vfork, an uninterruptible sleep), rather than hanging the
// tracer.
const StopTimeout = 10 * time.Second

// Wait waits, at most StopTimeout, for tid to change state. An exit or
// death is returned as an error wrapping ErrExited, no change in time as
// one wrapping ErrTimeout. Runs on the tracer thread.
func Wait(tid int) (Stop, error) { return WaitTimeout(tid, StopTimeout) }

// waitSpin is how long WaitTimeout polls, yielding the CPU in between,
// before it starts to sleep: a single-stepped or injected call stops
// within microseconds, and the tracer should see it at once.
const waitSpin = time.Millisecond

// WaitTimeout is Wait with the bound d. It polls (wait4 with WNOHANG): a
// blocking wait4 cannot be given a deadline, and nothing the tracer could
// do to end one early would leave the tracee untouched.
// Runs on the tracer thread.
func WaitTimeout(tid int, d time.Duration) (Stop, error) {
	var ws unix.WaitStatus
	start := time.Now()
	deadline := start.Add(d)
	var pause time.Duration
	for {
		got, err := unix.Wait4(tid, &ws, unix.WALL|unix.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return Stop{}, fmt.Errorf("wait %d: %w", tid, err)
		}
		if got == tid {
			break
		}
		now := time.Now()
		if !now.Before(deadline) {
			return Stop{}, fmt.Errorf("tid %d: no stop or exit within %v: %w", tid, max(d, 0).Round(time.Millisecond), ErrTimeout)
		}
		if now.Sub(start) < waitSpin {
			unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
			continue
		}
		pause = min(max(2*pause, 20*time.Microsecond), 2*time.Millisecond)
		time.Sleep(min(pause, deadline.Sub(now)))
	}
	s := Stop{Status: ws}
	if ws.Exited() || ws.Signaled() {
		return s, fmt.Errorf("tid %d %v: %w", tid, s, ErrExited)
	}
	return s, nil
}

// SetOptions sets PTRACE_O_* options. Runs on the tracer thread.
func SetOptions(tid, options int) error { return unix.PtraceSetOptions(tid, options) }

// Cont resumes tid, delivering sig (0 for none). Runs on the tracer thread.
func Cont(tid int, sig unix.Signal) error { return unix.PtraceCont(tid, int(sig)) }

// ContSyscall resumes tid until its next system call entry or exit,
// delivering sig (0 for none); after a seccomp stop, until the call's
// exit (PTRACE_SYSCALL). Runs on the tracer thread.
func ContSyscall(tid int, sig unix.Signal) error { return unix.PtraceSyscall(tid, int(sig)) }

// Detach detaches from tid, delivering sig (0 for none).
// Runs on the tracer thread.
func Detach(tid int, sig unix.Signal) error {
	return ptrace(unix.PTRACE_DETACH, tid, 0, uintptr(sig))
}

// GetRegs reads the general registers. Runs on the tracer thread.
func GetRegs(tid int) (*Regs, error) {
	var r Regs
	if err := unix.PtraceGetRegs(tid, (*unix.PtraceRegs)(&r)); err != nil {
		return nil, fmt.Errorf("getregs %d: %w", tid, err)
	}
	return &r, nil
}

// SetRegs writes the general registers. Runs on the tracer thread.
func SetRegs(tid int, r *Regs) error {
	if err := unix.PtraceSetRegs(tid, (*unix.PtraceRegs)(r)); err != nil {
		return fmt.Errorf("setregs %d: %w", tid, err)
	}
	return nil
}

// GetEventMsg returns PTRACE_GETEVENTMSG (the new pid after a clone event).
// Runs on the tracer thread.
func GetEventMsg(tid int) (uint, error) { return unix.PtraceGetEventMsg(tid) }

// SingleStep steps tid one instruction. Runs on the tracer thread.
func SingleStep(tid int) error { return unix.PtraceSingleStep(tid) }

func ptrace(req int, pid int, addr, data uintptr) error {
	_, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(pid), addr, data, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}
