package loader

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Virtual PIDs for a tree (pthaw -virtpid with a pfreeze -tree snapshot).
// A parent learns its children's PIDs from what wait4 and waitid return,
// which a seccomp listener can neither rewrite nor answer in the parent's
// place (only the parent can reap its child). So a tree's filter returns
// SECCOMP_RET_TRACE for the calls to rewrite, and pthaw stays the ptrace
// tracer of every thread of every member (and, through
// PTRACE_O_TRACEFORK/VFORK/CLONE, of every process they make, which
// inherits the filter): at the seccomp stop it rewrites the arguments
// that name a member by its saved PID, and lets the calls whose result is
// a PID run to their syscall-exit stop, where it rewrites the result (and
// the si_pid of a siginfo). getpid and gettid, which pthaw can answer
// alone, go to a seccomp listener instead (SECCOMP_RET_USER_NOTIF, half
// the cost of a ptrace stop), served by Supervise. Every other call runs
// untouched, without a stop. Members keep the PTRACE_O_EXITKILL of their
// stubs: they die with pthaw.

// seccompIoctlNotifSetFlags is SECCOMP_IOCTL_NOTIF_SET_FLAGS, _IOW('!', 4, __u64).
const seccompIoctlNotifSetFlags = 0x40082104

// treeNotifCalls are the calls a tree's filter hands to the listener,
// treeTraceCalls those it hands to the tracer.
var (
	treeNotifCalls = []uint32{unix.SYS_GETPID, unix.SYS_GETTID}
	treeTraceCalls = []uint32{
		unix.SYS_GETPPID, unix.SYS_GETPGRP, unix.SYS_GETPGID, unix.SYS_GETSID, unix.SYS_SETPGID,
		unix.SYS_KILL, unix.SYS_TKILL, unix.SYS_TGKILL, unix.SYS_RT_SIGQUEUEINFO, unix.SYS_RT_TGSIGQUEUEINFO,
		unix.SYS_PIDFD_OPEN, unix.SYS_WAIT4, unix.SYS_WAITID, unix.SYS_RT_SIGTIMEDWAIT,
	}
)

// virtTree translates between the members' saved ids and ours. It is
// built once the tree is finished; then the tracer loop (serve, on the
// tracer thread) and Supervise's goroutine use it.
type virtTree struct {
	// mu guards the maps up to tgid: serve and Supervise's goroutine
	// both use them.
	mu sync.Mutex
	// s2r and r2s map a member's saved pid or tid to ours, and back,
	// while ours still names that member: a thread's pair goes when it
	// exits, a process's once its id may be someone else's (see real).
	s2r, r2s map[int]int
	// start holds each member process's start time (/proc/PID/stat),
	// and dead those whose exit serve has seen (a zombie until its parent
	// reaps it, after which its PID may be reused).
	start map[int]uint64
	dead  map[int]bool
	// retired holds the saved ids whose member is gone for good (its id
	// here was reused): a call naming one must fail, not reach whoever
	// holds that PID here.
	retired map[int]bool
	// tgid holds each traced thread's process, learnt when it first
	// stops, forgotten when it is reaped.
	tgid map[int]int

	// Used by serve only.
	known map[int]bool
	// expect holds new tasks whose first stop (the SIGSTOP every
	// auto-attached task starts with) is still to come.
	expect map[int]bool
	// exit holds the threads let run to the exit of a call whose result
	// is rewritten there, with the call's arguments as the process gave them.
	exit map[int]trapped
}

type trapped struct {
	nr   uint64
	args [2]uint64 // rdi, rsi before translation
	ptr  uint64    // where the call writes a siginfo: waitid's infop, rt_sigtimedwait's info
}

// treeTraceOpts are the ptrace options of a traced member's thread.
const treeTraceOpts = unix.PTRACE_O_EXITKILL | unix.PTRACE_O_TRACESYSGOOD | unix.PTRACE_O_TRACECLONE |
	unix.PTRACE_O_TRACEFORK | unix.PTRACE_O_TRACEVFORK | unix.PTRACE_O_TRACEEXEC | unix.PTRACE_O_TRACESECCOMP

