package ptrace

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Injector makes a stopped thread run system calls on our behalf: it points
// the thread's rip at an existing syscall instruction, loads the number and
// arguments, single-steps it and reads the result. Nothing is written into
// the tracee's memory. Restore puts the saved registers back.
//
// All methods run on the tracer thread.
type Injector struct {
	Tid   int
	Site  uintptr // address of a 0x0f 0x05 (syscall) instruction in the tracee
	saved *Regs
	// Signals holds signals that arrived while injecting; they were
	// dequeued by the stop and must be re-queued or recorded by the caller.
	Signals []unix.Signal
	// NewChild is the pid, in the tracer's namespace, of the last process
	// or thread an injected clone made (PTRACE_GETEVENTMSG).
	NewChild int
	// Timeout bounds each call or batch; 0 means StopTimeout.
	Timeout time.Duration
}

func (in *Injector) bound() time.Duration {
	if in.Timeout > 0 {
		return in.Timeout
	}
	return StopTimeout
}

// NewInjector saves tid's registers so that Restore can put them back.
// Runs on the tracer thread.
func NewInjector(tid int, site uintptr) (*Injector, error) {
	r, err := GetRegs(tid)
	if err != nil {
		return nil, err
	}
	return &Injector{Tid: tid, Site: site, saved: r}, nil
}

// Saved returns the registers the thread had when the injector was made.
func (in *Injector) Saved() *Regs { return in.saved }

// Syscall runs system call nr with args in the tracee and returns its raw
// result; a negative result in -4095..-1 is returned as an Errno.
// Runs on the tracer thread.
func (in *Injector) Syscall(nr uintptr, args ...uintptr) (uintptr, error) {
	r := *in.saved
	r.setSyscall(in.Site, nr, args)
	// Clear the trap flag left by a previous step, if any.
	r.Eflags &^= 0x100
	if err := SetRegs(in.Tid, &r); err != nil {
		return 0, err
	}
	if err := SingleStep(in.Tid); err != nil {
		return 0, fmt.Errorf("inject syscall %d: step %d: %w", nr, in.Tid, err)
	}
	// One bound for the call, however many other stops come first.
	deadline := time.Now().Add(in.bound())
	for {
		st, err := WaitTimeout(in.Tid, time.Until(deadline))
		if err != nil {
			return 0, fmt.Errorf("inject syscall %d: %w", nr, in.regain(err))
		}
		if !st.Status.Stopped() {
			return 0, fmt.Errorf("inject syscall %d: tid %d %v", nr, in.Tid, st)
		}
		if st.Sig() == unix.SIGTRAP && st.Event() == 0 {
			break
		}
		switch st.Event() {
		case 0:
			// Another signal stopped the thread first. It has been
			// dequeued: remember it and keep stepping.
			in.Signals = append(in.Signals, st.Sig())
		case unix.PTRACE_EVENT_FORK, unix.PTRACE_EVENT_VFORK, unix.PTRACE_EVENT_CLONE:
			if msg, err := GetEventMsg(in.Tid); err == nil {
				in.NewChild = int(msg)
			}
		}
		if err := SingleStep(in.Tid); err != nil {
			return 0, fmt.Errorf("inject syscall %d: step %d: %w", nr, in.Tid, err)
		}
	}
	var out Regs
	if err := unix.PtraceGetRegs(in.Tid, (*unix.PtraceRegs)(&out)); err != nil {
		return 0, fmt.Errorf("inject syscall %d: getregs %d: %w", nr, in.Tid, err)
	}
	if out.Rip != uint64(in.Site)+2 {
		return 0, fmt.Errorf("inject syscall %d: tid %d stopped at %#x, want %#x", nr, in.Tid, out.Rip, in.Site+2)
	}
	ret := int64(out.Rax)
	if ret < 0 && ret > -4096 {
		return 0, syscall.Errno(-ret)
	}
	return uintptr(out.Rax), nil
}

