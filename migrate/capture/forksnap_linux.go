package capture

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Copy-on-write checkpoints. A checkpoint that leaves the process running
// (no halt, no pre-copy) stops it only to describe it and to fork it: one
// clone injected into the stopped main thread makes a child whose memory
// is the process's at that instant, copy-on-write, the way redis' BGSAVE
// and DMTCP's forked checkpointing snapshot a process. The process then
// runs on while its memory is read from the child, which never runs a
// single instruction of its own (it is born traced, in a stop) and is
// killed once it is read.
//
// The child is made so that the program can hardly tell:
//   - its exit signal is 0: no SIGCHLD, and wait(-1), waitpid(-1) and
//     waitid(P_ALL) without __WALL or __WCLONE neither see nor reap it; its
//     remains are reaped by a wait4 injected into the process once it is
//     killed (the process is stopped again for that one call, one thread
//     of it only);
//   - CLONE_FILES: it shares the fd table instead of holding a second
//     reference to every open file (a pipe's reader would not see EOF, a
//     socket would not close, while it lives);
//   - born with PTRACE_O_EXITKILL: if pfreeze dies, the kernel kills it.
//
// What a fork does not copy is read during the stop: shared memory
// (MAP_SHARED anonymous areas; the contents of memfds, SysV segments and
// deleted files, which go into File records), areas marked
// MADV_DONTFORK (absent from the child) and MADV_WIPEONFORK (zero in it).
// Private file pages still the file's are mapped from the file again at
// restore, as without copy-on-write.
//
// Userfaultfd write-protection (register the memory, protect it, save each
// page before a write goes through) was the other way; it cannot be made
// exact: madvise(MADV_DONTNEED) and munmap only report UFFD_EVENT_REMOVE
// and UFFD_EVENT_UNMAP, completed as soon as they are read, and drop the
// pages right after, so a page freed before it was copied is lost. A
// fork's child keeps them. (docs/pfreeze.md, "Leave-running checkpoints".)

// COWStats report what a leave-running checkpoint did.
type COWStats struct {
	// Stop is how long the process (every member of a tree) was stopped:
	// from the start of the attach to the release of its last thread.
	Stop time.Duration
	// Copy is the time from the release to the end of the snapshot.
	Copy time.Duration
	// Fork is the time the injected clones took (a part of Stop).
	Fork time.Duration
	// StopBytes is the page contents read during the stop (shared memory,
	// areas a fork does not copy).
	StopBytes uint64
	// Fallback: no snapshot child could be made (its notice says why),
	// and the process was stopped for the whole copy.
	Fallback bool
}

// cowRun is the state one checkpoint shares between its members.
type cowRun struct {
	t0       time.Time
	released time.Time
	stats    *COWStats
	notice   func(string)
}

func (c *cowRun) say(s string) {
	if c.notice != nil {
		c.notice(s)
	}
}

// snapshot is the child that holds a copy-on-write view of a stopped
// process's memory.
type snapshot struct {
	pid    int // in our PID namespace
	nsPid  int // as its parent knows it (the process's PID namespace)
	parent int
	site   uint64 // a syscall instruction in the parent, for the reaping wait4
	mem    *ptrace.Mem
}

// cloneSnapshotFlags: a process (not a thread) sharing the fd table and
// the filesystem context, with no exit signal.
const cloneSnapshotFlags = unix.CLONE_FILES | unix.CLONE_FS

// fork makes the snapshot child of the stopped process f through its
// main thread, whose injector gather made. A process whose main thread's
// seccomp filters would not let the clone through as it is (refuse it,
// trap it, kill the process for it) is not forked: errNoFork, and the
// caller copies while it is stopped. Runs on the tracer thread.
func (f *Frozen) fork() (*snapshot, error) { return f.forkWith(cloneSnapshotFlags, nil, nil) }

// childCall is a system call a child made by forkWith will have to run:
// the seccomp filters it inherits must allow it.
type childCall struct {
	name string
	nr   uintptr
	args []uint64
}