// wantVirt reports whether the tree needs virtual PIDs: -virtpid was
// given and some member did not get its saved PID.
func (t *tree) wantVirt(opts Options) bool {
	if !opts.VirtPID {
		return false
	}
	for saved, ours := range t.pids {
		if saved != ours {
			return true
		}
	}
	return false
}

// installTreeFilter loads the tree's filter into every thread of the
// member (TSYNC: its threads exist by now) and takes its listener. It
// must come before the credentials (loading a filter without
// no_new_privs needs CAP_SYS_ADMIN) and after the last injected call the
// filter traps (the pending signals): until the member runs under the
// tracer loop, a call handed to the tracer fails with ENOSYS. Runs on the
// tracer thread.
func (p *Process) installTreeFilter(scratch uintptr) error {
	prog := virtFilter(filterRule{Calls: treeNotifCalls, Action: unix.SECCOMP_RET_USER_NOTIF}, filterRule{Calls: treeTraceCalls, Action: unix.SECCOMP_RET_TRACE})
	// A listener and TSYNC together need TSYNC_ESRCH.
	flags := listenerFlags | unix.SECCOMP_FILTER_FLAG_TSYNC | unix.SECCOMP_FILTER_FLAG_TSYNC_ESRCH
	fd, err := p.loadFilter(scratch, prog, uintptr(flags))
	if err != nil {
		return fmt.Errorf("virtual pid: install seccomp filter: %w", err)
	}
	return p.takeListener(fd)
}

// newVirtTree makes the translation tables of the finished tree t: every
// member's PID and every thread's TID, saved and ours.
func newVirtTree(t *tree) *virtTree {
	v := &virtTree{s2r: map[int]int{}, r2s: map[int]int{}, start: map[int]uint64{}, dead: map[int]bool{},
		retired: map[int]bool{}, tgid: map[int]int{}, known: map[int]bool{}, expect: map[int]bool{}, exit: map[int]trapped{}}
	for saved, ours := range t.pids {
		v.s2r[saved], v.r2s[ours] = ours, saved
		v.start[ours] = startTime(ours)
	}
	for _, m := range t.members {
		v.dead[m.pid] = m.zombie
	}
	for _, m := range t.members {
		for _, tk := range m.tasks {
			v.s2r[tk.img.Tid], v.r2s[tk.in.Tid] = tk.in.Tid, tk.img.Tid
			v.tgid[tk.in.Tid] = m.pid // not shared yet: no lock
			v.known[tk.in.Tid] = true
		}
	}
	return v
}