// Batch runs, in one stop, the n system calls of the table at addr in the
// tracee with the loop at code (the loader's stub has one: it loads each
// entry, a number and six arguments, runs it, stores the result in the
// entry's eighth word, stops at the first error, and ends with int3). It
// returns how many calls succeeded and, if one failed, its error.
// Runs on the tracer thread.
func (in *Injector) Batch(code, addr uintptr, n int) (int, error) {
	if n == 0 {
		return 0, nil
	}
	r := *in.saved
	r.Rip, r.Rbx, r.R15 = uint64(code), uint64(addr), uint64(n)
	r.Eflags &^= 0x100
	if err := SetRegs(in.Tid, &r); err != nil {
		return 0, err
	}
	if err := Cont(in.Tid, 0); err != nil {
		return 0, fmt.Errorf("batch: cont %d: %w", in.Tid, err)
	}
	deadline := time.Now().Add(in.bound())
	for {
		st, err := WaitTimeout(in.Tid, time.Until(deadline))
		if err != nil {
			return 0, fmt.Errorf("batch: %w", in.regain(err))
		}
		if !st.Status.Stopped() {
			return 0, fmt.Errorf("batch: tid %d %v", in.Tid, st)
		}
		if st.Sig() == unix.SIGTRAP && st.Event() == 0 {
			break
		}
		if st.Event() == 0 {
			in.Signals = append(in.Signals, st.Sig())
		}
		if err := Cont(in.Tid, 0); err != nil {
			return 0, fmt.Errorf("batch: cont %d: %w", in.Tid, err)
		}
	}
	var out Regs
	if err := unix.PtraceGetRegs(in.Tid, (*unix.PtraceRegs)(&out)); err != nil {
		return 0, fmt.Errorf("batch: getregs %d: %w", in.Tid, err)
	}
	done := int((out.Rbx - uint64(addr)) / 64)
	if done < 0 || done > n || out.Rip < uint64(code) || out.Rip > uint64(code)+0x40 {
		return 0, fmt.Errorf("batch: tid %d stopped at %#x, table at entry %d of %d", in.Tid, out.Rip, done, n)
	}
	if ret := int64(out.Rax); out.R15 != 0 && ret < 0 && ret > -4096 {
		return done, syscall.Errno(-ret)
	}
	return n, nil
}

// regain, after err from waiting for an injected call, stops the thread
// again if the call did not come back in time (a call that blocks):
// PTRACE_INTERRUPT ends an interruptible sleep and the thread stops on
// its way out, where Restore can put its registers back; the call is
// abandoned and the thread is as it was. The SIGTRAP the single step
// may have queued on the way is taken, not delivered; other signals
// that stop it meanwhile go to Signals. A thread that does not stop
// within a second (an uninterruptible sleep) is left running the call.
// It returns err, saying which. Runs on the tracer thread.
func (in *Injector) regain(err error) error {
	if !errors.Is(err, ErrTimeout) {
		return err
	}
	if Interrupt(in.Tid) != nil {
		return err
	}
	deadline := time.Now().Add(time.Second)
	for {
		st, werr := WaitTimeout(in.Tid, time.Until(deadline))
		if werr != nil || !st.Status.Stopped() {
			return fmt.Errorf("%w; the thread is still in the call", err)
		}
		switch {
		case st.Sig() == unix.SIGTRAP && st.Event() == 0:
			// The step's trap: the call has returned.
			return fmt.Errorf("%w; the call was abandoned, the thread stopped", err)
		case st.IsEventStop() && !trapPending(in.Tid):
			return fmt.Errorf("%w; the call was abandoned, the thread stopped", err)
		case st.Event() == 0:
			in.Signals = append(in.Signals, st.Sig())
		}
		// On to the step's trap (or past another stop), delivering nothing.
		if Cont(in.Tid, 0) != nil {
			return fmt.Errorf("%w; the thread is still in the call", err)
		}
	}
}

// trapPending reports whether a SIGTRAP is pending for thread tid.
func trapPending(tid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigPnd:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && m&(1<<(unix.SIGTRAP-1)) != 0
		}
	}
	return false
}

// Restore puts back the registers saved when the injector was made (or
// last given to SetSaved). Runs on the tracer thread.
func (in *Injector) Restore() error { return SetRegs(in.Tid, in.saved) }

// SetSaved replaces the registers Restore will write and on which injected
// calls are based.
func (in *Injector) SetSaved(r *Regs) { c := *r; in.saved = &c }
