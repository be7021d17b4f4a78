package loader

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// A tree restored into a new PID namespace (pthaw -pidns with a tree
// snapshot). Every member is forked with clone3(set_tid) as in the host's
// namespace, but the numbers are the namespace's: they are all free there,
// so each member gets its saved PID and TIDs whatever this host's PIDs
// are. Two kinds of pid then meet in the loader, and each call takes the
// one of the namespace it is made in:
//
//   - pthaw's own work — ptrace, /proc/PID, prlimit, kill — lives in our
//     namespace and uses our numbers (Process.pid, ptrace's event
//     messages). So do /proc paths the members open themselves
//     (/proc/PID/map_files for shared memory, /proc/<pthaw>/fd for pipes):
//     a procfs resolves numbers in the namespace it was mounted for, which
//     is ours, not the opener's.
//   - calls the members make — clone3's set_tid, setpgid, rt_sigqueueinfo
//     — name processes of their own namespace: the saved numbers.
//
// The namespace's first process, its init, is the first stub, as for a
// single process; it forks the root. The root's parent, process group
// leader and session leader were outside the tree; so that the root finds
// its saved getppid, getpgid and getsid there, init forks stand-ins with
// those PIDs (a session leader first: sessions are only inherited, and a
// process can join only a group of its own session), and the root is
// forked by the stand-in of its parent. The stand-ins are stubs too; each
// waits for its child on the way to the root and exits with that child's
// status, so the root's status reaches init, which exits with it (the
// kernel then kills whatever is left in the namespace), and init's
// reaches pthaw. A root that was itself pid 1 (a tree frozen inside a
// container whose init it was, or a PID namespace frozen whole from
// outside: capture/pidns_linux.go) needs none of this: the first stub is
// built into it and stays the namespace's init, as the original was.

// pidNS is what a tree restored into a new PID namespace has besides its
// members: the stubs kept there, init first, every parent before its
// children. It is empty when the root is the namespace's init.
type pidNS struct {
	procs   []*nsProc
	aborted bool // abort ran: its PIDs are reaped, perhaps reused already
}

// nsProc is a stub kept in the tree's namespace without being a member:
// the namespace's init, or the stand-in of the root's parent, process
// group leader or session leader.
type nsProc struct {
	pid    int // ours
	nsPid  int // in the namespace
	role   string
	parent *nsProc
	in     *ptrace.Injector
	mem    *ptrace.Mem
	// wait is the namespace pid of the child on the way to the root,
	// whose exit status this one passes on by exiting with it; 0 for a
	// group leader that is nobody's ancestor, which sleeps.
	wait int
	gone bool // ended after forking the root, which init inherited
}

// has reports whether pid is in use in the namespace: a member made so
// far (pids) or one of the stubs.
func (ns *pidNS) has(pid int, pids map[int]int) bool {
	if pids[pid] != 0 {
		return true
	}
	for _, q := range ns.procs {
		if q.nsPid == pid {
			return true
		}
	}
	return false
}

