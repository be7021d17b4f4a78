package loader

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Start gives the built process its last state (signal handlers, mm
// fields, credentials, registers) and lets it run. If any step fails the
// process is killed.
func (p *Process) Start() error {
	if !p.built || p.done {
		return errors.New("thaw: start: process not built")
	}
	err := p.tr.Do(func() error {
		if p.tree != nil {
			return p.startTree()
		}
		if p.retryPID {
			if err := p.takePID(true); err != nil {
				return err
			}
		}
		if err := p.finish(); err != nil {
			return err
		}
		return p.detach()
	})
	if err != nil {
		p.Abort()
		return fmt.Errorf("thaw: %w", err)
	}
	members := []*Process{p}
	if p.tree != nil {
		members = p.tree.members
	}
	for _, m := range members {
		m.done = true
		m.createdShm = nil // the process's now
		if !m.zombie {
			m.mem.Close()
		}
	}
	if p.notify != nil {
		for _, s := range *p.notes {
			p.notify(s)
		}
	}
	return nil
}

// detach lets every thread made ready by finish run. Runs on the tracer
// thread.
func (p *Process) detach() error {
	var errs []error
	for _, tk := range p.tasks {
		if err := ptrace.Detach(tk.in.Tid, 0); err != nil {
			errs = append(errs, fmt.Errorf("detach %d: %w", tk.in.Tid, err))
		}
	}
	return errors.Join(errs...)
}

// task is one thread of the process being started.
type task struct {
	img *image.Thread
	in  *ptrace.Injector
}

func (t *task) call(nr uintptr, args ...uintptr) (uintptr, error) { return t.in.Syscall(nr, args...) }

// finish gives the process its last state; detach then lets it run.
// Runs on the tracer thread.
func (p *Process) finish() error {
	pr := p.proc
	scratch := uintptr(p.base + stubScratchOff)
	write := func(b []byte) error { return p.mem.Write(uint64(scratch), b) }

	// madvise flags here, not when mapping: a fork (takePID) would not
	// carry MADV_DONTFORK areas and would wipe MADV_WIPEONFORK ones.
	for _, v := range p.vmas {
		if !v.Kind.Kernel() {
			if err := p.advise(v); err != nil {
				return err
			}
		}
	}
	// Process-wide state, through the main thread.
	for _, s := range pr.Sigacts {
		if s.Sig < 1 || s.Sig > 64 || s.Sig == int(unix.SIGKILL) || s.Sig == int(unix.SIGSTOP) {
			return fmt.Errorf("%w: sigaction for signal %d", image.ErrCorrupt, s.Sig)
		}
		b := make([]byte, 32)
		binary.LittleEndian.PutUint64(b[0:], s.Handler)
		binary.LittleEndian.PutUint64(b[8:], s.Flags)
		binary.LittleEndian.PutUint64(b[16:], s.Restorer)
		binary.LittleEndian.PutUint64(b[24:], s.Mask)
		if err := write(b); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_RT_SIGACTION, uintptr(s.Sig), scratch, 0, 8); err != nil {
			return fmt.Errorf("sigaction %d: %w", s.Sig, err)
		}
	}
	if pr.Cwd != "" {
		path, err := p.putString(pr.Cwd)
		if err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_CHDIR, path); err != nil {
			return fmt.Errorf("chdir %s: %w", pr.Cwd, err)
		}
	}
	if _, err := p.call(unix.SYS_UMASK, uintptr(pr.Umask)); err != nil {
		return fmt.Errorf("umask: %w", err)
	}
	// Personality is per task and inherited by clone: set it before the
	// threads are made.
	if _, err := p.call(unix.SYS_PERSONALITY, uintptr(pr.Personality)); err != nil {
		return fmt.Errorf("personality %#x: %w", pr.Personality, err)
	}

	// The stub's pages go; from here on calls are made at the vdso's
	// syscall instruction, with a temporary scratch area for arguments.
	if _, err := p.call(unix.SYS_MUNMAP, uintptr(p.base), stubSize); err != nil {
		return fmt.Errorf("unmap stub: %w", err)
	}
	p.in.Site = uintptr(p.vdso)
	borrow, err := p.scratchMap()
	if err != nil {
		return err
	}
	// Sockets first of all: on one host the original was killed just
	// now, and until a copy holds its addresses a packet from a peer
	// would be answered with a reset. Listeners before connections: a
	// connection in repair mode binds to its (accepted: the listener's)
	// port whatever holds it, a listener only beside connections that
	// allow it (SO_REUSEADDR).
	if err := p.bindListeners(borrow); err != nil {
		return err
	}
	if err := p.restoreSockets(borrow); err != nil {
		return err
	}
	if err := p.bindUnixListeners(borrow); err != nil {
		return err
	}
	if err := p.connectUnix(borrow); err != nil {
		return err
	}
	if err := p.setOwners(); err != nil {
		return err
	}
	if err := p.unixOptions(borrow); err != nil {
		return err
	}
	if err := p.setMM(borrow); err != nil {
		return err
	}
	if p.opts.VirtPID && p.pid != p.proc.Pid && p.tree == nil {
		if err := p.installVirtPID(borrow); err != nil {
			return err
		}
		p.notice("getpid() and gettid() of pid %d answer %d, as when it was frozen", p.pid, p.proc.Pid)
	}
	seccomp := p.hasSeccomp()
	if seccomp {
		if err := suspendSeccomp(p.in.Tid); err != nil {
			return err
		}
		if err := p.installSeccomp(p.in, pr.Seccomp); err != nil {
			return err
		}
	}
	// Threads, each a clone3 of the main thread into its saved TID.
	tasks := []*task{{img: p.threads[0], in: p.in}}
	clones := p.threads[1:]
	if pr.LeaderExited {
		// Every saved thread is a clone; the main thread only exits
		// once released (exitingLeader).
		leader, err := p.exitingLeader()
		if err != nil {
			return err
		}
		tasks, clones = []*task{{img: leader, in: p.in}}, p.threads
	}
	for _, t := range clones {
		tk, err := p.cloneThread(t, borrow)
		if err != nil {
			return err
		}
		tasks = append(tasks, tk)
	}
	if p.listener != nil {
		p.virtTids = map[int]int{}
		for _, tk := range tasks {
			p.virtTids[tk.in.Tid] = tk.img.Tid
		}
	}
	// Per-thread state, credentials last: they are per thread too, and
	// dropping root's first would forbid the rest.
	for i, tk := range tasks {
		comm := tk.img.Comm
		if comm == "" && i == 0 {
			comm = pr.Comm
		}
		if err := p.threadState(tk, borrow, comm); err != nil {
			return fmt.Errorf("thread %d: %w", tk.in.Tid, err)
		}
	}
	queued := false
	if p.tree != nil && p.tree.virtWanted {
		// The filter traps rt_sigqueueinfo: pending signals go first.
		if err := p.queuePending(tasks, borrow); err != nil {
			return err
		}
		queued = true
		if err := p.installTreeFilter(borrow); err != nil {
			return err
		}
	}
	if seccomp {
		// Each thread's own filters after the tree's filter, which is
		// loaded with TSYNC: that needs the threads' filters alike.
		for _, tk := range tasks {
			if err := suspendSeccomp(tk.in.Tid); err != nil {
				return err
			}
			if err := p.installSeccomp(tk.in, tk.img.Seccomp); err != nil {
				return fmt.Errorf("thread %d: %w", tk.in.Tid, err)
			}
		}
	}
	// POSIX timers before the credentials: an _ALARM clock needs
	// CAP_WAKE_ALARM. (Every signal is blocked until the registers are
	// set: one that fires meanwhile stays pending.)
	if err := p.restoreTimers(tasks, borrow); err != nil {
		return err
	}
	for _, tk := range tasks {
		if err := p.setCreds(tk, borrow); err != nil {
			return fmt.Errorf("thread %d: %w", tk.in.Tid, err)
		}
		if p.credsOf(tk).NoNewPrivs {
			if _, err := tk.call(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
				return fmt.Errorf("thread %d: no_new_privs: %w", tk.in.Tid, err)
			}
		}
	}
	if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_DUMPABLE, uintptr(pr.Dumpable)); err != nil {
		return fmt.Errorf("dumpable: %w", err)
	}
	// After the credentials: changing them resets the parent-death signal.
	// Always set, 0 included; with -detach not for a process whose parent
	// is pthaw, since our exit would fire it at once (a tree member's
	// parent, or a namespace's init, is restored with it).
	pdeath := uintptr(pr.PdeathSig)
	if (p.opts.Detach && p.parent == nil && p.init == 0) || pdeath > 64 {
		pdeath = 0
	}
	if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, pdeath); err != nil {
		return fmt.Errorf("pdeathsig: %w", err)
	}
	// Pending signals and timers last, so that they fire in the restored
	// process, not during its construction. (Every signal is blocked until
	// the registers are set: queued earlier, they would not fire sooner.)
	if !queued {
		if err := p.queuePending(tasks, borrow); err != nil {
			return err
		}
	}
	for which, it := range pr.Itimers {
		if it == (image.Itimer{}) {
			continue
		}
		// An interval ITIMER_REAL reads as no time left while its
		// expiry's SIGALRM is pending: the kernel re-arms it only when
		// the signal is taken. Set with no time left it would stay
		// disarmed; one microsecond expires at once, into the SIGALRM
		// pending already, and leaves it armed as it was.
		if which == unix.ITIMER_REAL && it.ValueSec == 0 && it.ValueUsec == 0 {
			it.ValueUsec = 1
		}
		b := make([]byte, 32)
		binary.LittleEndian.PutUint64(b[0:], uint64(it.IntervalSec))
		binary.LittleEndian.PutUint64(b[8:], uint64(it.IntervalUsec))
		binary.LittleEndian.PutUint64(b[16:], uint64(it.ValueSec))
		binary.LittleEndian.PutUint64(b[24:], uint64(it.ValueUsec))
		if err := p.mem.Write(uint64(borrow), b); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_SETITIMER, uintptr(which), borrow, 0); err != nil {
			return fmt.Errorf("setitimer %d: %w", which, err)
		}
	}
	if _, err := p.call(unix.SYS_MUNMAP, borrow, scratchLen); err != nil {
		return fmt.Errorf("unmap scratch area: %w", err)
	}
	// Registers last of all, then every thread runs.
	for _, tk := range tasks {
		if err := setRegisters(tk); err != nil {
			return err
		}
	}
	if p.init > 0 && p.tree == nil {
		// Init waits for the process, whose pid there is the saved one.
		// (A tree's starts with its stand-ins: startTree.)
		in, err := ptrace.NewInjector(p.init, uintptr(p.base+stubCodeOff))
		if err != nil {
			return err
		}
		if err := runInitLoop(in, p.base, p.proc.Pid, true); err != nil {
			return fmt.Errorf("init: %w", err)
		}
	}
	p.tasks = tasks
	return nil
}