// describe names the members whose PID changed, for the user.
func (v *virtTree) describe(t *tree) string {
	var s []string
	for _, m := range t.img.Procs {
		if ours := t.pids[m.Pid]; ours != m.Pid {
			s = append(s, fmt.Sprintf("%d is %d", m.Pid, ours))
		}
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}

// resumeTraced lets the member's threads run, still traced, with the
// options the tracer loop needs. Runs on the tracer thread.
func (p *Process) resumeTraced() error {
	var errs []error
	for _, tk := range p.tasks {
		if err := ptrace.SetOptions(tk.in.Tid, treeTraceOpts); err != nil {
			errs = append(errs, fmt.Errorf("trace %d: %w", tk.in.Tid, err))
			continue
		}
		if err := ptrace.Cont(tk.in.Tid, 0); err != nil {
			errs = append(errs, fmt.Errorf("resume %d: %w", tk.in.Tid, err))
		}
	}
	return errors.Join(errs...)
}

// Wait waits for the restored process (the root of a tree) to end and
// returns its wait status. With virtual PIDs for a tree it serves the
// members' trapped calls meanwhile, as their tracer; the members still
// alive when the root ends die with pthaw (PTRACE_O_EXITKILL). Without,
// it waits for WaitPid.
func (p *Process) Wait() (syscall.WaitStatus, error) {
	if p.tree != nil && p.tree.virt != nil {
		var ws syscall.WaitStatus
		err := p.tr.Do(func() error {
			var err error
			ws, err = p.tree.virt.serve(p.pid)
			return err
		})
		return ws, err
	}
	var ws syscall.WaitStatus
	for {
		_, err := syscall.Wait4(p.WaitPid(), &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("wait for pid %d: %w", p.WaitPid(), err)
		}
		return ws, nil
	}
}

// serve is the tracer loop: it handles every stop of every traced thread
// until root, our child, ends, and returns root's wait status. A stop
// that cannot be handled because its thread was killed meanwhile is
// skipped. Runs on the tracer thread.
func (v *virtTree) serve(root int) (syscall.WaitStatus, error) {
	for {
		var ws unix.WaitStatus
		tid, err := unix.Wait4(-1, &ws, unix.WALL, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("wait for pid %d: %w", root, err)
		}
		switch {
		case ws.Exited() || ws.Signaled():
			v.forget(tid)
			v.exited(tid)
			if tid == root {
				return syscall.WaitStatus(ws), nil
			}
		case ws.Stopped():
			v.stopped(tid, ws)
		}
	}
}

func (v *virtTree) forget(tid int) {
	v.mu.Lock()
	delete(v.tgid, tid)
	v.mu.Unlock()
	delete(v.known, tid)
	delete(v.expect, tid)
	delete(v.exit, tid)
}

// stopped handles one ptrace stop of tid and resumes it. Runs on the
// tracer thread.
func (v *virtTree) stopped(tid int, ws unix.WaitStatus) {
	sig := ws.StopSignal()
	switch ev := int(ws>>16) & 0xff; {
	case ev == unix.PTRACE_EVENT_SECCOMP:
		v.enter(tid)
	case sig == unix.SIGTRAP|0x80: // syscall-exit stop (PTRACE_O_TRACESYSGOOD)
		v.leave(tid)
	case ev == unix.PTRACE_EVENT_FORK || ev == unix.PTRACE_EVENT_VFORK || ev == unix.PTRACE_EVENT_CLONE:
		// The new task inherits the tracing; its first stop may come
		// before or after this one.
		if msg, err := ptrace.GetEventMsg(tid); err == nil && !v.known[int(msg)] {
			v.known[int(msg)], v.expect[int(msg)] = true, true
			v.newTask(int(msg))
			v.learnTgid(int(msg))
		}
		ptrace.Cont(tid, 0)
	case ev == unix.PTRACE_EVENT_EXEC:
		// A thread that was not the leader took the leader's id.
		if msg, err := ptrace.GetEventMsg(tid); err == nil && int(msg) != tid {
			v.forget(int(msg))
			v.exited(int(msg))
		}
		ptrace.Cont(tid, 0)
	case ev != 0:
		ptrace.Cont(tid, 0)
	case sig == unix.SIGSTOP && (v.expect[tid] || !v.known[tid]):
		// A new task's first stop.
		if !v.known[tid] {
			v.known[tid] = true
			v.newTask(tid)
			v.learnTgid(tid)
		}
		delete(v.expect, tid)
		ptrace.Cont(tid, 0)
	default:
		si, err := ptrace.GetSiginfo(tid)
		if err != nil {
			// A group-stop (members are traced as their stubs were, not
			// seized: PTRACE_LISTEN is not available): resumed.
			ptrace.Cont(tid, 0)
			return
		}
		v.fixSiginfo(tid, si)
		ptrace.Cont(tid, sig)
	}
}

const (
	siUser  = 0
	siQueue = -1
	siTkill = -6
	pPID    = 1 // waitid's P_PID
	pPGID   = 2
	siPid   = 16 // offset of si_pid in siginfo_t
)

// fixSiginfo translates the sender (or the child, for SIGCHLD) a signal
// about to be delivered names, when that is a member.
func (v *virtTree) fixSiginfo(tid int, si []byte) {
	if translateSiginfo(si, v.saved) {
		ptrace.SetSiginfo(tid, si)
	}
}

// translateSiginfo turns the PID in si, the sender of a signal sent by a
// process or the child of a SIGCHLD, into the saved one when it is a
// member's (as saved finds it), and reports whether it did.
func translateSiginfo(si []byte, saved func(int) (int, bool)) bool {
	sig := unix.Signal(binary.LittleEndian.Uint32(si[0:]))
	code := int32(binary.LittleEndian.Uint32(si[8:]))
	if code != siUser && code != siQueue && code != siTkill && (sig != unix.SIGCHLD || code <= 0) {
		return false
	}
	pid := int(int32(binary.LittleEndian.Uint32(si[siPid:])))
	if s, ok := saved(pid); ok && s != pid {
		binary.LittleEndian.PutUint32(si[siPid:], uint32(int32(s)))
		return true
	}
	return false
}

// exited notes that traced task tid has exited: a member's thread id is
// free at once (its saved id retires), a member process's only once it is
// reaped and its id reused, which real and saved check for. Runs on the
// tracer thread.
func (v *virtTree) exited(tid int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.start[tid]; ok {
		// Not checked here: its parent, already waiting, may reap it
		// the moment we let it go.
		v.dead[tid] = true
	} else if _, ok := v.r2s[tid]; ok {
		v.drop(tid)
	}
}

// drop forgets the pair of our id r, whose saved id names nothing from
// now on. v.mu is held.
func (v *virtTree) drop(r int) {
	if s, ok := v.r2s[r]; ok && v.s2r[s] == r {
		delete(v.s2r, s)
		v.retired[s] = true
	}
	delete(v.r2s, r)
	delete(v.start, r)
	delete(v.dead, r)
}

// live reports whether our id r, of a member, still names that member:
// it is alive, a zombie (the same start time), or reaped with its id not
// yet reused (no process has it: its parent's SIGCHLD, a thread's wait
// that has yet to see its exit, and its group, which outlives it, still
// need the translation). A pair whose id was reused is dropped. v.mu is
// held.
func (v *virtTree) live(r int) bool {
	if !v.dead[r] {
		return true
	}
	if st := startTime(r); st == 0 || st == v.start[r] {
		return true
	}
	v.drop(r)
	return false
}

// noSuchPID is what a call naming a retired saved id is given instead:
// above any pid_max (2^22), so it fails with ESRCH or ECHILD.
const noSuchPID = 1 << 30

// real returns our id of the member saved as s, or noSuchPID when that
// member is gone for good.
func (v *virtTree) real(s int) (int, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.retired[s] {
		return noSuchPID, true
	}
	r, ok := v.s2r[s]
	if !ok {
		return 0, false
	}
	if !v.live(r) {
		return noSuchPID, true
	}
	return r, true
}

// saved returns the saved id of the member that is r here.
func (v *virtTree) saved(r int) (int, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, ok := v.r2s[r]
	return s, ok && v.live(r)
}

// newTask notes a task a member has just made, whose id is r: if r was a
// gone member's, that member's translation ends (its saved id retires),
// and r, if it was itself a retired saved id, names this task now.
// Runs on the tracer thread.
func (v *virtTree) newTask(r int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.r2s[r]; ok {
		v.drop(r)
	}
	delete(v.retired, r)
}

// startTime returns the start time of process pid (/proc/PID/stat field
// 22), or 0 if it is gone.
func startTime(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0
	}
	n, _ := strconv.ParseUint(f[19], 10, 64) // field 22; f[0] is field 3
	return n
}

