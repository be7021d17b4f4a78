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
// A step (or a batch's int3) leaves the thread in a signal-delivery stop
// for SIGTRAP, single-stepping still armed. If the tracer vanished there,
// the kernel's implicit detach would deliver that SIGTRAP (or trap the next
// instruction) and kill the process. An injector made by NewSeizedInjector,
// for a process that must outlive the tracer, therefore ends every call
// with the thread exactly as it was: registers and signal mask put back and
// the thread parked again in a PTRACE_EVENT_STOP (see settle).
//
// All methods run on the tracer thread.
type Injector struct {
	Tid   int
	Site  uintptr // address of a 0x0f 0x05 (syscall) instruction in the tracee
	saved *Regs
	// seized: settle after every call (NewSeizedInjector); mask is the
	// thread's own signal mask, put back after each call.
	seized bool
	mask   uint64
	// frame, set by SetSigreturn, makes calls safe against our death.
	frame *sigFrame
	// Chain, set by the caller, keeps the thread between two calls made
	// through the frame in the exit stop of the first, pointed at the
	// sequence (as safe), rather than settled after each: one stop less
	// a call. The caller then settles it (Settle, Restore) before it
	// looks at the thread or lets it go.
	Chain bool
	// parked: the thread is in the exit stop of the last call made
	// through frame, pointed at the sequence (Syscall, Settle).
	parked bool
	// Signals holds signals that arrived while injecting; they were
	// dequeued by the stop and must be re-queued or recorded by the caller.
	Signals []unix.Signal
	// NewChild is the pid, in the tracer's namespace, of the last process
	// or thread an injected clone made (PTRACE_GETEVENTMSG).
	NewChild int
	// Timeout bounds each call or batch; 0 means StopTimeout.
	Timeout time.Duration
	// Check, when set, is asked before each call whether the thread may
	// make it (its seccomp filters): nr and args, and ip, the address
	// the kernel will see it made from. Its error is returned and the
	// call is not made.
	Check func(nr uintptr, ip uint64, args []uintptr) error
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

// NewSeizedInjector is NewInjector for a thread attached with PTRACE_SEIZE
// and stopped in a PTRACE_EVENT_STOP (PTRACE_INTERRUPT), of a process that
// must carry on unharmed whenever the tracer vanishes (a checkpoint). Each
// call blocks signals for its duration (see blockable: a signal would
// otherwise be dequeued by the stop, held only by us and lost if we died)
// and ends with settle: from one call to the next, and after the last, the
// thread is exactly as it was, so the window in which our death would
// harm it is one call long. A thread inside an rseq critical section is
// taken to be at its abort handler (rseq_linux.go). Runs on the tracer
// thread.
func NewSeizedInjector(tid int, site uintptr) (*Injector, error) {
	in, err := NewInjector(tid, site)
	if err != nil {
		return nil, err
	}
	if in.mask, err = GetSigmask(tid); err != nil {
		return nil, err
	}
	if err := in.rseqAbort(); err != nil {
		return nil, err
	}
	in.seized = true
	return in, nil
}

// Saved returns the registers the thread had when the injector was made.
func (in *Injector) Saved() *Regs { return in.saved }

// blockable is the mask a seized injector's calls run under: every signal
// but SIGKILL and SIGSTOP, which cannot be blocked, and SIGTRAP: the
// kernel forces the step's SIGTRAP through, and forcing a blocked signal
// resets the process's handler for it to SIG_DFL (force_sig_info_to_task),
// which would change a program that catches SIGTRAP (every Go program).
const blockable = ^uint64(1<<(unix.SIGKILL-1) | 1<<(unix.SIGSTOP-1) | 1<<(unix.SIGTRAP-1))

// Syscall runs system call nr with args in the tracee and returns its raw
// result; a negative result in -4095..-1 is returned as an Errno.
// Runs on the tracer thread.
func (in *Injector) Syscall(nr uintptr, args ...uintptr) (uintptr, error) {
	if in.Check != nil {
		// The frame's call is made at the entry of the sequence's
		// rt_sigreturn, rip pointed at the sequence; a stepped one at
		// Site.
		ip := uint64(in.Site) + 2
		if in.frame != nil && !makesTask(nr) {
			ip = in.frame.gadget
		}
		if err := in.Check(nr, ip, args); err != nil {
			return 0, fmt.Errorf("inject syscall %d: %w", nr, err)
		}
	}
	if !in.seized {
		return in.syscall(nr, args)
	}
	var ret uintptr
	var err error
	if in.frame != nil && !makesTask(nr) {
		// Signals are blocked once the thread points at the frame
		// (frameSyscall): blocked before, a tracer dying in between
		// would leave it to run on with every signal blocked.
		ret, err = in.frameSyscall(nr, args)
		if err == nil && in.Chain {
			// Parked in the call's exit stop, pointed at the
			// sequence, its frame in place: let go now, the thread
			// restores itself; the next call goes on from here, one
			// stop saved (settle's). Settle (or Restore) ends it.
			in.parked = true
			return ret, nil
		}
	} else if err = in.Settle(); err != nil {
		return 0, fmt.Errorf("inject syscall %d: %w", nr, err)
	} else if err = SetSigmask(in.Tid, blockable); err != nil {
		return 0, fmt.Errorf("inject syscall %d: %w", nr, err)
	} else {
		ret, err = in.syscall(nr, args)
	}
	in.parked = false
	if serr := in.settle(); serr != nil {
		return 0, errors.Join(err, fmt.Errorf("inject syscall %d: %w", nr, serr))
	}
	// Nothing of ours is left in the thread's memory between two calls.
	if rerr := in.ReleaseSigreturn(); rerr != nil {
		return 0, errors.Join(err, rerr)
	}
	return ret, err
}

// settle puts back the thread's registers and signal mask and moves it from
// the SIGTRAP stop that ended an injected call into a PTRACE_EVENT_STOP, as
// PTRACE_SEIZE + PTRACE_INTERRUPT left it: PTRACE_INTERRUPT marks a stop
// trap pending, PTRACE_CONT with no signal discards the SIGTRAP and disarms
// single-stepping, and the kernel takes the pending trap before the thread
// returns to user mode, so it runs none of its code. A tracer that
// vanishes from then on leaves a thread that resumes exactly where it was,
// a system call it was in restarted as the kernel would have.
// Runs on the tracer thread.
func (in *Injector) settle() error {
	// The mask first: with the registers still at the frame's sequence,
	// a tracer dying in between leaves the thread to restore itself
	// from the frame, mask and all; put back after the registers, the
	// thread would run on with every signal blocked.
	if err := SetSigmask(in.Tid, in.mask); err != nil {
		return err
	}
	if err := SetRegs(in.Tid, in.saved); err != nil {
		return err
	}
	in.step(6)
	if err := Interrupt(in.Tid); err != nil {
		return fmt.Errorf("interrupt %d: %w", in.Tid, err)
	}
	if err := Cont(in.Tid, 0); err != nil {
		return fmt.Errorf("cont %d: %w", in.Tid, err)
	}
	for i := 0; ; i++ {
		st, err := Wait(in.Tid)
		if err != nil {
			return err
		}
		if st.IsEventStop() {
			return nil
		}
		if i > 1000 {
			return fmt.Errorf("tid %d does not stop (last: %v)", in.Tid, st)
		}
		// The kernel takes the pending stop trap before it dequeues
		// any signal, so this is not expected; if a signal is reported
		// first anyway, it is held as during a call (Signals).
		in.Signals = append(in.Signals, st.Sig())
		if err := Cont(in.Tid, 0); err != nil {
			return fmt.Errorf("cont %d: %w", in.Tid, err)
		}
	}
}

func (in *Injector) syscall(nr uintptr, args []uintptr) (uintptr, error) {
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
	if !in.seized {
		return in.batch(code, addr, n)
	}
	if err := SetSigmask(in.Tid, blockable); err != nil {
		return 0, fmt.Errorf("batch: %w", err)
	}
	done, err := in.batch(code, addr, n)
	if serr := in.settle(); serr != nil {
		return done, errors.Join(err, fmt.Errorf("batch: %w", serr))
	}
	return done, err
}

func (in *Injector) batch(code, addr uintptr, n int) (int, error) {
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
func (in *Injector) Restore() error {
	if in.parked {
		return in.Settle()
	}
	return SetRegs(in.Tid, in.saved)
}

// Settle ends a run of calls made through the frame (the thread parked in
// the last one's exit stop): the thread is put back as it was, parked in
// its interrupt stop, and the frame's memory written back. Nothing to do
// otherwise. Runs on the tracer thread.
func (in *Injector) Settle() error {
	if !in.parked {
		return nil
	}
	in.parked = false
	if err := in.settle(); err != nil {
		return err
	}
	return in.ReleaseSigreturn()
}

// SetSaved replaces the registers Restore will write and on which injected
// calls are based. A sigreturn frame built on the old ones is dropped.
func (in *Injector) SetSaved(r *Regs) {
	if in.parked {
		in.Settle()
	}
	c := *r
	in.saved = &c
	in.frame = nil
}

// DropSigreturn makes the injector's calls stepped again, until another
// SetSigreturn. Runs on the tracer thread, between calls.
func (in *Injector) DropSigreturn() error {
	err := in.Settle()
	in.frame = nil
	return err
}

// FrameArea returns the memory a sigreturn frame borrows for each call,
// [lo, hi), or zeros without one.
func (in *Injector) FrameArea() (lo, hi uint64) {
	if in.frame == nil {
		return 0, 0
	}
	return in.frame.base, in.frame.base + uint64(len(in.frame.bytes))
}

// Guarded reports whether the injector's calls go through a sigreturn
// frame (SetSigreturn).
func (in *Injector) Guarded() bool { return in.frame != nil }

// makesTask: a call that makes a process or thread, which is stepped: made
// through the frame, the new task would return into the sigreturn sequence
// and run on as a copy of the thread.
func makesTask(nr uintptr) bool {
	switch nr {
	case unix.SYS_CLONE, unix.SYS_CLONE3, unix.SYS_FORK, unix.SYS_VFORK:
		return true
	}
	return false
}