// exitingLeader is the state of a main thread that had ended with
// pthread_exit (image.Process.LeaderExited): it makes the raw thread exit
// (SYS_exit, not exit_group) at the vdso's syscall instruction as soon as
// it runs, with every signal blocked so that none is delivered to it
// first, and is a zombie leader from then on, as in the original. It gets
// the first thread's FPU state and, having no credentials of its own, the
// process's (the first thread's, which the capture read them through).
func (p *Process) exitingLeader() (*image.Thread, error) {
	first := p.threads[0]
	regs, err := ptrace.RegsFromSlice(first.Regs)
	if err != nil {
		return nil, err
	}
	regs.Rip = uint64(p.vdso)
	regs.Rax = unix.SYS_EXIT
	regs.Rdi = 0
	regs.Orig_rax = ^uint64(0) // no system call to restart
	return &image.Thread{Tid: p.proc.Pid, Comm: p.proc.Comm, Regs: regs.Slice(),
		XState: first.XState, Sigmask: ^uint64(0)}, nil
}

// queuePending re-queues the pending signals of every thread and of the
// process. Runs on the tracer thread.
func (p *Process) queuePending(tasks []*task, scratch uintptr) error {
	for _, tk := range tasks {
		for _, si := range tk.img.Pending {
			if err := p.queueSignal(scratch, si, p.localPid(tk.in.Tid, tk.img.Tid)); err != nil {
				return err
			}
		}
	}
	for _, si := range p.proc.Pending {
		if err := p.queueSignal(scratch, si, 0); err != nil {
			return err
		}
	}
	return nil
}

