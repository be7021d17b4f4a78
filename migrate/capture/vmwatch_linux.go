package capture

import (
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
)

// The VmFlags of a live migration's areas, without smaps at the stop.
//
// The flags the receiver re-applies (mlock, madvise's DONTFORK,
// WIPEONFORK, HUGEPAGE, DONTDUMP...) are only in /proc/PID/smaps, and
// reading it walks every page table of the process: 16-19 ms a GiB, with
// the process stopped. So a live migration reads smaps while the process
// runs (before its first round) and at the stop only maps, which walks
// none, taking each area's flags from the earlier read when its maps line
// is the same. Most changes of flags show in maps (an area split, merged,
// moved, its protection or name), but not all: madvise or mlock of a
// whole area, an area unmapped and mapped again as it was, exec. Those
// take calls of the process, and the calls are counted: every thread
// carries counters of the calls that can change an area's flags
// (perf_event_open of syscall tracepoints, inherited by the threads and
// processes it makes), opened before the pre-copy's first stop; at that
// stop no call of the process is under way (a stopped thread is never
// inside one; an interrupted call enters again), so every call that
// changes flags after it is counted, and smaps is read after it. A
// thread found at that stop that was not there when they were opened
// gives them up (its maker's counters may not have been open yet when
// it was made). If any counted a
// call by the stop, smaps is read at the stop, as without the counters;
// so it is too when they cannot be opened (no tracefs, no perf), an area
// is new or changed in maps, or the process has too many threads.
//
// Counted: munmap, brk, mremap, shmat, shmdt, mlock, mlock2, munlock,
// mlockall, munlockall, mseal, prctl (any: PR_SET_MEMORY_MERGE marks
// every area mergeable), remap_file_pages, process_madvise, execve,
// execveat; madvise but for the advice that sets no flag (WILLNEED,
// DONTNEED, FREE, REMOVE, COLD, PAGEOUT, POPULATE_*, DONTNEED_LOCKED:
// glibc's free gives pages back with DONTNEED); mmap
// with MAP_FIXED (without it, an mmap replaces nothing: an area ends in
// the same place only after one of the others removed the old one).
// Not counted: userfaultfd registration (the receiver re-applies none of
// its flags), mprotect (it changes the protection, which maps shows),
// io_uring's madvise (an io_uring fd is refused at the stop).
//
// One tracepoint a call, not raw_syscalls/sys_enter filtered by number:
// that one's handler builds a record for every call of every process on
// the host while the counters are open, the rounds' own calls included.
var vmFlagCalls = []struct{ event, filter string }{
	{"syscalls/sys_enter_munmap", ""},
	{"syscalls/sys_enter_brk", ""},
	{"syscalls/sys_enter_mremap", ""},
	{"syscalls/sys_enter_shmat", ""},
	{"syscalls/sys_enter_shmdt", ""},
	{"syscalls/sys_enter_mlock", ""},
	{"syscalls/sys_enter_mlock2", ""},
	{"syscalls/sys_enter_munlock", ""},
	{"syscalls/sys_enter_mlockall", ""},
	{"syscalls/sys_enter_munlockall", ""},
	{"syscalls/sys_enter_mseal", ""},
	{"syscalls/sys_enter_prctl", ""},
	{"syscalls/sys_enter_remap_file_pages", ""},
	{"syscalls/sys_enter_process_madvise", ""},
	{"syscalls/sys_enter_execve", ""},
	{"syscalls/sys_enter_execveat", ""},
	{"syscalls/sys_enter_madvise", "behavior != 3 && behavior != 4 && behavior != 8 && behavior != 9 && behavior != 20 && behavior != 21 && behavior != 22 && behavior != 23 && behavior != 24"},
	{"syscalls/sys_enter_mmap", "flags & 16"},
}

// maxWatchedThreads bounds the counters opened (one a call a thread).
const maxWatchedThreads = 32

// vmWatch counts pid's calls that can change its areas' flags, and
// holds the flags read while it ran.
type vmWatch struct {
	pid   int
	tids  []int // the threads with counters (and a zombie main thread)
	fds   []int
	base  uint64            // the calls counted by the first stop (stopped)
	flags map[string]string // by maps line (mapKey): VmFlags
}