// forkWith is fork with the clone flags (the exit signal always 0) and the
// calls (more) the child will be made to run besides its exit_group;
// prepare, if set, runs them in its first stop, while it still carries
// the options it was born with (PTRACE_O_EXITKILL among them), before
// armExit. Runs on the tracer thread.
func (f *Frozen) forkWith(cloneFlags uintptr, more []childCall, prepare func(*snapshot) error) (*snapshot, error) {
	th := f.threads[0]
	if th.in == nil {
		return nil, errNoFork{"no injector on the main thread"}
	}
	defer f.requeueLate(th, len(th.in.Signals))
	// The clone runs through the thread's seccomp filters, and so do the
	// child's exit_group and the wait4 that reaps it: all must be
	// allowed as they are, or a filter might kill the process for one.
	for _, c := range append([]childCall{{"clone", unix.SYS_CLONE, []uint64{uint64(cloneFlags)}}, {"exit_group", unix.SYS_EXIT_GROUP, []uint64{snapshotExitCode}},
		{"wait4", unix.SYS_WAIT4, []uint64{0, 0, unix.WNOHANG | unix.WALL}}}, more...) {
		ok, err := seccompAllows(f.rd, th.tid, th.in.Site, c.nr, c.args...)
		if err != nil {
			return nil, errNoFork{fmt.Sprintf("thread %d: seccomp filters: %v", th.tid, err)}
		}
		if !ok {
			return nil, errNoFork{fmt.Sprintf("thread %d: its seccomp filters do not allow %s", th.tid, c.name)}
		}
	}
	f.reapRemains()
	// The child inherits these options: born traced by us (TRACECLONE:
	// its exit signal is not SIGCHLD) and killed if we die (EXITKILL).
	// The process's own thread carries EXITKILL for this one call only.
	if err := ptrace.SetOptions(th.tid, seizeOptions|unix.PTRACE_O_TRACECLONE|unix.PTRACE_O_EXITKILL); err != nil {
		return nil, fmt.Errorf("thread %d: ptrace options: %w", th.tid, err)
	}
	th.in.NewChild = 0
	_, cerr := th.in.Syscall(unix.SYS_CLONE, cloneFlags, 0, 0, 0, 0)
	child := th.in.NewChild
	if err := ptrace.SetOptions(th.tid, seizeOptions); err != nil {
		if child > 0 {
			f.discard(child)
		}
		return nil, fmt.Errorf("thread %d: ptrace options: %w", th.tid, err)
	}
	if cerr != nil {
		if child > 0 {
			f.discard(child)
		}
		var errno unix.Errno
		if errors.As(cerr, &errno) {
			// Refused by the kernel (pids limit, memory): the process
			// is unharmed.
			return nil, errNoFork{fmt.Sprintf("fork: %v", errno)}
		}
		return nil, fmt.Errorf("fork: %w", cerr)
	}
	if child <= 0 {
		return nil, errors.New("fork: no child reported")
	}
	s := &snapshot{pid: child, parent: f.Pid, site: uint64(th.in.Site), mem: ptrace.NewMem(child)}
	// Its first stop, before any instruction of its own: born seized,
	// it stops in PTRACE_EVENT_STOP, and is never let go from there.
	if st, err := ptrace.Wait(child); err != nil || !st.IsEventStop() {
		f.discard(child)
		if err == nil {
			err = fmt.Errorf("stopped with %v", st)
		}
		return nil, fmt.Errorf("fork: child %d: %w", child, err)
	}
	var err error
	if s.nsPid, err = nsPidOf(f.rd, child); err != nil {
		f.discard(child)
		return nil, fmt.Errorf("fork: child %d: %w", child, err)
	}
	if prepare != nil {
		if err := prepare(s); err != nil {
			f.discard(child)
			return nil, fmt.Errorf("child %d: %w", child, err)
		}
	}
	if err := armExit(child, s.site); err != nil {
		f.discard(child)
		return nil, fmt.Errorf("fork: child %d: %w", child, err)
	}
	return s, nil
}