// learnTgid records the process of tid, a new traced task, which cannot
// be reaped (and its id reused) before serve has seen it exit. Runs on
// the tracer thread.
func (v *virtTree) learnTgid(tid int) {
	if g := readTgid(tid); g > 0 {
		v.mu.Lock()
		v.tgid[tid] = g
		v.mu.Unlock()
	}
}

// tgidOf returns the process of traced thread tid (0 if it is gone).
func (v *virtTree) tgidOf(tid int) int {
	v.mu.Lock()
	g, ok := v.tgid[tid]
	v.mu.Unlock()
	if ok {
		return g
	}
	// A new task that calls before serve has seen it: not cached here,
	// where its exit could not be seen.
	return readTgid(tid)
}

// readTgid reads the process of thread tid from /proc, or returns 0.
func readTgid(tid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(tid) + "/status")
	if err != nil {
		return 0
	}
	if i := bytes.Index(b, []byte("\nTgid:")); i >= 0 {
		if f := strings.Fields(string(b[i+6:])); len(f) > 0 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				return n
			}
		}
	}
	return 0
}

// enter handles a seccomp stop: the trapped call is about to run.
// Runs on the tracer thread.
func (v *virtTree) enter(tid int) {
	regs, err := ptrace.GetRegs(tid)
	if err != nil {
		return // killed meanwhile
	}
	arg := []*uint64{&regs.Rdi, &regs.Rsi}
	orig := trapped{nr: regs.Orig_rax, args: [2]uint64{regs.Rdi, regs.Rsi}}
	changed, exit := false, false
	// id translates argument i when it names a member by its saved id.
	id := func(i int) {
		n := int(int32(*arg[i]))
		if r, ok := v.real(n); ok && n > 0 && r != n {
			*arg[i], changed = uint64(int64(r)), true
		}
	}
	// pidOrGroup translates a kill or wait4 pid: a process when
	// positive, a process group (named by its leader) below -1.
	pidOrGroup := func(i int) {
		n := int(int32(*arg[i]))
		if r, ok := v.real(-n); ok && n < -1 && r != -n {
			*arg[i], changed = uint64(int64(-r)), true
			return
		}
		id(i)
	}
	switch regs.Orig_rax {
	case unix.SYS_GETPPID, unix.SYS_GETPGRP:
		exit = true
	case unix.SYS_GETPGID, unix.SYS_GETSID:
		id(0)
		exit = true
	case unix.SYS_SETPGID, unix.SYS_TGKILL, unix.SYS_RT_TGSIGQUEUEINFO:
		id(0)
		id(1)
	case unix.SYS_TKILL, unix.SYS_RT_SIGQUEUEINFO, unix.SYS_PIDFD_OPEN:
		id(0)
	case unix.SYS_KILL:
		pidOrGroup(0)
	case unix.SYS_WAIT4:
		pidOrGroup(0)
		exit = true
	case unix.SYS_WAITID:
		if *arg[0] == pPID || *arg[0] == pPGID {
			id(1)
		}
		orig.ptr = regs.Rdx
		exit = true
	case unix.SYS_RT_SIGTIMEDWAIT:
		// A signal taken this way has no delivery stop.
		orig.ptr = regs.Rsi
		exit = true
	}
	if changed {
		if err := ptrace.SetRegs(tid, regs); err != nil {
			return
		}
	}
	if exit {
		v.exit[tid] = orig
		ptrace.ContSyscall(tid, 0)
		return
	}
	ptrace.Cont(tid, 0)
}

