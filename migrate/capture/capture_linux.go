// Package capture freezes a running process and writes its complete state
// as snapshot records (migrate/image): registers and XSAVE state, signal
// state, memory, credentials, limits and open files.
//
// The process is stopped with PTRACE_SEIZE + PTRACE_INTERRUPT (no SIGSTOP
// side effects). State only the process itself can report is read by
// injecting single system calls at a syscall instruction of its vdso;
// nothing is written into its code. Anything the snapshot could not carry
// faithfully makes Freeze refuse with an error naming it. FreezeTree
// freezes a process with all its descendants (tree_linux.go), and a
// child PID namespace whole through its init, in the namespace's own
// numbers (pidns_linux.go).
package capture

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// ErrUnsupported wraps every refusal to freeze something the snapshot
// cannot carry yet.
var ErrUnsupported = errors.New("not supported")

type unsupportedError struct {
	msg   string
	cause error // wrapped, when a refusal has a sentinel of its own
}

func (e *unsupportedError) Error() string        { return e.msg }
func (e *unsupportedError) Is(target error) bool { return target == ErrUnsupported }
func (e *unsupportedError) Unwrap() error        { return e.cause }

func unsupported(format string, args ...any) error {
	return &unsupportedError{msg: fmt.Sprintf(format, args...)}
}

// Frozen is a process stopped by Attach. Exactly one of Resume or Kill
// must be called.
type Frozen struct {
	// queried, when set, is called once the calls injected to describe
	// the process are done, before its first record is written.
	queried func()
	Pid     int
	tr      *ptrace.Tracer
	mem     *ptrace.Mem // reaches the memory through rd
	threads []*thread   // main thread first, unless leaderExited
	// rd is the thread through which /proc/PID and the memory are read:
	// Pid, or when the main thread has exited (leaderExited) the first
	// stopped thread (procfs.Reader says why).
	rd int
	// leaderExited: the main thread ended with pthread_exit while the
	// others run on; it is a zombie that cannot be seized, and is not
	// among threads.
	leaderExited bool
	// inner: the snapshot records the PID and TIDs of the process's own
	// PID namespace, a child of ours frozen whole (pidns_linux.go).
	inner bool
	// files: in a tree, the files without a path an earlier member saved
	// (objects_linux.go); nil for a single process.
	files map[uint64]bool
	// socks are the sockets held while the process is frozen.
	socks sockets
	// parentPages, in an incremental snapshot (pfreeze -parent): the
	// digests of the parent's pages this process may refer to.
	parentPages map[uint64][image.DigestSize]byte
	// parent makes the snapshot of this single process incremental
	// (FreezeOptions.Parent).
	parent *Parent
	// gadgetAt is the process's rt_sigreturn sequence (sigframe_linux.go),
	// once gadgetSought.
	gadgetAt     uint64
	gadgetLen    int
	gadgetSought bool
	// precopy, for pfreeze -live: the pages already sent while it ran.
	precopy *precopy
	// flagsMaps: the areas at the stop with the VmFlags read while the
	// process ran, still right (takeFlags); gather reads smaps without.
	flagsMaps []procfs.Mapping
	// cow, for a checkpoint that leaves the process running: its memory
	// is read from a snapshot child after an early Resume (forksnap_linux.go).
	cow *cowRun
	// resumed: Resume ran; a second call does nothing.
	resumed bool
	// precopyDone: in a tree's live migration, the areas (by start)
	// whose pages are all sent before the tree record.
	precopyDone map[uint64]bool
	// holdMM: a halted single process is given a holder at the stop, a
	// process sharing its memory, so that its kill frees its PID before
	// its memory (holdmm_linux.go). Kill leaves the holder stopped;
	// releaseHolder ends it, Resume drops it.
	holdMM bool
	holder *snapshot
}

// thread is one stopped thread of a Frozen process.
type thread struct {
	tid      int
	attached bool
	in       *ptrace.Injector
	// scratch holds target memory borrowed for injected calls.
	scratchAddr uint64
	scratchOrig []byte
	requeue     []unix.Signal
}

