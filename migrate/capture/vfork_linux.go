package capture

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A parent waiting in vfork sleeps in the kernel's wait_for_vfork_done
// until its child execs or exits: an uninterruptible (killable) sleep that
// PTRACE_INTERRUPT does not end, so a freeze of it would wait for a stop
// that may never come. It is recognised before anything is attached: a
// thread in state D inside a clone, vfork or clone3 call, with a child
// that shares its memory (CLONE_VM, which a vfork child has until it
// execs). A parent that enters vfork after this check is caught by the
// bound on every ptrace wait (ptrace.StopTimeout), and then named again
// by vforkError.

// The system calls a vfork can be made with (x86-64).
var vforkCalls = map[int]bool{unix.SYS_CLONE: true, unix.SYS_VFORK: true, unix.SYS_CLONE3: true}

// vforkWait returns the thread of pid that waits in vfork and the child
// it waits for, or ok false.
func vforkWait(pid int) (tid, child int, ok bool) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, 0, false
	}
	for _, e := range ents {
		t, err := strconv.Atoi(e.Name())
		if err != nil || threadState(pid, t) != 'D' {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/syscall", pid, t))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			continue
		}
		nr, err := strconv.Atoi(f[0])
		if err != nil || !vforkCalls[nr] {
			continue
		}
		kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, t))
		if err != nil {
			continue
		}
		for _, k := range strings.Fields(string(kids)) {
			c, err := strconv.Atoi(k)
			if err != nil {
				continue
			}
			// kcmp(KCMP_VM): 0 when both use one memory.
			r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid), uintptr(c), 1, 0, 0, 0)
			if e == 0 && r == 0 {
				return t, c, true
			}
		}
	}
	return 0, 0, false
}

// threadState returns the state letter of /proc/PID/task/TID/stat, or 0.
func threadState(pid, tid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

// vforkError is the refusal for pid waiting in vfork, or nil. With wait,
// it first gives the child VforkExecWait to exec.
func vforkError(pid int, wait bool) error {
	if _, child, ok := vforkWait(pid); ok && !(wait && awaitExec(pid, child)) {
		return unsupported("waiting in vfork for its child %d (freeze it after %d execs or exits)", child, child)
	}
	return nil
}

// VforkExecWait bounds how long a freeze waits for a vfork child to exec
// (or exit), which ends its sharing of memory with its parent and the
// parent's wait: a child that execs at once (the usual vfork) is then
// frozen as any process, a parent as any parent; one that does not is
// refused with one line.
const VforkExecWait = 2 * time.Second

// awaitExec waits, at most VforkExecWait, until child no longer shares
// memory with parent (it exec'd or exited); it reports whether it did.
func awaitExec(parent, child int) bool {
	for deadline := time.Now().Add(VforkExecWait); ; time.Sleep(5 * time.Millisecond) {
		// kcmp(KCMP_VM): 0 when both use one memory; an error when
		// either is gone.
		r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(parent), uintptr(child), 1, 0, 0, 0)
		if e != 0 || r != 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// vforkChildError is the refusal for pid, a vfork child that has not
// exec'd within VforkExecWait (its parent ppid waits for it), or nil
// once it has.
func vforkChildError(pid, ppid int) error {
	if _, child, ok := vforkWait(ppid); !ok || child != pid || awaitExec(ppid, pid) {
		return nil
	}
	return unsupported("a vfork child of %d that has not exec'd within %v (freeze it after it execs)", ppid, VforkExecWait)
}
