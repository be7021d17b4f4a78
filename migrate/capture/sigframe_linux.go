package capture

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Injected calls and our death. A tracer that dies while a thread runs an
// injected call leaves it on borrowed registers (or kills it with the
// step's trap): pfreeze or a source pclusterd SIGKILLed in the first
// milliseconds of a capture would take the process with it. Where the
// process has an rt_sigreturn sequence of its own ("mov $15, %eax;
// syscall": glibc's and musl's __restore_rt, Go's sigreturn) and its
// thread room below the stack's red zone, each call goes through a
// sigreturn frame of the thread's own state instead (ptrace.SetSigreturn):
// whenever we die, the thread restores itself. Without one (a static
// program that never installs a handler, a thread with a shadow stack,
// whose rt_sigreturn would want a token, a thread whose seccomp filters
// refuse rt_sigreturn), calls are stepped as before and the window is one
// call long. A thread whose stack pointer is not in a thread stack
// (threadStack) has its frame moved onto its altstack, armed and unused,
// once the first call (sigaltstack) has told where it is.

// seizeOptions are the ptrace options of a captured thread: a call made
// through a sigreturn frame stops at syscall entry and exit, and a tracer
// that dies there must not leave a SIGTRAP to the thread (the kernel sends
// the stop's code as a signal, and SIGTRAP|0x80 is none).
const seizeOptions = unix.PTRACE_O_TRACESYSGOOD

// gadgetChunk is how much of an executable mapping is read at a time.
const gadgetChunk = 256 << 10

// sigreturnGadget returns the address of a "mov $15, %eax|%rax; syscall"
// sequence in pid's readable executable memory (libc first), or 0.
func sigreturnGadget(mem *ptrace.Mem, maps []procfs.Mapping) (uint64, int) {
	var order []procfs.Mapping
	for _, m := range maps {
		if m.Exec() && m.Readable() && !strings.HasPrefix(m.Path, "[") {
			if strings.Contains(m.Path, "libc") {
				order = append([]procfs.Mapping{m}, order...)
			} else {
				order = append(order, m)
			}
		}
	}
	buf := make([]byte, gadgetChunk)
	const overlap = 16
	for _, m := range order {
		for at := m.Start; at < m.End; at += gadgetChunk - overlap {
			n := min(m.End-at, gadgetChunk)
			if mem.Read(at, buf[:n]) != nil {
				break
			}
			for _, g := range [][]byte{ptrace.GadgetRAX, ptrace.GadgetEAX} {
				if i := bytes.Index(buf[:n], g); i >= 0 {
					return at + uint64(i), len(g)
				}
			}
			if at+n >= m.End {
				break
			}
		}
	}
	return 0, 0
}

// shadowStack reports whether tid runs with a user shadow stack (CET).
func shadowStack(pid, tid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", pid, tid))
	if err != nil {
		return true // unknown: do not risk it
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "x86_Thread_features:"); ok {
			return strings.Contains(v, "shstk")
		}
	}
	return false
}

// gadget finds (once) the process's rt_sigreturn sequence.
func (f *Frozen) gadget(maps []procfs.Mapping) (uint64, int) {
	if !f.gadgetSought {
		f.gadgetSought = true
		f.gadgetAt, f.gadgetLen = sigreturnGadget(f.mem, maps)
	}
	return f.gadgetAt, f.gadgetLen
}

// guardCalls gives th's injector a sigreturn frame below its stack's red
// zone and the scratch memory, not below low (0: the mapping's start),
// when it can (see above). Runs on the tracer thread.
func guardCalls(in *ptrace.Injector, gadget uint64, gadgetLen int, pid, tid int, rsp uint64, maps []procfs.Mapping, xstate []byte, low uint64) {
	if gadget == 0 || shadowStack(pid, tid) {
		return
	}
	// Let go by a dead tracer, the thread makes the rt_sigreturn: a
	// filter that refuses it would kill the process for it or, with
	// EPERM, leave the thread to run on from the sequence on our
	// registers.
	if ok, err := seccompAllows(pid, tid, uintptr(gadget)+uintptr(gadgetLen), unix.SYS_RT_SIGRETURN); err != nil || !ok {
		return
	}
	top := (rsp - 128 - scratchLen - 64) &^ 63
	for _, m := range maps {
		if m.Start <= top && rsp <= m.End && m.Writable() && !m.Shared() {
			// Without a frame (an xsave area of another layout, no
			// room) calls are stepped, as they always were.
			in.SetSigreturn(gadget, gadgetLen, max(m.Start, low), top, xstate)
			return
		}
	}
}

// threadStack reports whether rsp lies in a stack the kernel or libc laid
// out for a thread: the main thread's [stack], or a mapping right above a
// guard (an inaccessible mapping ending where it starts), as glibc's and
// musl's thread stacks are. Below rsp there, down to the mapping's start,
// is the thread's own to lend. Elsewhere (a coroutine's stack or a
// goroutine's, in the heap) its stack may end just below rsp, and what
// lies below is someone else's.
func threadStack(maps []procfs.Mapping, rsp uint64) bool {
	for i, m := range maps {
		if m.Start < rsp && rsp <= m.End {
			if m.Path == "[stack]" {
				return true
			}
			return i > 0 && maps[i-1].End == m.Start && strings.HasPrefix(maps[i-1].Perms, "---")
		}
	}
	return false
}
