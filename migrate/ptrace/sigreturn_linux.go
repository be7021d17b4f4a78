package ptrace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// An injected call is only as safe as the moment the tracer could vanish
// in: a tracer SIGKILLed while the thread holds the call's registers (or
// sits in the single step's SIGTRAP stop) leaves the thread to run on
// from the syscall site with them — or to die of the trap. A seized
// injector given a sigreturn frame (SetSigreturn) closes that window. Its
// calls never let the thread return to user mode with borrowed registers:
//
//  1. a frame holding the thread's own state (the registers, a syscall it
//     was in rewound to be restarted as the kernel would, its signal mask,
//     its whole XSAVE area) is written below its stack's red zone, and the
//     thread is pointed at a "mov $15, %eax; syscall" sequence of its own
//     code (glibc's, musl's or Go's rt_sigreturn trampoline) with rsp at
//     the frame: let go there, it would restore itself with rt_sigreturn;
//  2. run with PTRACE_SYSCALL, it stops entering that rt_sigreturn; there
//     the call's number and arguments replace it, and rip is pointed at
//     the sequence again: let go now, the call runs and returns into the
//     sequence, which restores the thread;
//  3. at the call's exit stop its result is read, and the seized
//     injector's settle puts the registers back itself.
//
// Whenever the tracer dies, the thread ends exactly as it was, the call
// made or not: never on borrowed registers, never killed by a trap. The
// frame's altstack field is an invalid one (flags 3), which rt_sigreturn's
// restore_altstack refuses and ignores: the thread's own altstack stays.

// The rt_sigreturn sequences: "mov $15, %eax; syscall" and "mov $15, %rax; syscall".
var (
	GadgetEAX = []byte{0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05}
	GadgetRAX = []byte{0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05}
)

const (
	fpXStateMagic1 = 0x46505853
	fpXStateMagic2 = 0x46505845
	rtSigframeSize = 440 // pretcode, struct ucontext, siginfo
	ucFlags        = 1 | 2 | 4
	sysRtSigreturn = 15

	syscallEntry = 1 // PTRACE_EVENTMSG_SYSCALL_ENTRY
	syscallExit  = 2 // PTRACE_EVENTMSG_SYSCALL_EXIT
)

// sigFrame is a seized injector's rt_sigreturn frame.
type sigFrame struct {
	gadget    uint64 // the sequence's first byte
	gadgetLen int
	base      uint64 // frameScratch bytes for a query of ours, then the frame
	addr      uint64 // the frame (struct rt_sigframe); rsp = addr + 8
	bytes     []byte // the scratch, the frame and its XSAVE area, from base
	orig      []byte // what the thread's memory held there
	mem       *Mem
	// restarts caches, for signals 1–64, whether their handler has
	// SA_RESTART (bit sig-1), once known (bit in known).
	restarts, known uint64
	querying        bool // a query of ours for the frame is under way
	noneCaught      bool // no unblocked signal has a handler (nextCaught)
}

// frameScratch is the room below the frame for the result of a query the
// frame itself needs (rt_sigaction's old action).
const frameScratch = 32