// setRegisters gives a thread its saved registers, XSAVE state and signal
// mask. Runs on the tracer thread.
func setRegisters(tk *task) error {
	t, tid := tk.img, tk.in.Tid
	regs, err := ptrace.RegsFromSlice(t.Regs)
	if err != nil {
		return err
	}
	// A sleep interrupted by the freeze would be restarted through the
	// kernel's restart block, which this process does not have: re-run the
	// original call instead (its arguments are still in the registers).
	if -int64(regs.Rax) == ptrace.ERESTART_RESTARTBLOCK && int64(regs.Orig_rax) >= 0 && regs.Orig_rax != unix.SYS_RESTART_SYSCALL {
		restart := int64(-ptrace.ERESTARTNOINTR)
		regs.Rax = uint64(restart)
	}
	if err := ptrace.SetXState(tid, t.XState); err != nil {
		return err
	}
	if err := ptrace.SetSigmask(tid, t.Sigmask); err != nil {
		return err
	}
	return ptrace.SetRegs(tid, regs)
}

// cloneThread makes thread t: clone3 in the main thread with the flags of
// a pthread and the saved TID (a new one, said, when it is taken). The
// new thread stops at once (PTRACE_O_TRACECLONE). Runs on the tracer thread.
func (p *Process) cloneThread(t *image.Thread, scratch uintptr) (*task, error) {
	const flags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
		unix.CLONE_THREAD | unix.CLONE_SYSVSEM
	args := make([]byte, 96)
	binary.LittleEndian.PutUint64(args[0:], flags)
	binary.LittleEndian.PutUint64(args[64:], uint64(scratch)+88) // set_tid
	binary.LittleEndian.PutUint64(args[72:], 1)                  // set_tid_size
	binary.LittleEndian.PutUint64(args[88:], uint64(t.Tid))
	if p.opts.NewPID {
		binary.LittleEndian.PutUint64(args[72:], 0)
		binary.LittleEndian.PutUint64(args[64:], 0)
	}
	if err := p.mem.Write(uint64(scratch), args); err != nil {
		return nil, err
	}
	r, err := p.call(unix.SYS_CLONE3, scratch, 88)
	if err != nil && !p.opts.PIDNamespace && (errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EPERM)) {
		why := err
		binary.LittleEndian.PutUint64(args[64:], 0)
		binary.LittleEndian.PutUint64(args[72:], 0)
		if err := p.mem.Write(uint64(scratch), args); err != nil {
			return nil, err
		}
		r, err = p.call(unix.SYS_CLONE3, scratch, 88)
		if err == nil {
			p.notice("thread %d restored as tid %d (%v)", t.Tid, r, why)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create thread %d: %w", t.Tid, err)
	}
	tid := p.in.NewChild // ours; r is the process's own view
	if tid <= 0 {
		return nil, fmt.Errorf("create thread %d: no clone event (tid %d)", t.Tid, r)
	}
	p.tids = append(p.tids, tid)
	st, err := ptrace.Wait(tid)
	if err != nil {
		return nil, fmt.Errorf("create thread %d: %w", t.Tid, err)
	}
	if !st.Status.Stopped() {
		return nil, fmt.Errorf("create thread %d: %v", t.Tid, st)
	}
	in, err := ptrace.NewInjector(tid, uintptr(p.vdso))
	if err != nil {
		return nil, err
	}
	return &task{img: t, in: in}, nil
}