// requeueLate hands the signals a call injected into th after describe
// dequeued (from its injector's n-th on) to Resume, which queues them
// again: they came after the snapshot's instant, and the process must
// not lose them.
func (f *Frozen) requeueLate(th *thread, n int) {
	if len(th.in.Signals) > n {
		th.requeue = append(th.requeue, th.in.Signals[n:]...)
		th.in.Signals = th.in.Signals[:n]
	}
}

// snapshotExitCode is the exit status of a snapshot child: with an exit
// signal of 0 it marks the zombie a pfreeze that died left behind
// (isSnapshotRemains), so that later freezes neither take it for a
// child of the program nor leave it there.
const snapshotExitCode = 0x70

// armExit points the stopped child at exit_group(snapshotExitCode) on a
// syscall instruction and drops its PTRACE_O_EXITKILL: if we die from
// here on, the kernel lets it go and it exits at once, marked; our own
// release lets it go there too. Runs on the tracer thread.
func armExit(child int, site uint64) error {
	r, err := ptrace.GetRegs(child)
	if err != nil {
		return err
	}
	r.Rip, r.Rax, r.Orig_rax, r.Rdi = site, unix.SYS_EXIT_GROUP, ^uint64(0), snapshotExitCode
	r.Eflags &^= 0x100
	if err := ptrace.SetRegs(child, r); err != nil {
		return err
	}
	return ptrace.SetOptions(child, 0)
}

// isSnapshotRemains reports a zombie a snapshot child left: exit signal
// 0, exit status snapshotExitCode.
func isSnapshotRemains(pid int) bool {
	st, err := procfs.Stat(pid)
	if err != nil || len(st) == 0 || st[0] != "Z" {
		return false
	}
	return procfs.StatField(st, 38) == 0 && procfs.StatField(st, 52) == snapshotExitCode<<8
}

// reapRemains has the stopped f reap the remains of snapshot children
// an earlier pfreeze left (killed before it could). Runs on the tracer
// thread.
func (f *Frozen) reapRemains() {
	kids, err := procfs.Children(f.Pid)
	if err != nil || f.threads[0].in == nil {
		return
	}
	for _, k := range kids {
		if !isSnapshotRemains(k) {
			continue
		}
		if ns, err := nsPidOf(f.rd, k); err == nil {
			f.threads[0].in.Syscall(unix.SYS_WAIT4, uintptr(ns), 0, unix.WNOHANG|unix.WALL, 0)
		}
	}
}

// discard kills a snapshot child of the stopped f and has f reap it
// through the main thread's injector. Runs on the tracer thread.
func (f *Frozen) discard(child int) {
	if in := f.threads[0].in; in != nil {
		defer f.requeueLate(f.threads[0], len(in.Signals))
	}
	nsPid, err := nsPidOf(f.rd, child)
	if err != nil {
		nsPid = child
	}
	killSnapshot(child)
	if in := f.threads[0].in; in != nil {
		in.Syscall(unix.SYS_WAIT4, uintptr(nsPid), 0, unix.WNOHANG|unix.WALL, 0)
	}
}

// errNoFork: no snapshot child was made and the process is as it was;
// the checkpoint copies its memory while it is stopped instead.
type errNoFork struct{ why string }

func (e errNoFork) Error() string { return e.why }

// nsPidOf returns child's PID in the PID namespace of its parent.
func nsPidOf(parent, child int) (int, error) {
	pst, err := procfs.Status(parent)
	if err != nil {
		return 0, err
	}
	cst, err := procfs.Status(child)
	if err != nil {
		return 0, err
	}
	p, err := procfs.NSIDs(pst, "NSpid")
	if err != nil {
		return 0, err
	}
	c, err := procfs.NSIDs(cst, "NSpid")
	if err != nil {
		return 0, err
	}
	if len(c) < len(p) {
		return 0, fmt.Errorf("NSpid %v shallower than its parent's %v", c, p)
	}
	return c[len(p)-1], nil
}