// SetSigreturn makes in's calls safe against the tracer's death (see
// above). gadget is the address of GadgetEAX or GadgetRAX (gadgetLen
// bytes) in the tracee's executable memory; the frame is written below top and must not go below
// low (both within the writable area holding the thread's stack, below
// its red zone); xstate is the thread's XSAVE area as GetXState returns
// it. The thread must be seized with PTRACE_O_TRACESYSGOOD: its calls
// stop at syscall entry and exit, and a tracer that dies there leaves the
// stop's code to be sent to the thread as a signal, which SIGTRAP|0x80 is
// not (plain SIGTRAP would kill it). It fails, leaving in as it was, when
// the frame cannot be built.
// Runs on the tracer thread.
func (in *Injector) SetSigreturn(gadget uint64, gadgetLen int, low, top uint64, xstate []byte) error {
	if !in.seized {
		return errors.New("sigreturn frame: not a seized injector")
	}
	xs := len(xstate)
	if xs < 576 {
		return fmt.Errorf("sigreturn frame: xsave area of %d bytes", xs)
	}
	// PTRACE_GETREGSET puts the thread's XCR0 (its user features) where a
	// signal frame has its struct _fpx_sw_bytes; the frame gets those
	// (magic, sizes, the features) and the closing magic.
	xcr0 := binary.LittleEndian.Uint64(xstate[464:])
	if xcr0&3 != 3 {
		return fmt.Errorf("sigreturn frame: xsave area with features %#x", xcr0)
	}
	if xcr0&(3<<17) != 0 {
		// AMX: the regset is sized for tile data, a thread without
		// permission for it has a smaller signal frame, and
		// rt_sigreturn would take an oversized one for legacy FP/SSE
		// only, dropping the rest.
		return fmt.Errorf("sigreturn frame: AMX state (features %#x)", xcr0)
	}
	fp := (top - uint64(xs) - 4) &^ 63
	addr := ((fp - rtSigframeSize) &^ 15) - 8
	base := addr - frameScratch
	if top < uint64(xs)+4+rtSigframeSize+frameScratch+128 || base < low {
		return fmt.Errorf("sigreturn frame: no room below %#x (stack from %#x)", top, low)
	}
	b := make([]byte, fp+uint64(xs)+4-base)
	le := binary.LittleEndian
	f := b[frameScratch:]
	le.PutUint64(f[8:], ucFlags) // uc_flags: UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
	le.PutUint32(f[32:], 3)      // uc_stack.ss_flags: invalid, so the altstack is left alone
	r := *in.saved
	mc := f[48:304]
	le.PutUint16(mc[144:], uint16(r.Cs))
	le.PutUint16(mc[146:], uint16(r.Gs))
	le.PutUint16(mc[148:], uint16(r.Fs))
	le.PutUint16(mc[150:], uint16(r.Ss))
	le.PutUint64(mc[184:], fp) // fpstate
	le.PutUint64(f[304:], in.mask)
	x := b[fp-base:]
	copy(x, xstate)
	sw := x[464:512]
	clear(sw)
	le.PutUint32(sw[0:], fpXStateMagic1)
	le.PutUint32(sw[4:], uint32(xs+4)) // extended_size
	le.PutUint64(sw[8:], xcr0)
	le.PutUint32(sw[16:], uint32(xs)) // xstate_size
	le.PutUint32(x[xs:], fpXStateMagic2)
	in.frame = &sigFrame{gadget: gadget, gadgetLen: gadgetLen, base: base, addr: addr, bytes: b, mem: NewMem(in.Tid)}
	return nil
}

// ReleaseSigreturn puts back the memory the frame borrowed. Runs on the
// tracer thread.
func (in *Injector) ReleaseSigreturn() error {
	sf := in.frame
	if sf == nil || sf.orig == nil {
		return nil
	}
	if err := sf.mem.Write(sf.base, sf.orig); err != nil {
		return fmt.Errorf("thread %d: put back the sigreturn frame's memory: %w", in.Tid, err)
	}
	sf.orig = nil
	return nil
}

// frameSyscall runs one call through the frame (steps 1–3 above), leaving
// the thread in the call's exit stop for settle.
func (in *Injector) frameSyscall(nr uintptr, args []uintptr) (uintptr, error) {
	sf := in.frame
	if in.parked && !sf.querying {
		// In the last call's exit stop: on into the sequence's
		// rt_sigreturn, the frame written and the signals blocked.
		return in.frameCall(nr, args, time.Now().Add(in.bound()))
	}
	if sf.orig == nil {
		orig := make([]byte, len(sf.bytes))
		if err := sf.mem.Read(sf.base, orig); err != nil {
			return 0, fmt.Errorf("inject syscall %d: read the frame's memory: %w", nr, err)
		}
		sf.orig = orig
	}
	res, err := in.resumeRegs()
	if err != nil {
		return 0, fmt.Errorf("inject syscall %d: %w", nr, err)
	}
	mc := sf.bytes[frameScratch+48:]
	for i, v := range []uint64{res.R8, res.R9, res.R10, res.R11, res.R12, res.R13, res.R14, res.R15,
		res.Rdi, res.Rsi, res.Rbp, res.Rbx, res.Rdx, res.Rax, res.Rcx, res.Rsp, res.Rip, res.Eflags} {
		binary.LittleEndian.PutUint64(mc[i*8:], v)
	}
	if err := sf.mem.Write(sf.base, sf.bytes); err != nil {
		return 0, fmt.Errorf("inject syscall %d: write the sigreturn frame: %w", nr, err)
	}
	r := *in.saved
	r.Rip, r.Rsp, r.Orig_rax = sf.gadget, sf.addr+8, ^uint64(0)
	r.Eflags &^= 0x100
	if err := SetRegs(in.Tid, &r); err != nil {
		return 0, err
	}
	// Pointed at the frame, the thread may have its signals blocked
	// (Syscall): a tracer dying from here on leaves it to restore its own
	// mask from the frame.
	if err := SetSigmask(in.Tid, blockable); err != nil {
		return 0, fmt.Errorf("inject syscall %d: %w", nr, err)
	}
	in.step(5)
	in.step(1)
	return in.frameCall(nr, args, time.Now().Add(in.bound()))
}