// enterTreeNS makes the root of a tree in the new PID namespace whose
// init is the first stub, p (stopped, traced): the stand-ins the root
// needs, then the root, forked by its parent's with its saved PID. A root
// that was pid 1 is the first stub itself. Runs on the tracer thread.
func (p *Process) enterTreeNS() error {
	t := p.tree
	r := t.img.Procs[0]
	ns := &pidNS{}
	t.ns = ns
	if r.Pid == 1 {
		if r.PPid != 0 {
			return fmt.Errorf("%w: pid 1 with parent %d", image.ErrCorrupt, r.PPid)
		}
		p.stub = 0
		p.notice("restored the tree in a new PID namespace with its saved PIDs (root pid 1, the namespace's init as when it was frozen, is pid %d on this host)", p.pid)
		return nil
	}
	inTree := map[int]bool{}
	for _, m := range t.img.Procs {
		inTree[m.Pid] = true
	}
	switch {
	case inTree[r.PPid], r.Sid != r.Pid && inTree[r.Sid]:
		return fmt.Errorf("%w: pid %d: its parent or session leader is its descendant", image.ErrCorrupt, r.Pid)
	case r.Pgid != r.Pid && inTree[r.Pgid]:
		return fmt.Errorf("pid %d: its process group %d is led by its descendant: not supported in a new PID namespace yet", r.Pid, r.Pgid)
	case r.Sid == r.Pid && r.Pgid != r.Pid:
		return fmt.Errorf("%w: pid %d leads its session but not its process group", image.ErrCorrupt, r.Pid)
	case r.Pgid == 1 && r.Sid != 1:
		return fmt.Errorf("pid %d: process group 1 in session %d: cannot be rebuilt in a new PID namespace", r.Pid, r.Sid)
	}

	init := &nsProc{pid: p.stub, nsPid: 1, role: "init", in: p.in, mem: p.mem}
	ns.procs = []*nsProc{init}
	p.init, p.stub = p.stub, 0
	// The session first: the root must descend from its leader.
	sess := init
	switch r.Sid {
	case 0, r.Pid:
		// Led from outside the namespace (getsid reads 0 there, as it
		// does for pthaw's session, which the root keeps), or by the
		// root itself (setGroup).
	case 1:
		if _, err := init.in.Syscall(unix.SYS_SETSID); err != nil {
			return fmt.Errorf("init: setsid: %w", err)
		}
	default:
		s, err := ns.fork(p.base, init, r.Sid, "session")
		if err != nil {
			return err
		}
		if _, err := s.in.Syscall(unix.SYS_SETSID); err != nil {
			return fmt.Errorf("stand-in of session %d: setsid: %w", r.Sid, err)
		}
		sess = s
	}
	var group *nsProc
	switch r.Pgid {
	case 0, 1, r.Pid, r.Sid:
		// Outside, init's (session 1), the root's own, or the session
		// leader's.
	default:
		g, err := ns.fork(p.base, sess, r.Pgid, "process group")
		if err != nil {
			return err
		}
		if _, err := g.in.Syscall(unix.SYS_SETPGID, 0, 0); err != nil {
			return fmt.Errorf("stand-in of process group %d: setpgid: %w", r.Pgid, err)
		}
		group = g
	}
	parent, handOver := sess, false
	switch {
	case r.PPid == 0:
		p.notice("pid %d's parent was outside its PID namespace; in the new one it is pid %d", r.Pid, sess.nsPid)
	case r.PPid == 1:
		parent = init
		if sess != init {
			// A daemon that forked twice: forked by its session's
			// leader, which then ends, so that init inherits it.
			parent, handOver = sess, true
		}
	case r.PPid == r.Sid:
	case group != nil && r.PPid == r.Pgid:
		parent = group
	default:
		pp, err := ns.fork(p.base, sess, r.PPid, "parent")
		if err != nil {
			return err
		}
		parent = pp
	}

	child, err := forkStub(parent.in, parent.mem, p.base, 0, uint64(unix.SIGCHLD), r.Pid)
	if err != nil {
		return fmt.Errorf("fork pid %d in a new PID namespace: %w", r.Pid, err)
	}
	p.pid = child
	p.mem = ptrace.NewMem(child)
	if p.in, err = ptrace.NewInjector(child, uintptr(p.base+stubCodeOff)); err != nil {
		return err
	}
	if handOver {
		if err := parent.end(); err != nil {
			return err
		}
		init.wait = r.Pid
	} else {
		for q, c := parent, r.Pid; q != nil; q, c = q.parent, q.nsPid {
			q.wait = c
		}
	}
	var held []string
	for _, q := range ns.procs[1:] {
		held = append(held, fmt.Sprintf("%s %d", q.role, q.nsPid))
	}
	msg := fmt.Sprintf("restored the tree in a new PID namespace with its saved PIDs (root pid %d is pid %d on this host", r.Pid, p.pid)
	if len(held) > 0 {
		msg += "; stand-ins hold its " + strings.Join(held, ", ")
	}
	p.notice("%s)", msg)
	return nil
}