// leave handles the syscall-exit stop of a call enter let run to it:
// a PID it returns (or waitid's si_pid) that is a member's becomes the
// saved one. A call to be restarted gets its untranslated arguments
// back, for enter to translate again. Runs on the tracer thread.
func (v *virtTree) leave(tid int) {
	c, ok := v.exit[tid]
	delete(v.exit, tid)
	regs, err := ptrace.GetRegs(tid)
	if !ok || err != nil {
		ptrace.Cont(tid, 0)
		return
	}
	ret := int64(regs.Rax)
	switch {
	case ret == -ptrace.ERESTARTSYS || ret == -ptrace.ERESTARTNOINTR || ret == -ptrace.ERESTARTNOHAND || ret == -ptrace.ERESTART_RESTARTBLOCK:
		regs.Rdi, regs.Rsi = c.args[0], c.args[1]
		ptrace.SetRegs(tid, regs)
	case c.nr == unix.SYS_RT_SIGTIMEDWAIT:
		if ret > 0 && c.ptr != 0 {
			v.fixSiginfoAt(tid, c.ptr, v.saved)
		}
	case c.nr == unix.SYS_WAITID:
		if ret == 0 && c.ptr != 0 {
			v.fixSiginfoAt(tid, c.ptr, v.saved)
		}
	case c.nr == unix.SYS_WAIT4 && ret > 0:
		if s, ok := v.saved(int(ret)); ok && int64(s) != ret {
			regs.Rax = uint64(int64(s))
			ptrace.SetRegs(tid, regs)
		}
	case ret > 0:
		if s, ok := v.saved(int(ret)); ok && int64(s) != ret {
			regs.Rax = uint64(int64(s))
			ptrace.SetRegs(tid, regs)
		}
	}
	ptrace.Cont(tid, 0)
}

