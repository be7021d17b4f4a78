package ptrace

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// What a thread let go from a sigreturn frame resumes with. rt_sigreturn
// restores the registers with orig_rax -1, so the kernel's own handling of
// a system call the thread was stopped in (arch/x86/kernel/signal.c:
// handle_signal, arch_do_signal_or_restart) does not happen: the frame
// must carry its outcome, as the kernel would decide it were the thread let
// go at that moment (it is written again before each call):
//
//   - a signal with a handler, pending and not blocked, is taken first (the
//     first the kernel would dequeue: the thread's own before the
//     process's, synchronous ones first, then the lowest): the call ends
//     with EINTR (ERESTARTNOHAND, ERESTART_RESTARTBLOCK, ERESTARTSYS
//     without SA_RESTART) or is made again after the handler (ERESTARTSYS
//     with SA_RESTART, ERESTARTNOINTR). The handler's SA_RESTART is asked
//     of the thread (rt_sigaction, through a frame) the first time it
//     matters (if the thread's seccomp filters let it: Check); a tracer
//     that dies during that one query, or a filter that refuses it,
//     leaves the call to be made again after the handler, as with
//     SA_RESTART (what signal(3) installs and Go's runtime asks for);
//   - otherwise the call is made again. One stopped with
//     ERESTART_RESTARTBLOCK cannot go through restart_syscall: rt_sigreturn
//     points the restart block at do_no_restart_syscall, an EINTR no
//     signal caused. It is made anew instead: nanosleep and a relative
//     clock_nanosleep for what remained (the kernel wrote it to rem when
//     the call was interrupted), the others (futex and poll with a
//     relative timeout) with their whole timeout again: a sleep made
//     longer, never cut short. A thread stopped in restart_syscall itself
//     (its call restarted once already) gets the EINTR.
//
// A signal that arrives during the call itself (during a chain of calls,
// Injector.Chain: any of them), in the moment the tracer dies in, is taken
// after the restart.

// syncSignals are dequeued before any other (kernel/signal.c
// SYNCHRONOUS_MASK).
const syncSignals = 1<<(unix.SIGSEGV-1) | 1<<(unix.SIGBUS-1) | 1<<(unix.SIGILL-1) |
	1<<(unix.SIGTRAP-1) | 1<<(unix.SIGFPE-1) | 1<<(unix.SIGSYS-1)

const saRestart = 0x10000000

// eintr64 is EINTR as a variable: its negation is a register value.
var eintr64 = int64(unix.EINTR)

// resumeRegs returns the registers the frame restores (see above).
func (in *Injector) resumeRegs() (Regs, error) {
	r := *in.saved
	if int64(r.Orig_rax) < 0 {
		return r, nil
	}
	code := -int64(r.Rax)
	switch code {
	case ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK:
	default:
		return r, nil
	}
	if code != ERESTARTNOINTR {
		sig, err := in.nextCaught()
		if err != nil {
			return r, err
		}
		eintr := sig != 0
		if sig != 0 && code == ERESTARTSYS {
			restart, err := in.handlerRestarts(sig)
			if err != nil {
				return r, err
			}
			eintr = !restart
		}
		if eintr {
			r.Rax = uint64(-int64(eintr64))
			return r, nil
		}
	}
	r.Rax, r.Rip = r.Orig_rax, r.Rip-2
	if code == ERESTART_RESTARTBLOCK {
		switch r.Orig_rax {
		case unix.SYS_NANOSLEEP:
			if r.Rsi != 0 {
				r.Rdi = r.Rsi // nanosleep(rem, rem)
			}
		case unix.SYS_CLOCK_NANOSLEEP:
			if r.R10 != 0 {
				r.Rdx = r.R10 // clock_nanosleep(clock, 0, rem, rem)
			}
		}
	}
	return r, nil
}

// nextCaught returns the signal with a handler the thread would take first
// if let go with its own mask, or 0. A thread none of whose unblocked
// signals has a handler is not asked again (/proc/TID/status costs some
// 30 µs a read): the process, stopped, installs none meanwhile.
func (in *Injector) nextCaught() (int, error) {
	if in.frame.noneCaught {
		return 0, nil
	}
	path := "/proc/" + strconv.Itoa(in.Tid) + "/status"
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("pending signals of thread %d: %w", in.Tid, err)
	}
	var own, shared, caught uint64
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		var dst *uint64
		switch k {
		case "SigPnd":
			dst = &own
		case "ShdPnd":
			dst = &shared
		case "SigCgt":
			dst = &caught
		default:
			continue
		}
		if *dst, err = strconv.ParseUint(strings.TrimSpace(v), 16, 64); err != nil {
			return 0, fmt.Errorf("%s: %s: %w", path, k, err)
		}
	}
	if caught&^in.mask == 0 {
		in.frame.noneCaught = true
		return 0, nil
	}
	for _, set := range []uint64{own, shared} {
		set &^= in.mask
		for _, m := range []uint64{set & syncSignals, set} {
			for sig := 1; sig <= 64; sig++ {
				bit := uint64(1) << (sig - 1)
				if m&bit != 0 && caught&bit != 0 {
					return sig, nil
				}
			}
		}
	}
	return 0, nil
}

// handlerRestarts reports whether sig's handler has SA_RESTART, asked of
// the thread once (the old action of rt_sigaction, into the frame's
// scratch). The query's own frame takes the restart.
func (in *Injector) handlerRestarts(sig int) (bool, error) {
	sf := in.frame
	bit := uint64(1) << (sig - 1)
	if sf.known&bit != 0 {
		return sf.restarts&bit != 0, nil
	}
	if sf.querying {
		return true, nil
	}
	args := []uintptr{uintptr(sig), 0, uintptr(sf.base), 8}
	if in.Check != nil && in.Check(unix.SYS_RT_SIGACTION, sf.gadget, args) != nil {
		// Not to be asked (the thread's seccomp filters): taken to
		// restart, as during the query.
		sf.known |= bit
		sf.restarts |= bit
		return true, nil
	}
	sf.querying = true
	_, err := in.frameSyscall(unix.SYS_RT_SIGACTION, args)
	sf.querying = false
	if err != nil {
		return false, fmt.Errorf("handler of signal %d: %w", sig, err)
	}
	var act [frameScratch]byte
	if err := sf.mem.Read(sf.base, act[:]); err != nil {
		return false, fmt.Errorf("handler of signal %d: %w", sig, err)
	}
	sf.known |= bit
	if binary.LittleEndian.Uint64(act[8:])&saRestart != 0 {
		sf.restarts |= bit
	}
	return sf.restarts&bit != 0, nil
}