// threadState restores what belongs to one thread: its name, tid address,
// robust futex list, rseq area and signal stack. Runs on the tracer thread.
func (p *Process) threadState(tk *task, scratch uintptr, comm string) error {
	t := tk.img
	if len(comm) > 15 { // TASK_COMM_LEN - 1
		comm = comm[:15]
	}
	if comm != "" {
		if err := p.mem.Write(uint64(scratch), append([]byte(comm), 0)); err != nil {
			return err
		}
		if _, err := tk.call(unix.SYS_PRCTL, unix.PR_SET_NAME, scratch); err != nil {
			return fmt.Errorf("set name: %w", err)
		}
	}
	if _, err := tk.call(unix.SYS_SET_TID_ADDRESS, uintptr(t.TidAddress)); err != nil {
		return fmt.Errorf("set_tid_address: %w", err)
	}
	if t.RobustList != 0 {
		if _, err := tk.call(unix.SYS_SET_ROBUST_LIST, uintptr(t.RobustList), uintptr(t.RobustLen)); err != nil {
			return fmt.Errorf("set_robust_list: %w", err)
		}
	}
	if t.RseqAddr != 0 {
		if _, err := tk.call(unix.SYS_RSEQ, uintptr(t.RseqAddr), uintptr(t.RseqLen), 0, uintptr(t.RseqSig)); err != nil {
			return fmt.Errorf("rseq %#x: %w", t.RseqAddr, err)
		}
	}
	if t.AltSP != 0 || t.AltFlags != 0 {
		b := make([]byte, 24)
		binary.LittleEndian.PutUint64(b[0:], t.AltSP)
		binary.LittleEndian.PutUint32(b[8:], uint32(t.AltFlags&^ssOnStack))
		binary.LittleEndian.PutUint64(b[16:], t.AltSize)
		if err := p.mem.Write(uint64(scratch), b); err != nil {
			return err
		}
		if _, err := tk.call(unix.SYS_SIGALTSTACK, scratch, 0); err != nil {
			return fmt.Errorf("sigaltstack: %w", err)
		}
	}
	return nil
}