// startVMWatch opens the counters on every thread of pid; nil when they
// cannot be opened. They count from the next stop on (stopped).
func startVMWatch(pid int) *vmWatch {
	tids, err := procfs.Tasks(pid)
	if err != nil || len(tids) > maxWatchedThreads {
		return nil
	}
	w := &vmWatch{pid: pid, tids: tids}
	for _, c := range vmFlagCalls {
		id, err := tracepointID(c.event)
		if err != nil {
			w.release()
			return nil
		}
		for _, tid := range tids {
			fd, err := openTracepointCounter(tid, id, c.filter)
			if err == unix.ESRCH {
				continue // a zombie main thread: it makes no calls
			}
			if err != nil {
				w.release()
				return nil
			}
			w.fds = append(w.fds, fd)
		}
	}
	return w
}

// stopped returns w once pid is stopped, all of its threads, if every
// thread has counters; else it gives them up (nil).
func (w *vmWatch) stopped(pid int) *vmWatch {
	if w == nil {
		return nil
	}
	tids, err := procfs.Tasks(pid)
	if err != nil {
		w.release()
		return nil
	}
	for _, t := range tids {
		if !slices.Contains(w.tids, t) {
			w.release()
			return nil
		}
	}
	// Calls made before the stop are over, their changes done: the
	// smaps read after it sees them.
	if w.base, err = w.calls(); err != nil {
		w.release()
		return nil
	}
	return w
}

func tracepointID(event string) (uint64, error) {
	var err error
	for _, dir := range []string{"/sys/kernel/tracing/events/", "/sys/kernel/debug/tracing/events/"} {
		var b []byte
		if b, err = os.ReadFile(dir + event + "/id"); err == nil {
			return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		}
	}
	return 0, err
}

// calls returns how many counted calls pid made since the counters were
// opened; w.base of them by the stop.
func (w *vmWatch) calls() (uint64, error) {
	var n uint64
	var b [8]byte
	for _, fd := range w.fds {
		if k, err := unix.Read(fd, b[:]); err != nil || k != 8 {
			return 0, fmt.Errorf("syscall counter: %d bytes: %v", k, err)
		}
		n += binary.NativeEndian.Uint64(b[:])
	}
	return n, nil
}

// readFlags reads the areas' flags from rd's smaps (rd: the thread
// through which pid's /proc is read), while the process runs, unless a
// call was counted already (they would be read at the stop anyway).
func (w *vmWatch) readFlags(rd int) {
	if len(w.fds) == 0 {
		return
	}
	if n, err := w.calls(); err != nil || n != w.base {
		return
	}
	maps, err := procfs.Maps(rd)
	if err != nil {
		return
	}
	w.flags = map[string]string{}
	for _, m := range maps {
		w.flags[mapKey(&m)] = m.VmFlags
	}
}

// layout returns rd's areas with their flags, the process stopped: from
// maps and the flags read while it ran, if no call could have changed
// them since; ok false if smaps must be read.
func (w *vmWatch) layout(rd int) (maps []procfs.Mapping, ok bool, err error) {
	if w == nil || w.flags == nil || len(w.fds) == 0 {
		return nil, false, nil
	}
	if n, err := w.calls(); err != nil || n != w.base {
		return nil, false, nil
	}
	if maps, err = procfs.MapsLayout(rd); err != nil {
		return nil, false, err
	}
	for i := range maps {
		fl, found := w.flags[mapKey(&maps[i])]
		if !found {
			return nil, false, nil
		}
		maps[i].VmFlags = fl
	}
	return maps, true, nil
}

// takeFlags gives f, stopped, the areas with the flags pc's watch read
// while it ran, if they are still right (before any call is injected
// into f: those are counted too); ok false if gather must read smaps.
func (f *Frozen) takeFlags(pc *precopy) (ok bool, err error) {
	f.flagsMaps, ok, err = pc.watch.layout(f.rd)
	return ok, err
}

func mapKey(m *procfs.Mapping) string {
	return fmt.Sprintf("%x-%x %s %x %s %d %s", m.Start, m.End, m.Perms, m.Offset, m.Dev, m.Inode, m.Path)
}

// release closes the counters in a goroutine of its own, which ends
// once they are closed: closing the last counter of a tracepoint waits
// for an RCU grace period before it returns (0.6-0.8 s for the 18
// tracepoints, measured), and nothing needs to wait for that. A
// process that exits first has the kernel close them.
func (w *vmWatch) release() {
	if w == nil || len(w.fds) == 0 {
		return
	}
	fds := w.fds
	w.fds = nil
	go func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
}