// killSnapshot ends a snapshot child and takes its exit as its tracer:
// one armed by armExit is let go to exit marked, any other killed.
// Runs on the tracer thread.
func killSnapshot(pid int) {
	if r, err := ptrace.GetRegs(pid); err != nil || r.Rax != unix.SYS_EXIT_GROUP || r.Rdi != snapshotExitCode || ptrace.Cont(pid, 0) != nil {
		unix.Kill(pid, unix.SIGKILL)
	}
	for i := 0; i < 100; i++ {
		if _, err := ptrace.Wait(pid); err != nil {
			return // exited (its remains are its parent's), or not ours
		}
	}
}

// kill ends the child: runs on the tracer thread.
func (s *snapshot) kill() {
	killSnapshot(s.pid)
	s.mem.Close()
}

// release kills the child and has its parent reap it: one thread of the
// parent is stopped for an injected wait4(child, WNOHANG|__WALL). If the
// parent is gone, the child was handed to a reaper, which takes it.
func (s *snapshot) release(tr *ptrace.Tracer) error {
	return tr.Do(func() error {
		s.kill()
		tasks, err := procfs.Tasks(s.parent)
		if err != nil {
			return nil // the parent is gone
		}
		var last error
		for _, tid := range tasks {
			err := reapIn(s.parent, tid, s.site, s.nsPid)
			if err == nil || errors.Is(err, unix.ECHILD) {
				return nil
			}
			last = err
		}
		if last != nil {
			return fmt.Errorf("reap snapshot child %d: %w", s.pid, last)
		}
		return nil
	})
}

// reapIn stops thread tid of pid, has it run wait4(child, NULL,
// WNOHANG|__WALL) and lets it go. Runs on the tracer thread.
func reapIn(pid, tid int, site uint64, child int) error {
	if err := ptrace.Seize(tid, 0); err != nil {
		return err
	}
	defer ptrace.Detach(tid, 0)
	if err := ptrace.Interrupt(tid); err != nil {
		return err
	}
	if err := waitInterrupt(tid); err != nil {
		return err
	}
	in, err := ptrace.NewSeizedInjector(tid, uintptr(site))
	if err != nil {
		return err
	}
	got, err := in.Syscall(unix.SYS_WAIT4, uintptr(child), 0, unix.WNOHANG|unix.WALL, 0)
	if rerr := in.Restore(); rerr != nil && err == nil {
		err = rerr
	}
	for _, sig := range in.Signals {
		unix.Tgkill(pid, tid, sig)
	}
	if err == nil && int(got) != child {
		err = fmt.Errorf("wait4 %d returned %d", child, int(got))
	}
	return err
}

// wontCopy reports an area a fork does not snapshot: shared anonymous
// memory (written through the child too), MADV_DONTFORK (absent from the
// child) and MADV_WIPEONFORK (zero in it), by its VmFlags or, when they
// are not read yet, in wiped. Its pages are read during the stop.
func wontCopy(v *image.VMA, wiped map[uint64]bool) bool {
	if v.Kind == image.VMASharedAnon || wiped[v.Start] {
		return true
	}
	for _, fl := range strings.Fields(v.VmFlags) {
		if fl == "dc" || fl == "wf" {
			return true
		}
	}
	return false
}