// fork makes a stand-in with namespace pid nsPid, a child of parent.
// Runs on the tracer thread.
func (ns *pidNS) fork(base uint64, parent *nsProc, nsPid int, role string) (*nsProc, error) {
	child, err := forkStub(parent.in, parent.mem, base, 0, uint64(unix.SIGCHLD), nsPid)
	if err != nil {
		return nil, fmt.Errorf("stand-in of %s %d: %w", role, nsPid, err)
	}
	q := &nsProc{pid: child, nsPid: nsPid, role: role, parent: parent, mem: ptrace.NewMem(child)}
	ns.procs = append(ns.procs, q)
	if q.in, err = ptrace.NewInjector(child, uintptr(base+stubCodeOff)); err != nil {
		return nil, err
	}
	return q, nil
}

// end makes a stand-in exit, and takes the exit notification owed to us
// as its tracer: its parent, init, reaps it. Runs on the tracer thread.
func (q *nsProc) end() error {
	q.gone = true
	q.mem.Close()
	// The call does not return: the step ends in the exit.
	q.in.Syscall(unix.SYS_EXIT_GROUP, 0)
	if !dying(q.pid) {
		return fmt.Errorf("stand-in of %s %d did not end", q.role, q.nsPid)
	}
	return nil
}

// start lets the namespace's stubs run, children first: each stand-in and
// init passes on its child's exit status, or sleeps. Runs on the tracer
// thread.
func (ns *pidNS) start(base uint64) error {
	for i := len(ns.procs) - 1; i >= 0; i-- {
		q := ns.procs[i]
		if q.gone {
			continue
		}
		q.mem.Close()
		if err := runInitLoop(q.in, base, q.wait, q.nsPid == 1); err != nil {
			return fmt.Errorf("%s %d of the new PID namespace: %w", q.role, q.nsPid, err)
		}
		q.gone = true // detached: nothing of ours to abort any more
	}
	return nil
}

// release closes what the namespace's stubs hold and returns those still
// ours (stopped, traced) to kill, init among them: its exit kills and
// waits for everything else in its namespace, the stand-ins we no longer
// trace included.
func (ns *pidNS) release() []int {
	if ns.aborted {
		return nil
	}
	ns.aborted = true
	var pids []int
	for _, q := range ns.procs {
		if !q.gone {
			q.mem.Close()
			pids = append(pids, q.pid)
		}
	}
	return pids
}

// runInitLoop lets the stopped stub behind in run the init loop for its
// child wait (the sleep loop for 0) and detaches it. First it takes away
// the capabilities an ordinary user's pthaw gave it (dropStubCaps) and
// closes its files, pthaw's stdio it was started with (they would keep a
// pipe of ours open after we are gone); init also drops its parent-death signal,
// which is tied to our tracer thread: it must outlive a pthaw -detach.
// Runs on the tracer thread.
func runInitLoop(in *ptrace.Injector, base uint64, wait int, init bool) error {
	if err := dropStubCaps(in, base); err != nil {
		return err
	}
	if init {
		if _, err := in.Syscall(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, 0); err != nil {
			return fmt.Errorf("pdeathsig: %w", err)
		}
	}
	if _, err := in.Syscall(unix.SYS_CLOSE_RANGE, 0, ^uintptr(0), 0); err != nil {
		return fmt.Errorf("close files: %w", err)
	}
	regs, err := ptrace.GetRegs(in.Tid)
	if err != nil {
		return err
	}
	regs.Rip = base + stubParkOff
	if wait > 0 {
		regs.Rip = base + stubInitOff
		regs.R12 = uint64(wait)
		regs.R13 = base + stubScratchOff
	}
	regs.Orig_rax = ^uint64(0)
	if err := ptrace.SetRegs(in.Tid, regs); err != nil {
		return err
	}
	return ptrace.Detach(in.Tid, 0)
}
