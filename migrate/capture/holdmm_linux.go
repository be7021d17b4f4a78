package capture

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// A halted process's PID before its memory. The copy of a process moved
// on the same host needs the original's PID, which is free only once the
// original is reaped, and its exit frees its memory first (exit_mm, before
// it becomes a zombie): about 100 ms a GiB on one core, all of it in the
// stop. So, at the stop, one clone injected into the main thread (as for a
// copy-on-write checkpoint, forksnap_linux.go) makes a holder: a process
// that shares the memory (CLONE_VM). The original's exit then only drops a
// reference to it, and its PID is free at once; the holder is let go to
// exit once the receiver was told to start the copy, and its own exit frees
// the memory, off the stop, at idle priority.
//
// The holder is a snapshot child (forksnap_linux.go) in all but its clone
// flags, and so it is as hard to see: it never runs an instruction of the
// program's (born traced, in a stop; armed to exit_group if we die), its
// exit signal is 0 (no SIGCHLD, not seen by wait without __WALL or
// __WCLONE), and when the freeze fails it is killed and reaped by a wait4
// injected into the still-stopped original, before the original runs
// again. After a kill it has been handed to the original's reaper (init or
// a subreaper) with the original's other children, as they are.
//
// It must not keep the original's files open once the original is dead (a
// listening socket, a pipe's write end whose reader waits for EOF): born
// with CLONE_FILES (no reference to each file taken), it is then made to
// run close_range(0, ~0, CLOSE_RANGE_UNSHARE), which gives it a table of
// its own, empty, and leaves the original's alone.

// holdFlags: a process sharing the memory, the fd table (until the
// close_range) and the filesystem context, with no exit signal.
const holdFlags = unix.CLONE_VM | unix.CLONE_FILES | unix.CLONE_FS

// closeRangeAll is close_range's first, last and flags for the holder.
var closeRangeAll = []uint64{0, 1<<32 - 1, unix.CLOSE_RANGE_UNSHARE}

// makeHolder makes f's holder; nil and a reason when it cannot be made
// (the kill then frees the memory before the PID, as without it).
// Runs on the tracer thread.
func (f *Frozen) makeHolder() (*snapshot, error) {
	// Its files let go in its first stop, where it still carries the
	// options it was born with: killed if we die during the call
	// (PTRACE_O_EXITKILL), rather than let go after it into the
	// program's code, with the program's memory.
	closeFiles := func(s *snapshot) error {
		in, err := ptrace.NewSeizedInjector(s.pid, uintptr(s.site))
		if err == nil {
			_, err = in.Syscall(unix.SYS_CLOSE_RANGE, uintptr(closeRangeAll[0]), uintptr(closeRangeAll[1]), uintptr(closeRangeAll[2]))
		}
		if err != nil {
			return fmt.Errorf("close its files: %w", err)
		}
		return nil
	}
	s, err := f.forkWith(holdFlags, []childCall{{"close_range", unix.SYS_CLOSE_RANGE, closeRangeAll}}, closeFiles)
	if err != nil {
		return nil, fmt.Errorf("holder: %w", err)
	}
	return s, nil
}

// hold gives f a holder, saying in a notice why if it cannot.
func (f *Frozen) hold() {
	err := f.tr.Do(func() (err error) {
		f.holder, err = f.makeHolder()
		return err
	})
	if err != nil && f.socks.notice != nil {
		f.socks.notice(fmt.Sprintf("halt %d: %v: its memory is freed before its PID, in the stop", f.Pid, err))
	}
}

// dropHolder kills f's holder while f is still stopped and has f reap it
// (the freeze failed: f runs on). Runs on the tracer thread.
func (f *Frozen) dropHolder() {
	if f.holder == nil {
		return
	}
	f.discard(f.holder.pid)
	f.holder.mem.Close()
	f.holder = nil
}

// releaseHolder ends the holder of a killed f: it is let go where armExit
// parked it, on an exit_group, and once its exit dropped the memory (and
// with it the program's look in /proc) the teardown that frees it goes on
// with nobody waiting for it, in the idle scheduling class (SCHED_IDLE),
// so that it takes no core from the copy that starts beside it (on two
// busy cores it delayed the copy's start by as long: 100 ms a GiB). Its
// remains go to the reaper the original's children went to (reaped here
// if that is us). A holder not found parked as armed is killed and waited
// for instead.
func (f *Frozen) releaseHolder() {
	if f.holder == nil {
		return
	}
	h := f.holder
	f.holder = nil
	f.tr.Do(func() error {
		// Every signal blocked: none can run a handler of the
		// program's in it on its way to the exit_group.
		r, err := ptrace.GetRegs(h.pid)
		if err == nil {
			err = ptrace.SetSigmask(h.pid, ^uint64(0))
		}
		// Its parent now: the reaper the original's children went to,
		// read before it is let go.
		ours := ourChild(h.pid)
		if err == nil && r.Rip == h.site && r.Rax == unix.SYS_EXIT_GROUP && r.Rdi == snapshotExitCode && ptrace.Detach(h.pid, 0) == nil {
			h.mem.Close()
			// Until its exit drops the memory it looks like the
			// program (/proc's exe and cmdline are the memory's): it
			// gets there at the priority it has, then is moved to
			// the idle class for the teardown that follows.
			mmDropped(h.pid)
			unix.SchedSetAttr(h.pid, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE}, 0)
			if ours {
				// We are that reaper (an agent running as a PID
				// namespace's init, or a subreaper), which must
				// never wait for any child: this one is waited for
				// by its PID. The wait ends with its exit, which
				// the exit_group it was let go to makes.
				go unix.Wait4(h.pid, nil, unix.WALL, nil)
			}
			return nil
		}
		h.kill()
		return nil
	})
}

// mmDropped waits, up to ptrace.StopTimeout, until pid has no memory of
// its own any more (its /proc exe link is gone): the first step of its
// exit, or gone.
func mmDropped(pid int) {
	path := procfs.Path(pid, "exe")
	deadline := time.Now().Add(ptrace.StopTimeout)
	for pause := 20 * time.Microsecond; time.Now().Before(deadline); pause = min(2*pause, time.Millisecond) {
		if _, err := os.Readlink(path); err != nil {
			return
		}
		time.Sleep(pause)
	}
}