// unforked finds, while f is stopped, what its snapshot child lacks
// without reading smaps (whose page walk takes tens of milliseconds a
// GiB): an area of f missing from the child's /proc/PID/maps is
// MADV_DONTFORK; a private area where f has a page and the child none was
// wiped (MADV_WIPEONFORK: a fork copies every page table entry of an
// area holding anonymous pages). needFlags: an area is MADV_DONTFORK, or
// f has locked memory (a fork clears VM_LOCKED in the child): the child's
// VmFlags would not be f's, so f's smaps must be read now.
func (f *Frozen) unforked(r *records, snap *snapshot) (wiped map[uint64]bool, needFlags bool, err error) {
	st, err := procfs.Status(f.rd)
	if err != nil {
		return nil, false, err
	}
	if lck := strings.TrimSpace(strings.TrimSuffix(st["VmLck"], "kB")); lck != "" && lck != "0" {
		return nil, true, nil
	}
	cmaps, err := procfs.MapsLayout(snap.pid)
	if err != nil {
		return nil, false, err
	}
	in := map[[2]uint64]bool{}
	for _, m := range cmaps {
		in[[2]uint64{m.Start, m.End}] = true
	}
	for _, v := range r.vmas {
		if !v.Kind.Kernel() && !in[[2]uint64{v.Start, v.End}] {
			return nil, true, nil
		}
	}
	pm, err := os.Open(procfs.Path(f.rd, "pagemap"))
	if err != nil {
		return nil, false, err
	}
	defer pm.Close()
	cm, err := os.Open(procfs.Path(snap.pid, "pagemap"))
	if err != nil {
		return nil, false, err
	}
	defer cm.Close()
	wiped = map[uint64]bool{}
	for _, v := range r.dump {
		if v.Shared || v.Kind.Kernel() || v.Kind == image.VMASharedAnon {
			continue
		}
		child, err := anyPage(cm, v.Start, v.End)
		if err != nil || child {
			if err != nil {
				return nil, false, fmt.Errorf("snapshot child %d: map %#x-%#x: %w", snap.pid, v.Start, v.End, err)
			}
			continue
		}
		if has, err := anyPage(pm, v.Start, v.End); err != nil {
			return nil, false, fmt.Errorf("map %#x-%#x: %w", v.Start, v.End, err)
		} else if has {
			wiped[v.Start] = true
		}
	}
	return wiped, false, nil
}

// fillFlags gives r's areas their VmFlags if gather left them out, from
// the smaps of src: the snapshot child once f runs again, else f itself,
// stopped.
func (f *Frozen) fillFlags(r *records, src int) error {
	if !r.noFlags {
		return nil
	}
	maps, err := procfs.Maps(src)
	if err != nil {
		return err
	}
	flags := map[[2]uint64]string{}
	for _, m := range maps {
		flags[[2]uint64{m.Start, m.End}] = m.VmFlags
	}
	all := [][]image.VMA{r.vmas, r.dump}
	if r.stopped != nil {
		all = append(all, r.stopped.order)
	}
	for _, vs := range all {
		for i := range vs {
			fl, ok := flags[[2]uint64{vs[i].Start, vs[i].End}]
			if !ok {
				return fmt.Errorf("map %#x-%#x: not in the smaps of %d", vs[i].Start, vs[i].End, src)
			}
			vs[i].VmFlags = fl
		}
	}
	r.noFlags = false
	return nil
}

// stoppedPages is what a checkpoint read during the stop, written after.
type stoppedPages struct {
	// order is every area whose pages are saved, in the order (by
	// address) their Pages records must come: readers of a snapshot
	// (an incremental one's parent) take them in step.
	order []image.VMA
	// byArea: the runs read during the stop, by area start; an area in
	// it is written from them, any other from the snapshot child.
	byArea map[uint64][]pagesRun
}

type pagesRun struct {
	addr uint64
	data []byte
}