// ssOnStack is SS_ONSTACK: reported by sigaltstack, never accepted by it.
const ssOnStack = 1

// scratchLen is the size of the temporary mapping finish passes
// arguments through once the stub is gone: room for the prctl_mm_map and
// auxv, the executable's path, and up to NGROUPS_MAX supplementary groups.
const (
	scratchLen  = 320 << 10
	scratchPath = 4096 // offset of the path in it
	maxGroups   = image.MaxGroups
)

// scratchMap maps a temporary anonymous area in the process for arguments
// of injected calls; finish unmaps it before the process runs. (Borrowing
// the process's own memory could overwrite it if an argument outgrew the
// borrowed bytes.) Runs on the tracer thread.
func (p *Process) scratchMap() (uintptr, error) {
	addr, err := p.call(unix.SYS_MMAP, 0, scratchLen, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uintptr(0), 0)
	if err != nil {
		return 0, fmt.Errorf("map scratch area: %w", err)
	}
	return addr, nil
}

// setMM restores the mm fields, auxv and the executable link with
// prctl(PR_SET_MM_MAP). Runs on the tracer thread.
func (p *Process) setMM(scratch uintptr) error {
	pr := p.proc
	path := append([]byte(pr.Exe), 0)
	if len(path) > unix.PathMax {
		return fmt.Errorf("executable path of %d bytes is too long", len(pr.Exe))
	}
	if err := p.mem.Write(uint64(scratch)+scratchPath, path); err != nil {
		return err
	}
	exe, err := p.call(unix.SYS_OPEN, scratch+scratchPath, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open executable %s: %w", pr.Exe, err)
	}
	defer p.call(unix.SYS_CLOSE, exe)
	auxv := make([]byte, 8*len(pr.Auxv))
	for i, v := range pr.Auxv {
		binary.LittleEndian.PutUint64(auxv[8*i:], v)
	}
	const mapLen = 104 // struct prctl_mm_map
	if mapLen+len(auxv) > scratchPath {
		return fmt.Errorf("%w: auxv of %d bytes", image.ErrCorrupt, len(auxv))
	}
	m := pr.MM
	b := make([]byte, mapLen)
	for i, v := range []uint64{m.StartCode, m.EndCode, m.StartData, m.EndData, m.StartBrk, m.Brk,
		m.StartStack, m.ArgStart, m.ArgEnd, m.EnvStart, m.EnvEnd, uint64(scratch) + mapLen} {
		binary.LittleEndian.PutUint64(b[8*i:], v)
	}
	binary.LittleEndian.PutUint32(b[96:], uint32(len(auxv)))
	binary.LittleEndian.PutUint32(b[100:], uint32(exe))
	if err := p.mem.Write(uint64(scratch), append(b, auxv...)); err != nil {
		return err
	}
	if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_MM, unix.PR_SET_MM_MAP, scratch, mapLen); err != nil {
		return fmt.Errorf("prctl(PR_SET_MM_MAP): %w", err)
	}
	return nil
}

// queueSignal re-queues a pending signal with its siginfo.
// Runs on the tracer thread.
func (p *Process) queueSignal(scratch uintptr, si image.Siginfo, tid int) error {
	if len(si) != ptrace.SiginfoSize {
		return fmt.Errorf("%w: siginfo of %d bytes", image.ErrCorrupt, len(si))
	}
	sig := uintptr(binary.LittleEndian.Uint32(si[0:]))
	if err := p.mem.Write(uint64(scratch), si); err != nil {
		return err
	}
	var err error
	if tid > 0 {
		_, err = p.call(unix.SYS_RT_TGSIGQUEUEINFO, uintptr(p.localPid(p.pid, p.proc.Pid)), uintptr(tid), sig, scratch)
	} else {
		_, err = p.call(unix.SYS_RT_SIGQUEUEINFO, uintptr(p.localPid(p.pid, p.proc.Pid)), sig, scratch)
	}
	if err != nil {
		return fmt.Errorf("queue signal %d: %w", sig, err)
	}
	return nil
}