// frameCall makes the call from the thread pointed at the sequence (or
// parked in the exit stop of the call before): stopped entering the
// sequence's rt_sigreturn, it is given the call there.
func (in *Injector) frameCall(nr uintptr, args []uintptr, deadline time.Time) (uintptr, error) {
	sf := in.frame
	cur, err := in.syscallStop(nr, syscallEntry, deadline)
	if err != nil {
		return 0, err
	}
	in.step(2)
	cur.setSyscall(uintptr(sf.gadget), nr, args)
	cur.Orig_rax = uint64(nr)
	if err := SetRegs(in.Tid, cur); err != nil {
		return 0, err
	}
	in.step(3)
	out, err := in.syscallStop(nr, syscallExit, deadline)
	if err != nil {
		return 0, err
	}
	in.step(4)
	ret := int64(out.Rax)
	if ret < 0 && ret > -4096 {
		return 0, syscall.Errno(-ret)
	}
	return uintptr(ret), nil
}

// frameStep is called at each step of a call made through a frame, the
// thread stopped there: 5 its signals blocked, 1 pointed at the sequence,
// 2 in the rt_sigreturn's entry stop, 3 given the call there, 4 in the
// call's exit stop, 6 its registers put back (settle). Tests set it to
// have the tracer die at a chosen step.
var frameStep = func(step int) {}

// step calls frameStep for a call through a frame but one of the frame's
// own queries (see handlerRestarts).
func (in *Injector) step(n int) {
	if in.frame != nil && !in.frame.querying {
		frameStep(n)
	}
}

// syscallStop resumes the thread with PTRACE_SYSCALL until it stops at a
// syscall entry or exit (kind) and returns its registers there; signals
// that stop it first are held in Signals, as during a stepped call.
func (in *Injector) syscallStop(nr uintptr, kind int, deadline time.Time) (*Regs, error) {
	for {
		if err := ContSyscall(in.Tid, 0); err != nil {
			return nil, fmt.Errorf("inject syscall %d: resume %d: %w", nr, in.Tid, err)
		}
		st, err := WaitTimeout(in.Tid, time.Until(deadline))
		if err != nil {
			return nil, fmt.Errorf("inject syscall %d: %w", nr, in.regainFrame(err))
		}
		if !st.Status.Stopped() {
			return nil, fmt.Errorf("inject syscall %d: tid %d %v", nr, in.Tid, st)
		}
		if st.Event() != 0 {
			continue // a PTRACE_EVENT_STOP: on
		}
		if st.Sig() != unix.SIGTRAP|0x80 {
			in.Signals = append(in.Signals, st.Sig())
			continue
		}
		msg, err := GetEventMsg(in.Tid)
		if err != nil {
			return nil, fmt.Errorf("inject syscall %d: %w", nr, err)
		}
		k := int(msg)
		r, err := GetRegs(in.Tid)
		if err != nil {
			return nil, err
		}
		if k != kind {
			return nil, fmt.Errorf("inject syscall %d: tid %d: syscall stop %d at %#x, want %d", nr, in.Tid, k, r.Rip, kind)
		}
		if kind == syscallEntry && (r.Orig_rax != sysRtSigreturn || r.Rip != in.frame.gadget+uint64(in.frame.gadgetLen)) {
			return nil, fmt.Errorf("inject syscall %d: tid %d entered syscall %d at %#x, not the sigreturn sequence", nr, in.Tid, int64(r.Orig_rax), r.Rip)
		}
		return r, nil
	}
}

// regainFrame, after err from waiting for a call made through the frame,
// interrupts a call that blocks: it returns from the kernel into its exit
// stop (or, woken before it ran, through the sigreturn sequence), where
// settle finds the thread. A thread that does not stop within a second
// is left running the call; the frame restores it when it returns.
func (in *Injector) regainFrame(err error) error {
	if !errors.Is(err, ErrTimeout) {
		return err
	}
	if Interrupt(in.Tid) != nil {
		return err
	}
	st, werr := WaitTimeout(in.Tid, time.Second)
	if werr != nil || !st.Status.Stopped() {
		return fmt.Errorf("%w; the thread is still in the call", err)
	}
	return fmt.Errorf("%w; the call was abandoned, the thread stopped", err)
}