// Attach stops every thread of pid and returns it frozen, its state not
// yet written: Write streams it; then Resume or Kill.
func Attach(tr *ptrace.Tracer, pid int) (*Frozen, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("freeze: invalid pid %d", pid)
	}
	if _, err := os.Stat(procfs.Path(pid, "")); err != nil {
		return nil, fmt.Errorf("freeze %d: no such process", pid)
	}
	if pid == os.Getpid() {
		return nil, fmt.Errorf("freeze %d: cannot freeze myself", pid)
	}
	if err := mayTrace(pid, pid); err != nil {
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	if err := checkSupported(pid, false, ""); err != nil {
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	f := &Frozen{Pid: pid, tr: tr}
	if err := tr.Do(f.stopAll); err != nil {
		f.detach()
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	// Again, now that nothing can change: a child, timer or filter made
	// between the first check and the stop would otherwise slip through.
	if err := checkSupported(pid, false, ""); err != nil {
		f.Resume()
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	return f, nil
}

// stopAll seizes and interrupts every thread, again and again until no
// new thread appears: a thread created before its creator stopped is
// found on the next listing; once all are stopped none can be created.
// Runs on the tracer thread.
func (f *Frozen) stopAll() error {
	seen := map[int]bool{}
	for round := 0; ; round++ {
		tasks, err := procfs.Tasks(f.Pid)
		if err != nil {
			return err
		}
		var fresh []*thread
		for _, tid := range tasks {
			if seen[tid] {
				continue
			}
			seen[tid] = true
			if tid == f.Pid && threadState(f.Pid, tid) == 'Z' {
				// The main thread has exited (pthread_exit): a zombie
				// until the last thread ends, never seized.
				f.leaderExited = true
				continue
			}
			if err := mayTrace(f.Pid, tid); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					continue // exited meanwhile
				}
				return err
			}
			t := &thread{tid: tid}
			if err := ptrace.Seize(tid, seizeOptions); err != nil {
				if errors.Is(err, unix.ESRCH) || (errors.Is(err, unix.EPERM) && ended(f.Pid, tid)) {
					continue // exited meanwhile (EPERM: a thread in exit)
				}
				return fmt.Errorf("attach thread %d: %w", tid, explainPtraceErr(err))
			}
			t.attached = true
			if tid == f.Pid {
				f.threads = append([]*thread{t}, f.threads...)
			} else {
				f.threads = append(f.threads, t)
			}
			if err := ptrace.Interrupt(tid); err != nil {
				return fmt.Errorf("interrupt thread %d: %w", tid, err)
			}
			fresh = append(fresh, t)
		}
		if len(fresh) == 0 {
			break
		}
		if round > 100 {
			return fmt.Errorf("threads keep appearing")
		}
		for _, t := range fresh {
			if err := waitInterrupt(t.tid); err != nil {
				if errors.Is(err, ptrace.ErrTimeout) {
					return f.stopTimeout(t.tid, err)
				}
				if errors.Is(err, ptrace.ErrExited) && t.tid != f.Pid {
					// A thread that ended between its seize and its
					// stop: the process runs on without it.
					f.dropThread(t)
					continue
				}
				return err
			}
		}
	}
	if len(f.threads) == 0 || (f.threads[0].tid != f.Pid && !f.leaderExited) {
		return fmt.Errorf("main thread gone: %w", ptrace.ErrExited)
	}
	// Stopped, the first thread cannot exit: it reads for the process.
	f.rd = f.threads[0].tid
	f.mem = ptrace.NewMem(f.rd)
	return f.mayTraceStopped()
}

// stopTimeout explains why thread tid did not stop. It stays attached,
// its interrupt pending: PTRACE_DETACH needs a stopped tracee. The tracer
// thread's exit (ptrace.Tracer.Close) releases it, and the kernel then
// drops the pending interrupt, so the thread never stops and sees nothing.
func (f *Frozen) stopTimeout(tid int, err error) error {
	if verr := vforkError(f.Pid, false); verr != nil {
		return verr
	}
	state := threadState(f.Pid, tid)
	if state == 0 {
		state = '?'
	}
	return fmt.Errorf("thread %d does not stop (state %c): %w", tid, state, err)
}

// waitInterrupt waits for a seized thread's interrupt stop. A signal may be
// reported first: it is delivered (the process was about to receive it
// anyway) and the trap comes after. Runs on the tracer thread.
func waitInterrupt(tid int) error {
	for i := 0; ; i++ {
		st, err := ptrace.Wait(tid)
		if err != nil {
			return err
		}
		if st.IsEventStop() {
			return nil
		}
		if i > 1000 {
			return fmt.Errorf("thread %d does not stop (last: %v)", tid, st)
		}
		if err := ptrace.Cont(tid, st.Sig()); err != nil {
			return err
		}
	}
}

func explainPtraceErr(err error) error {
	if errors.Is(err, unix.EPERM) {
		if _, _, user := forUser(); user {
			return fmt.Errorf("%w (the process is already traced, or the kernel does not let this user trace it)", err)
		}
		return fmt.Errorf("%w (needs CAP_SYS_PTRACE, or the process is already traced)", err)
	}
	return err
}

// checkSupported refuses processes whose state the snapshot cannot carry.
// In a tree (inTree) children are members, not a reason to refuse; pidNS
// is the PID namespace, other than ours, that the tree is (its root the
// namespace's init), or "".
func checkSupported(pid int, inTree bool, pidNS string) error {
	// A main thread that ended with pthread_exit is a zombie in /proc
	// while the others run on: the process is read through one of them.
	rd := procfs.Reader(pid)
	if rd == 0 {
		return fmt.Errorf("process is a zombie")
	}
	st, err := procfs.Status(rd)
	if err != nil {
		return err
	}
	// Before anything else: a vfork parent cannot be stopped, whatever
	// else would be refused about it (its vfork child, as a child
	// process or as a member sharing its memory).
	if err := vforkError(pid, true); err != nil {
		return err
	}
	if st["Seccomp"] == "1" {
		return unsupported("strict seccomp mode (SECCOMP_MODE_STRICT)")
	}
	kids, err := liveChildren(pid)
	if err != nil {
		return err
	}
	if len(kids) > 0 && !inTree {
		return unsupported("child processes %v (freeze the whole tree with -tree)", kids)
	}
	for _, ns := range []string{"mnt", "uts", "ipc", "user"} {
		mine, err1 := os.Readlink("/proc/self/ns/" + ns)
		theirs, err2 := os.Readlink(procfs.Path(rd, "ns/"+ns))
		if err1 != nil || err2 != nil || mine == theirs {
			continue
		}
		switch {
		case ns == "user":
			return unsupported("process is in another user namespace")
		case pidNS == "":
			// Carried only with a PID namespace frozen whole, as the
			// container's own (container_linux.go).
			return unsupported("process is in another %s namespace (a container is frozen whole: the init of its PID namespace, with -tree)", ns)
		}
	}
	if err := checkPidNS(rd, st, pidNS); err != nil {
		return err
	}
	if ppid, _ := strconv.Atoi(st["PPid"]); ppid > 1 {
		if err := vforkChildError(pid, ppid); err != nil {
			return err
		}
		if shared := sharedWith(rd, ppid); len(shared) > 0 {
			return unsupported("shares its %s with its parent %d", strings.Join(shared, ", "), ppid)
		}
	}
	if root, err := os.Readlink(procfs.Path(rd, "root")); err == nil && root != "/" {
		return unsupported("chroot %s", root)
	}
	return nil
}

// Write streams the frozen process's state to enc and closes enc.
func (f *Frozen) Write(enc *image.Encoder) error {
	if err := f.write(enc); err != nil {
		return fmt.Errorf("freeze %d: %w", f.Pid, err)
	}
	return nil
}

func (f *Frozen) write(enc *image.Encoder) error {
	if f.parent != nil {
		if err := enc.Write(&f.parent.Record); err != nil {
			return err
		}
	}
	// A process's own pipes (both ends in it) are carried with their
	// buffered bytes, as a tree's are.
	inner, err := innerPipes([]int{f.rd})
	if err != nil {
		return err
	}
	if f.socks.ptys, err = innerPtys([]int{f.rd}); err != nil {
		return err
	}
	if err := f.writeRecords(enc, nil, inner); err != nil {
		return err
	}
	return enc.Close()
}

// writeRecords writes the process's records (all but the end record). In
// a tree, shm holds the shared memory objects whose pages an earlier
// member saved: their areas are recorded by identity only; inner holds
// the pipes with both ends inside the tree.
func (f *Frozen) writeRecords(enc *image.Encoder, shm map[uint64][][2]uint64, inner map[uint64]bool) error {
	r, err := f.gather(shm, inner)
	if err != nil {
		return err
	}
	if f.cow != nil {
		snap, err := f.snapshotFork(f.cow, r)
		if err != nil {
			return err
		}
		if snap != nil {
			if f.queried != nil {
				f.queried()
			}
			// The memory is read from the child from here on: the
			// process runs on.
			if err := f.Resume(); err != nil {
				f.tr.Do(func() error { snap.kill(); return nil })
				return err
			}
			f.cow.released = time.Now()
			defer f.releaseSnapshot(snap)
			return f.emit(enc, r)
		}
	}
	if f.holdMM {
		// Before queried: a cluster agent freezes the cgroup there,
		// and nothing could be injected after.
		f.hold()
	}
	if f.queried != nil {
		f.queried()
	}
	return f.emit(enc, r)
}

// records is what gather learns of a frozen process: all but its pages.
type records struct {
	proc       *image.Process
	thrs       []*image.Thread
	vmas, dump []image.VMA
	fds        []image.FD
	// A copy-on-write checkpoint (forksnap_linux.go) reads the File records
	// and the pages a fork does not copy while the process is stopped
	// (filesTaken, files, stopped), and r.dump from snap after.
	filesTaken bool
	files      []image.File
	stopped    *stoppedPages
	snap       *snapshot
	// noFlags: vmas and dump have no VmFlags yet (fillFlags).
	noFlags bool
}

// gather describes the process: everything that needs calls injected
// into it is done here, before the first record is written.
func (f *Frozen) gather(shm map[uint64][][2]uint64, inner map[uint64]bool) (*records, error) {
	// A copy-on-write checkpoint reads the areas' VmFlags later, from its
	// snapshot child's smaps, after the stop (forksnap_linux.go).
	read := procfs.Maps
	if f.cow != nil {
		read = procfs.MapsLayout
	}
	if f.precopy != nil {
		// First: the calls injected below are counted too.
		ok, err := f.takeFlags(f.precopy)
		if err != nil {
			return nil, err
		}
		f.precopy.stats.FlagsAtStop = !ok
	}
	maps := f.flagsMaps
	if maps == nil {
		var err error
		if maps, err = read(f.rd); err != nil {
			return nil, err
		}
	}
	vmas, err := describeVMAs(f.rd, maps, f.mem)
	if err != nil {
		return nil, err
	}
	dump := vmas
	if shm != nil {
		if dump, err = identifyShm(f.rd, vmas, shm); err != nil {
			return nil, err
		}
	}
	fds, err := describeFDs(f.rd, inner, &f.socks)
	if err != nil {
		return nil, err
	}
	site, err := findSyscallSite(f.mem, vmas)
	if err != nil {
		return nil, err
	}
	proc, thrs, err := f.describe(site, maps)
	if err != nil {
		return nil, err
	}
	return &records{proc: proc, thrs: thrs, vmas: vmas, dump: dump, fds: fds, noFlags: f.cow != nil}, nil
}

// emit writes what gather learnt and the process's pages.
func (f *Frozen) emit(enc *image.Encoder, r *records) error {
	done := f.precopyDone
	if f.precopy != nil {
		// The final round, before the process record; the areas it
		// completed are left out of the pages records.
		var err error
		if done, err = f.precopy.finish(enc, r.vmas); err != nil {
			return fmt.Errorf("live: %w", err)
		}
	}
	if done != nil {
		var rest []image.VMA
		for _, v := range r.dump {
			if !(done[v.Start] && v.Kind == image.VMAAnon && !v.Shared) {
				rest = append(rest, v)
			}
		}
		r.dump = rest
	}
	if f.parent != nil {
		f.parentPages = f.parent.pagesOf([]int{r.proc.Pid})[0]
	}
	if err := enc.Write(r.proc); err != nil {
		return err
	}
	for _, t := range r.thrs {
		if err := enc.Write(t); err != nil {
			return err
		}
	}
	// VmFlags left out by gather (forksnap_linux.go): from the snapshot
	// child, or from the process while it is still stopped.
	flagsFrom := f.rd
	if r.snap != nil {
		flagsFrom = r.snap.pid
	}
	if err := f.fillFlags(r, flagsFrom); err != nil {
		return err
	}
	for i := range r.vmas {
		if err := enc.Write(&r.vmas[i]); err != nil {
			return err
		}
	}
	files := r.files
	if !r.filesTaken {
		if err := checkWatchedObjects(r.vmas, r.fds, f.files); err != nil {
			return err
		}
		var err error
		if files, err = fileRecords(f.rd, r.vmas, r.fds, f.files); err != nil {
			return err
		}
	}
	for i := range files {
		if err := enc.Write(&files[i]); err != nil {
			return err
		}
	}
	pid, mem := f.rd, f.mem
	if r.snap != nil {
		pid, mem = r.snap.pid, r.snap.mem
	}
	if r.stopped != nil {
		// Some areas were read during the stop (forksnap_linux.go).
		if err := f.dumpInOrder(r, pid, mem, enc); err != nil {
			return err
		}
	} else if err := dumpMemory(pid, mem, r.dump, enc, f.parentPages); err != nil {
		return err
	}
	for i := range r.fds {
		if err := enc.Write(&r.fds[i]); err != nil {
			return err
		}
	}
	return nil
}

// describe reads the process and thread state, injecting the calls it needs.
func (f *Frozen) describe(site uint64, maps []procfs.Mapping) (*image.Process, []*image.Thread, error) {
	// The process's /proc entries through its reader thread (f.rd); its
	// name through its own, which even an exited main thread keeps.
	pid := f.rd
	p := &image.Process{Pid: f.Pid, Threads: len(f.threads), FrozenAt: time.Now().UnixNano(),
		LeaderExited: f.leaderExited}
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		p.Kernel = unix.ByteSliceToString(uts.Release[:])
		p.Host = unix.ByteSliceToString(uts.Nodename[:])
	}
	var err error
	if b, err := os.ReadFile(procfs.Path(f.Pid, "comm")); err == nil {
		p.Comm = strings.TrimSuffix(string(b), "\n")
	}
	if p.Exe, err = os.Readlink(procfs.Path(pid, "exe")); err != nil {
		return nil, nil, fmt.Errorf("exe: %w", err)
	}
	if strings.HasSuffix(p.Exe, " (deleted)") {
		return nil, nil, unsupported("executable %s", p.Exe)
	}
	if p.Cwd, err = os.Readlink(procfs.Path(pid, "cwd")); err != nil {
		return nil, nil, fmt.Errorf("cwd: %w", err)
	}
	if strings.HasSuffix(p.Cwd, " (deleted)") {
		return nil, nil, unsupported("working directory %s", p.Cwd)
	}
	st, err := procfs.Status(pid)
	if err != nil {
		return nil, nil, err
	}
	if f.inner {
		if p.Pid, err = innermost(st, "NStgid"); err != nil {
			return nil, nil, err
		}
	}
	if err := parseCreds(st, &p.Creds); err != nil {
		return nil, nil, err
	}
	p.Umask = uint32(parseOct(st["Umask"]))
	if b, err := os.ReadFile(procfs.Path(pid, "personality")); err == nil {
		p.Personality = procfs.Hex(strings.TrimSpace(string(b)))
	}
	stat, err := procfs.Stat(pid)
	if err != nil {
		return nil, nil, err
	}
	p.MM = image.MM{
		StartCode: procfs.StatField(stat, 26), EndCode: procfs.StatField(stat, 27),
		StartStack: procfs.StatField(stat, 28),
		StartData:  procfs.StatField(stat, 45), EndData: procfs.StatField(stat, 46),
		StartBrk: procfs.StatField(stat, 47),
		ArgStart: procfs.StatField(stat, 48), ArgEnd: procfs.StatField(stat, 49),
		EnvStart: procfs.StatField(stat, 50), EnvEnd: procfs.StatField(stat, 51),
	}
	if p.Auxv, err = readAuxv(pid); err != nil {
		return nil, nil, err
	}
	limits, err := procfs.Limits(pid)
	if err != nil {
		return nil, nil, err
	}
	for _, rl := range limits {
		p.Rlimits = append(p.Rlimits, image.Rlimit{Cur: rl.Cur, Max: rl.Max})
	}
	caught := procfs.Hex(st["SigCgt"]) | procfs.Hex(st["SigIgn"])
	if p.Timers, err = listTimers(pid); err != nil {
		return nil, nil, err
	}

	var out []*image.Thread
	err = f.tr.Do(func() error {
		if p.Pending, err = peek(f.rd, true); err != nil {
			return err
		}
		var chains [][]image.SeccompFilter
		for i, th := range f.threads {
			t, err := f.describeThread(th, site, maps)
			if err != nil {
				return fmt.Errorf("thread %d: %w", th.tid, err)
			}
			if i == 0 {
				if err := f.injectProcessQueries(th, p, caught); err != nil {
					return err
				}
				if err := f.injectTimerQueries(th, p.Timers); err != nil {
					return err
				}
			}
			chain, virt, err := threadSeccomp(f.Pid, th.tid)
			if err != nil {
				return err
			}
			chains = append(chains, chain)
			if virt {
				// Restored by pthaw -virtpid: the ids it sees are its own.
				if t.Tid, err = f.virtualID(th, unix.SYS_GETTID); err != nil {
					return fmt.Errorf("thread %d: %w", th.tid, err)
				}
				if i == 0 {
					p.Pid = t.Tid
				}
			}
			// Every call already put the thread back (call): this
			// only makes sure, and releases the borrowed scratch. If
			// pfreeze dies from here on, the kernel detaches a thread
			// that is exactly as it was, parked in an interrupt stop,
			// and the memory dump below sees none of our bytes.
			if err := f.putBack(th); err != nil {
				return err
			}
			out = append(out, t)
		}
		splitSeccomp(p, out, chains)
		tids := make([]int, len(f.threads))
		for i, th := range f.threads {
			tids[i] = th.tid
		}
		if err := timerThreads(p.Timers, tids, out); err != nil {
			return err
		}
		// Signals that stopped a thread while we injected were dequeued:
		// they are pending for the snapshot and re-queued on Resume.
		for i, th := range f.threads {
			for _, sig := range th.in.Signals {
				si := make(image.Siginfo, ptrace.SiginfoSize)
				si[0] = byte(sig)
				out[i].Pending = append(out[i].Pending, si)
				th.requeue = append(th.requeue, sig)
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return p, out, nil
}

// describeThread reads one thread's state. Runs on the tracer thread.
func (f *Frozen) describeThread(th *thread, site uint64, maps []procfs.Mapping) (*image.Thread, error) {
	tid := th.tid
	st, err := procfs.Status(f.rd)
	if err != nil {
		return nil, err
	}
	tst, err := procfs.ThreadStatus(f.Pid, tid)
	if err != nil {
		return nil, err
	}
	own, err := threadCreds(st, tst)
	if err != nil {
		return nil, err
	}
	if tst["Seccomp"] == "1" {
		return nil, unsupported("strict seccomp mode (SECCOMP_MODE_STRICT)")
	}
	t := &image.Thread{Tid: tid, Creds: own}
	if f.inner {
		if t.Tid, err = innermost(tst, "NSpid"); err != nil {
			return nil, err
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", f.Pid, tid)); err == nil {
		t.Comm = strings.TrimSuffix(string(b), "\n")
	}
	// Seized: every call leaves the thread as it was (ptrace.Injector).
	in, err := ptrace.NewSeizedInjector(tid, uintptr(site))
	if err != nil {
		return nil, err
	}
	th.in = in
	if in.Check, err = seccompCheck(f.Pid, tid); err != nil {
		return nil, err
	}
	regs := in.Saved()
	t.Regs = regs.Slice()
	if t.XState, err = ptrace.GetXState(tid); err != nil {
		return nil, err
	}
	if t.Sigmask, err = ptrace.GetSigmask(tid); err != nil {
		return nil, err
	}
	if t.Pending, err = peek(tid, false); err != nil {
		return nil, err
	}
	rs, err := ptrace.GetRseq(tid)
	if err != nil {
		return nil, err
	}
	t.RseqAddr, t.RseqLen, t.RseqSig = rs.Addr, rs.Len, rs.Sig
	if t.RobustList, t.RobustLen, err = ptrace.GetRobustList(tid); err != nil {
		return nil, err
	}
	if err := f.borrowScratch(th, regs.Rsp, maps); err != nil {
		return nil, err
	}
	g, gl := f.gadget(maps)
	guardCalls(in, g, gl, f.Pid, tid, regs.Rsp, maps, t.XState, 0)
	// The describing calls follow one another without settling the
	// thread between them; putBack settles it.
	in.Chain = true
	altKnown := func() {
		switch {
		case onAltstack(t, regs.Rsp):
			// The frame is bounded by the altstack, not by the
			// mapping that holds it (the heap, another stack): it
			// must not reach below it again. No room there, the
			// calls are stepped.
			if in.Guarded() {
				in.DropSigreturn()
				guardCalls(in, g, gl, f.Pid, tid, regs.Rsp, maps, t.XState, t.AltSP)
			}
		case t.AltFlags&ssDisable == 0 && t.AltSize > 0 && !threadStack(maps, regs.Rsp):
			// Below rsp may not be the thread's (a coroutine's
			// or goroutine's stack in the heap): the frame goes
			// on its altstack, armed and unused (no signal is
			// taken during a call, and the frame's rt_sigreturn
			// restores the mask before any can be).
			in.DropSigreturn()
			guardCalls(in, g, gl, f.Pid, tid, t.AltSP+t.AltSize, maps, t.XState, t.AltSP)
			if !in.Guarded() {
				guardCalls(in, g, gl, f.Pid, tid, regs.Rsp, maps, t.XState, 0)
			}
		}
	}
	if err := f.injectThreadQueries(th, t, altKnown); err != nil {
		return nil, err
	}
	return t, nil
}

func peek(tid int, shared bool) ([]image.Siginfo, error) {
	raw, err := ptrace.PeekSiginfo(tid, shared)
	if err != nil {
		return nil, err
	}
	out := make([]image.Siginfo, len(raw))
	for i, r := range raw {
		out[i] = r
	}
	return out, nil
}

// scratchLen is the target memory borrowed for injected calls' results.
const scratchLen = 256

// borrowScratch picks scratchLen bytes of writable target memory below the
// stack's red zone and saves their contents; Resume puts them back.
func (f *Frozen) borrowScratch(th *thread, rsp uint64, maps []procfs.Mapping) error {
	addr := (rsp - 128 - scratchLen) &^ 15
	ok := false
	for _, m := range maps {
		if m.Start <= addr && rsp <= m.End && m.Writable() && !m.Shared() {
			ok = true
		}
	}
	if !ok {
		for _, m := range maps {
			if m.Writable() && !m.Shared() && m.Readable() && m.End-m.Start >= scratchLen {
				addr, ok = m.Start, true
				break
			}
		}
	}
	if !ok {
		return fmt.Errorf("no writable memory to borrow for injected calls")
	}
	buf := make([]byte, scratchLen)
	if err := f.mem.Read(addr, buf); err != nil {
		return fmt.Errorf("scratch: %w", err)
	}
	th.scratchAddr, th.scratchOrig = addr, buf
	return nil
}

// call runs one system call in th, whose output buffer, if any, is th's
// scratch memory (th.scratchAddr), reads n bytes of output from it and
// puts the scratch memory back at once: with the registers and signal
// mask, which the seized injector puts back after every call, nothing of
// ours is left in the process between two calls.
// Runs on the tracer thread.
func (f *Frozen) call(th *thread, n int, nr uintptr, args ...uintptr) (uintptr, []byte, error) {
	ret, err := th.in.Syscall(nr, args...)
	var out []byte
	if err == nil && n > 0 {
		out = make([]byte, n)
		err = f.mem.Read(th.scratchAddr, out)
	}
	if perr := f.mem.Write(th.scratchAddr, th.scratchOrig); perr != nil {
		return 0, nil, fmt.Errorf("thread %d: restore scratch memory: %w", th.tid, perr)
	}
	return ret, out, err
}

// injectProcessQueries reads process-wide state only the process can
// report, through its main thread. Runs on the tracer thread.
func (f *Frozen) injectProcessQueries(th *thread, p *image.Process, caught uint64) error {
	s := uintptr(th.scratchAddr)
	for sig := 1; sig <= 64; sig++ {
		if caught&(1<<(sig-1)) == 0 || sig == int(unix.SIGKILL) || sig == int(unix.SIGSTOP) {
			continue
		}
		_, b, err := f.call(th, 32, unix.SYS_RT_SIGACTION, uintptr(sig), 0, s, 8)
		if err != nil {
			return fmt.Errorf("rt_sigaction %d: %w", sig, err)
		}
		p.Sigacts = append(p.Sigacts, image.Sigact{Sig: sig,
			Handler: le64(b[0:]), Flags: le64(b[8:]), Restorer: le64(b[16:]), Mask: le64(b[24:])})
	}
	for which := 0; which < 3; which++ {
		_, b, err := f.call(th, 32, unix.SYS_GETITIMER, uintptr(which), s)
		if err != nil {
			return fmt.Errorf("getitimer %d: %w", which, err)
		}
		p.Itimers = append(p.Itimers, image.Itimer{IntervalSec: int64(le64(b[0:])), IntervalUsec: int64(le64(b[8:])),
			ValueSec: int64(le64(b[16:])), ValueUsec: int64(le64(b[24:]))})
	}
	brk, _, err := f.call(th, 0, unix.SYS_BRK, 0)
	if err != nil {
		return fmt.Errorf("brk: %w", err)
	}
	p.MM.Brk = uint64(brk)
	sb, _, err := f.call(th, 0, unix.SYS_PRCTL, unix.PR_GET_SECUREBITS)
	if err != nil {
		return fmt.Errorf("prctl(PR_GET_SECUREBITS): %w", err)
	}
	p.Creds.Securebits = uint32(sb)
	d, _, err := f.call(th, 0, unix.SYS_PRCTL, unix.PR_GET_DUMPABLE)
	if err != nil {
		return fmt.Errorf("prctl(PR_GET_DUMPABLE): %w", err)
	}
	p.Dumpable = int(d)
	_, b, err := f.call(th, 4, unix.SYS_PRCTL, unix.PR_GET_PDEATHSIG, s)
	if err != nil {
		return fmt.Errorf("prctl(PR_GET_PDEATHSIG): %w", err)
	}
	p.PdeathSig = int(int32(uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24))
	return nil
}

// SS_ONSTACK and SS_DISABLE (sigaltstack(2)).
const (
	ssOnStack = 1
	ssDisable = 2
)

// onAltstack reports whether rsp is on t's altstack, as the kernel's
// on_sig_stack decides it.
func onAltstack(t *image.Thread, rsp uint64) bool {
	return t.AltFlags&ssDisable == 0 && t.AltSize > 0 && rsp > t.AltSP && rsp-t.AltSP <= t.AltSize
}

// injectThreadQueries reads per-thread state only the thread can report,
// calling altKnown first thing once it knows the thread's altstack.
// Runs on the tracer thread.
func (f *Frozen) injectThreadQueries(th *thread, t *image.Thread, altKnown func()) error {
	s := uintptr(th.scratchAddr)
	_, b, err := f.call(th, 24, unix.SYS_SIGALTSTACK, 0, s)
	if err != nil {
		return fmt.Errorf("sigaltstack: %w", err)
	}
	t.AltSP, t.AltFlags, t.AltSize = le64(b[0:]), int32(le64(b[8:])), le64(b[16:])
	// The kernel says SS_ONSTACK from the rsp of the call, which a
	// sigreturn frame's call has below the thread's own (possibly below
	// the altstack); the thread's own rsp says it.
	if t.AltFlags&ssDisable == 0 {
		t.AltFlags &^= ssOnStack
		if onAltstack(t, th.in.Saved().Rsp) {
			t.AltFlags |= ssOnStack
		}
	}
	altKnown()
	if _, b, err = f.call(th, 8, unix.SYS_PRCTL, unix.PR_GET_TID_ADDRESS, s); err != nil {
		return fmt.Errorf("prctl(PR_GET_TID_ADDRESS): %w", err)
	}
	t.TidAddress = le64(b)
	if t.Creds != nil {
		// Securebits are per thread too.
		sb, _, err := f.call(th, 0, unix.SYS_PRCTL, unix.PR_GET_SECUREBITS)
		if err != nil {
			return fmt.Errorf("prctl(PR_GET_SECUREBITS): %w", err)
		}
		t.Creds.Securebits = uint32(sb)
	}
	return nil
}

func le64(b []byte) uint64 {
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

func parseOct(s string) uint64 {
	var v uint64
	fmt.Sscanf(s, "%o", &v)
	return v
}

func parseCreds(st map[string]string, c *image.Creds) error {
	ids := func(key string, out *[4]uint32) error {
		f := strings.Fields(st[key])
		if len(f) != 4 {
			return fmt.Errorf("status: malformed %s: %q", key, st[key])
		}
		for i := range f {
			var v uint32
			if _, err := fmt.Sscan(f[i], &v); err != nil {
				return fmt.Errorf("status: malformed %s: %q", key, st[key])
			}
			out[i] = v
		}
		return nil
	}
	if err := ids("Uid", &c.Uid); err != nil {
		return err
	}
	if err := ids("Gid", &c.Gid); err != nil {
		return err
	}
	for _, g := range strings.Fields(st["Groups"]) {
		var v uint32
		if _, err := fmt.Sscan(g, &v); err == nil {
			c.Groups = append(c.Groups, v)
		}
	}
	c.CapInh = procfs.Hex(st["CapInh"])
	c.CapPrm = procfs.Hex(st["CapPrm"])
	c.CapEff = procfs.Hex(st["CapEff"])
	c.CapBnd = procfs.Hex(st["CapBnd"])
	c.CapAmb = procfs.Hex(st["CapAmb"])
	c.NoNewPrivs = st["NoNewPrivs"] == "1"
	return nil
}

func readAuxv(pid int) ([]uint64, error) {
	b, err := os.ReadFile(procfs.Path(pid, "auxv"))
	if err != nil {
		return nil, fmt.Errorf("auxv: %w", err)
	}
	out := make([]uint64, 0, len(b)/8)
	for i := 0; i+8 <= len(b); i += 8 {
		out = append(out, le64(b[i:]))
	}
	return out, nil
}

// findSyscallSite finds a syscall instruction (0f 05) in the vdso.
func findSyscallSite(mem *ptrace.Mem, vmas []image.VMA) (uint64, error) {
	for _, v := range vmas {
		if v.Kind != image.VMAVdso {
			continue
		}
		for i := 0; i+1 < len(v.Content); i++ {
			if v.Content[i] == 0x0f && v.Content[i+1] == 0x05 {
				return v.Start + uint64(i), nil
			}
		}
	}
	return 0, fmt.Errorf("no syscall instruction found in the vdso")
}

// putBack writes back th's borrowed scratch memory and its registers.
// Runs on the tracer thread.
func (f *Frozen) putBack(th *thread) error {
	if th.scratchOrig != nil {
		if err := f.mem.Write(th.scratchAddr, th.scratchOrig); err != nil {
			return fmt.Errorf("thread %d: restore scratch memory: %w", th.tid, err)
		}
		th.scratchOrig = nil
	}
	if th.in != nil {
		// Restore first: a thread parked in a call made through its
		// sigreturn frame is settled, then the frame's memory goes
		// back.
		if err := th.in.Restore(); err != nil {
			return err
		}
		return th.in.ReleaseSigreturn()
	}
	return nil
}

// Resume puts the process back as it was and lets it run on.
func (f *Frozen) Resume() error {
	if f.resumed {
		return nil
	}
	f.resumed = true
	err := f.tr.Do(func() error {
		f.dropHolder()
		var errs []error
		// In reverse: scratch areas borrowed later may hold earlier ones.
		for i := len(f.threads) - 1; i >= 0; i-- {
			if err := f.putBack(f.threads[i]); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	})
	// The sockets before the threads run: a connection must leave
	// repair mode before the process uses it.
	if serr := f.socks.resume(); serr != nil {
		err = errors.Join(err, serr)
	}
	f.detach()
	for _, th := range f.threads {
		for _, sig := range th.requeue {
			unix.Tgkill(f.Pid, th.tid, sig)
		}
	}
	f.mem.Close()
	if err != nil {
		return fmt.Errorf("resume %d: %w", f.Pid, err)
	}
	return nil
}

// ended reports whether thread tid of pid has exited: a zombie, dead, or
// gone from /proc.
func ended(pid, tid int) bool {
	switch threadState(pid, tid) {
	case 0, 'Z', 'X':
		return true
	}
	return false
}

// dropThread forgets t, a thread that exited while being stopped (its
// exit was taken by waitInterrupt).
func (f *Frozen) dropThread(t *thread) {
	t.attached = false
	for i, th := range f.threads {
		if th == t {
			f.threads = append(f.threads[:i], f.threads[i+1:]...)
			return
		}
	}
}

func (f *Frozen) detach() {
	f.tr.Do(func() error {
		for _, th := range f.threads {
			if th.attached {
				th.attached = false
				ptrace.Detach(th.tid, 0)
			}
		}
		return nil
	})
}

// Kill ends the frozen process (after its snapshot is safely written).
// Its holder, if it has one, stays until releaseHolder.
func (f *Frozen) Kill() error {
	_, err := kill([]*Frozen{f})
	return err
}

// kill sends SIGKILL to every member, so that none runs again, then
// reaps their threads (reap) and returns those it gave up on: none unless
// something is wrong with the kernel's bookkeeping or ours. A member that
// is a child of this very process (started or restored by it: an agent's
// workload) is left to its parent's own wait once it has exited. Giving
// up is not an error: the members are killed, and the caller must go on
// (a migration's copy is to start).
func kill(members []*Frozen) (left []int, err error) {
	var errs []error
	ours := make([]bool, len(members))
	for i, f := range members {
		ours[i] = ourChild(f.Pid) // before the kill: see ourChild
	}
	var released sync.WaitGroup
	for _, f := range members {
		// A member with a holder (holdmm_linux.go) frees no memory.
		pidfd, perr := -1, error(unix.ESRCH)
		if f.holder == nil {
			pidfd, perr = unix.PidfdOpen(f.Pid, 0)
		}
		if err := unix.Kill(f.Pid, unix.SIGKILL); err != nil {
			errs = append(errs, fmt.Errorf("kill %d: %w", f.Pid, err))
		}
		if perr == nil {
			// The killed process's own exit frees its memory on one
			// core (about 100 ms a GiB), and its PID, which a
			// migration's copy on this host waits for, only after
			// that: process_mrelease frees it from here as well, side
			// by side. Failing (an older kernel), the exit does it all.
			released.Add(1)
			go func() {
				defer released.Done()
				unix.Syscall(unix.SYS_PROCESS_MRELEASE, uintptr(pidfd), 0, 0)
				unix.Close(pidfd)
			}()
		}
	}
	if len(members) > 0 {
		left = reap(members[0].tr, members, ours)
	}
	released.Wait()
	for _, f := range members {
		f.socks.kill()
		f.mem.Close()
	}
	return left, errors.Join(errs...)
}

// ourChild reports whether pid is a child of this process (a workload
// that a cluster agent started and now migrates). Read before the kill:
// once reaped, the process has no parent to read.
func ourChild(pid int) bool {
	st, err := procfs.Stat(pid)
	return err == nil && int(procfs.StatField(st, 4)) == os.Getpid()
}

// reap takes the exit of every thread of the killed members, as their
// tracer must: a traced thread that exits stays a zombie until its tracer
// waits for it, and only then is it released to its parent, or (a thread
// that is not a leader) freed. It returns the threads not reaped within
// ptrace.StopTimeout.
//
// No order is safe to wait in, so reap takes every exit as it comes
// (wait4 with WNOHANG, in turn). The init of a PID namespace shows why:
// the last of its threads to exit runs zap_pid_ns_processes, which waits
// until every PID of the namespace but its own and its leader's is
// freed, the init's other threads' included, and they, traced, are freed
// only once reaped here. Waiting for that thread before the others (as
// waiting in reverse creation order did, when the last thread of a Go
// init was the last to exit) waits for a thread that waits for us.
//
// When a member is our own child (ours), its leader is not waited for:
// tracer and parent are then one process, the leader's exit notification
// is also its exit status, and taking it here would take it from the
// caller's own wait for its child (an agent's wait4(pid), which would
// then find no child). reap still returns only once such a leader is a
// zombie with no other thread left, its exit ready for that wait (the
// thread group empty, as a pidfd's readability also needs): whoever takes
// its PID next (a migration's target on this host) must find it dead.
// Runs the waits on the tracer thread.
func reap(tr *ptrace.Tracer, members []*Frozen, ours []bool) (left []int) {
	type exit struct {
		tid, pid int
		// ownLeader: the leader of our own child, not waited for.
		ownLeader bool
	}
	var todo []exit
	for i, f := range members {
		for _, th := range f.threads {
			todo = append(todo, exit{th.tid, f.Pid, ours[i] && th.tid == f.Pid})
		}
	}
	// threadsLeft reports whether threads of pid other than its leader
	// are still to be reaped.
	threadsLeft := func(pid int) bool {
		for _, e := range todo {
			if e.pid == pid && e.tid != pid {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(ptrace.StopTimeout)
	var pause time.Duration
	tr.Do(func() error {
		for len(todo) > 0 {
			n := len(todo)
			for i := 0; i < len(todo); {
				e := todo[i]
				done := false
				if e.ownLeader {
					st, err := procfs.Stat(e.pid)
					done = !threadsLeft(e.pid) && (err != nil || len(st) == 0 || st[0] == "Z" || st[0] == "X")
				} else {
					// A stop (nil error) is taken and waited past; an
					// exit, or no such child any more, ends the thread.
					_, err := ptrace.WaitTimeout(e.tid, 0)
					done = err != nil && !errors.Is(err, ptrace.ErrTimeout)
				}
				if done {
					todo = append(todo[:i], todo[i+1:]...)
					continue
				}
				i++
			}
			if len(todo) == 0 {
				break
			}
			if !time.Now().Before(deadline) {
				for _, e := range todo {
					left = append(left, e.tid)
				}
				break
			}
			if len(todo) < n {
				pause = 0 // progress: the next exit is likely near
			}
			pause = min(max(2*pause, 20*time.Microsecond), 2*time.Millisecond)
			time.Sleep(pause)
		}
		return nil
	})
	return left
}