// fixSiginfoAt translates the PID in the siginfo a call (waitid,
// rt_sigtimedwait) filled in at addr.
func (v *virtTree) fixSiginfoAt(tid int, addr uint64, saved func(int) (int, bool)) {
	mem := ptrace.NewMem(tid)
	defer mem.Close()
	b := make([]byte, siPid+4)
	if err := mem.Read(addr, b); err != nil {
		return
	}
	if translateSiginfo(b, saved) {
		mem.Write(addr+siPid, b[siPid:])
	}
}

// superviseTree answers the getpid and gettid calls of the tree's
// members, and of the processes they made, on every member's listener,
// until stop is closed or every listener has hung up (every process using
// its filter is gone). Runs on the caller's goroutine; the listeners are
// closed when it returns.
func (p *Process) superviseTree(stop <-chan struct{}) {
	v := p.tree.virt
	var ls []*os.File
	for _, m := range p.tree.members {
		if m.listener != nil {
			ls = append(ls, m.listener)
		}
	}
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	if v == nil {
		return
	}
	pfd := make([]unix.PollFd, len(ls))
	for i, l := range ls {
		pfd[i] = unix.PollFd{Fd: int32(l.Fd()), Events: unix.POLLIN}
		// The caller waits for our answer: let the kernel wake us on its
		// CPU (best effort, Linux 6.6+).
		unix.Syscall(unix.SYS_IOCTL, l.Fd(), seccompIoctlNotifSetFlags, unix.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
	}
	for open := len(pfd); open > 0; {
		select {
		case <-stop:
			return
		default:
		}
		if n, err := unix.Poll(pfd, 200); err != nil || n == 0 {
			continue
		}
		for i := range pfd {
			fd, ev := int(pfd[i].Fd), pfd[i].Revents
			switch {
			case ev&unix.POLLIN != 0:
				v.answer(fd)
			case ev&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0:
				pfd[i].Fd = -1 // poll skips it from now on
				open--
			}
		}
	}
}

// answer receives one call from listener fd and answers it: a member's
// own ids are the saved ones; anyone else's call runs on.
func (v *virtTree) answer(fd int) {
	n, err := notifRecv(fd)
	if err != nil {
		return // the caller was killed meanwhile (ENOENT), or EINTR
	}
	resp := seccompResp{ID: n.ID, Flags: unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE}
	id := int(n.Pid) // the calling thread
	if n.Nr == unix.SYS_GETPID {
		id = v.tgidOf(id)
	}
	if s, ok := v.saved(id); ok && id > 0 {
		resp.Val, resp.Flags = int64(s), 0
	}
	notifSend(fd, &resp)
}