// takeStopped reads, while f is stopped, what its snapshot child cannot
// give later: the File records (the contents of memfds, SysV segments,
// deleted files) and the pages of the areas wontCopy, into r; the other
// areas are left in r.dump for the child. Returns the bytes of pages read.
func (f *Frozen) takeStopped(r *records, snap *snapshot) (uint64, error) {
	r.snap = snap
	if err := checkWatchedObjects(r.vmas, r.fds, f.files); err != nil {
		return 0, err
	}
	files, err := fileRecords(f.rd, r.vmas, r.fds, f.files)
	if err != nil {
		return 0, err
	}
	r.files, r.filesTaken = files, true
	wiped, needFlags, err := f.unforked(r, snap)
	if err != nil {
		return 0, err
	}
	if needFlags {
		if err := f.fillFlags(r, f.rd); err != nil { // f's own: it is stopped
			return 0, err
		}
	}
	var now, later []image.VMA
	for _, v := range r.dump {
		if wontCopy(&v, wiped) {
			now = append(now, v)
		} else {
			later = append(later, v)
		}
	}
	var n uint64
	if len(now) > 0 {
		pagemap, err := os.Open(procfs.Path(f.rd, "pagemap"))
		if err != nil {
			return 0, err
		}
		defer pagemap.Close()
		r.stopped = &stoppedPages{order: r.dump, byArea: map[uint64][]pagesRun{}}
		for _, v := range now {
			r.stopped.byArea[v.Start] = nil
		}
		err = copyMemory(f.mem, func(addr uint64, data []byte) error {
			i := sort.Search(len(now), func(i int) bool { return now[i].End > addr })
			start := now[i].Start
			r.stopped.byArea[start] = append(r.stopped.byArea[start], pagesRun{addr, append([]byte(nil), data...)})
			n += uint64(len(data))
			return nil
		}, func(rd *reader) error { return rd.readAll(pagemap, now) })
		if err != nil {
			return 0, err
		}
	}
	r.dump = later
	return n, nil
}

// snapshotFork forks f for a copy-on-write checkpoint and reads what the
// child cannot give. nil, nil: no child could be made (said in a
// notice): the checkpoint copies everything while f is stopped.
func (f *Frozen) snapshotFork(c *cowRun, r *records) (*snapshot, error) {
	t0 := time.Now()
	var snap *snapshot
	err := f.tr.Do(func() (err error) {
		snap, err = f.fork()
		return err
	})
	c.stats.Fork += time.Since(t0)
	var nf errNoFork
	if errors.As(err, &nf) {
		c.stats.Fallback = true
		c.say(fmt.Sprintf("checkpoint %d: %s: stopped for the whole copy (stop-and-copy)", f.Pid, nf.why))
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	n, err := f.takeStopped(r, snap)
	if err != nil {
		f.dropSnapshot(r)
		return nil, err
	}
	c.stats.StopBytes += n
	return snap, nil
}

// dropSnapshot kills r's snapshot child while f is still stopped, and
// has f reap it through the main thread's injector; r's pages are read
// from f itself from then on (the same while it is stopped).
func (f *Frozen) dropSnapshot(r *records) {
	snap := r.snap
	if snap == nil {
		return
	}
	r.snap = nil
	f.tr.Do(func() error {
		f.discard(snap.pid)
		snap.mem.Close()
		return nil
	})
}

// releaseSnapshot releases snap once f runs again, saying in a notice if
// the child's remains could not be reaped.
func (f *Frozen) releaseSnapshot(snap *snapshot) {
	if err := snap.release(f.tr); err != nil {
		f.cow.say(fmt.Sprintf("checkpoint %d: %v", f.Pid, err))
	}
}

// liveChildren lists pid's children but the remains of snapshot
// children (isSnapshotRemains), which are not the program's.
func liveChildren(pid int) ([]int, error) {
	kids, err := procfs.Children(pid)
	if err != nil {
		return nil, err
	}
	out := kids[:0]
	for _, k := range kids {
		if !isSnapshotRemains(k) {
			out = append(out, k)
		}
	}
	return out, nil
}

// dumpInOrder writes r's pages in address order: the runs read during
// the stop for the areas that have them, the others' from src (the
// snapshot child) between them.
func (f *Frozen) dumpInOrder(r *records, pid int, mem *ptrace.Mem, enc *image.Encoder) error {
	var group []image.VMA
	flush := func() error {
		if len(group) == 0 {
			return nil
		}
		err := dumpMemory(pid, mem, group, enc, f.parentPages)
		group = nil
		return err
	}
	for _, v := range r.stopped.order {
		runs, ok := r.stopped.byArea[v.Start]
		if !ok {
			group = append(group, v)
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		for _, run := range runs {
			if err := enc.WritePages(run.addr, run.data); err != nil {
				return err
			}
		}
	}
	return flush()
}
