package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// tree is what the members of a restored process tree share. The root's
// Process owns it; every member points to it.
type tree struct {
	img *image.Tree
	// made is the tree announced before a live migration's rounds, as it
	// was made then (early_linux.go); nil otherwise.
	made    *image.Tree
	members []*Process  // creation order: every parent before its children
	pids    map[int]int // saved pid -> pid here
	// shm maps a shared memory object's identity (image.VMA.Shm) to the
	// first area that mapped it; later areas map that area's object.
	shm map[uint64]shmArea
	// pipes holds pthaw's read and write ends of each pipe (by its saved
	// identity, image.FD.Pipe) until the tree starts or is aborted.
	pipes map[uint64][2]int
	// ptys holds pthaw's masters of the tree's ptys (pty_linux.go), by
	// saved index, as long as the pipes.
	ptys map[int]*heldPty
	// unix holds the tree's unix socket pairs (unix_linux.go), by the
	// lower inode of the two ends, as long as the pipes.
	unix map[uint64]*treePair
	// listeners holds the tree's listening unix sockets, by saved inode.
	listeners map[uint64]*treeListener
	// queued are the pairs' queues whose messages carry fds, sent once
	// every member is built (unix_linux.go).
	queued []treeQueue
	// self is pthaw's pidfd of itself, for members in a new PID
	// namespace to reopen (pthawPidfd), -1 until one needs it.
	self int
	// objects are the files without a path the members share
	// (objects_linux.go), held as long as the pipes.
	objects map[uint64]*object
	// ns is set when the tree is restored into a new PID namespace
	// (pidns_linux.go): then pids maps to our numbers, and the members
	// themselves use the saved ones.
	ns *pidNS
	// virt is set when the tree runs with virtual PIDs
	// (virtpid_tree_linux.go): pthaw stays every member's tracer.
	virt *virtTree
	// virtWanted: decided before the members are finished, which load
	// the filter then.
	virtWanted bool
}

// closePipes closes pthaw's ends of the tree's pipes, and its files
// without a path: from then on the members hold the only ones.
func (t *tree) closePipes() {
	for id, ends := range t.pipes {
		closeEnds(ends)
		delete(t.pipes, id)
	}
	for i, h := range t.ptys {
		h.master.Close()
		delete(t.ptys, i)
	}
	t.closeUnix()
	closeAllObjects(t.objects)
	t.objects = nil
	// The namespaces are the members' now (or gone with them).
	t.members[0].ctr.close()
}

type shmArea struct {
	pid        int // ours
	start, end uint64
	// delta is the saved offset of an area less its offset in the object
	// made here (the first area's saved offset when that area made its
	// object alone, 0 when the object was made whole); size is the
	// object's size here.
	delta, size uint64
}

// checkTree validates the tree record: every parent before its children,
// PIDs unique.
func checkTree(t *image.Tree) error { return image.CheckTree(t) }

// buildTree builds every member of a tree from items: the root's stub
// first, then, before any memory arrives, every other member's as a fork
// of its parent's, each put in its process group and session before it
// has children. Then each member is built as its records stream in.
// rec, when set, is the record after the tree's (and its namespaces').
func (p *Process) buildTree(img *image.Tree, items <-chan item, rec any) error {
	if err := checkTree(img); err != nil {
		return err
	}
	// A live migration's pages, by member: each member's go into it
	// once its areas are mapped (buildOne).
	staged := p.staged
	p.staged = nil
	// The tree's processes made while the rounds came (early_linux.go)
	// are kept when the tree is the one announced.
	early := p.tree != nil
	if early {
		p.tree.img = img
	} else {
		p.tree = newTree(img)
		p.tree.members = []*Process{p}
	}
	for i, m := range img.Procs {
		if m.Zombie {
			// No records: it was made and ended with the stubs, or,
			// under a member forked late, is now, its parent built.
			if zp := p.tree.members[i]; i > 0 && zp.cow {
				if err := p.tr.Do(func() error { return zp.forkMember(m) }); err != nil {
					return fmt.Errorf("pid %d: %w", m.Pid, err)
				}
			}
			continue
		}
		var mp *Process
		prepare := p.startTreeRoot
		if early {
			prepare = func() error { return p.prepareEarlyRoot(staged) }
		}
		if i == 0 {
			mp = p
		} else {
			mp = p.tree.members[i]
			prepare = mp.checkStubRoom
			if mp.cow {
				prepare = func() error { return mp.forkLate(m) }
			} else if mp.early {
				prepare = mp.prepareEarly
			}
		}
		if pr, ok := rec.(*image.Process); ok || i == 0 {
			if i > 0 && pr.Pid != m.Pid {
				return fmt.Errorf("%w: process %d where the tree has %d", image.ErrCorrupt, pr.Pid, m.Pid)
			}
		} else {
			return fmt.Errorf("%w: unexpected %T record", image.ErrCorrupt, rec)
		}
		mp.staged = staged.forMember(m.Pid)
		var err error
		if rec, err = mp.buildOne(items, rec, prepare); err != nil {
			return fmt.Errorf("pid %d: %w", m.Pid, err)
		}
		if mp.proc.Pid != m.Pid || mp.proc.Threads != m.Threads {
			return fmt.Errorf("%w: process %d where the tree has %d", image.ErrCorrupt, mp.proc.Pid, m.Pid)
		}
	}
	if _, ok := rec.(*image.End); !ok {
		return fmt.Errorf("%w: unexpected %T record after the tree", image.ErrCorrupt, rec)
	}
	for _, m := range p.tree.members {
		m.built = true
	}
	return nil
}

// newTree returns the shared state of a tree being restored from img,
// with no member made yet.
func newTree(img *image.Tree) *tree {
	return &tree{img: img, pids: map[int]int{}, shm: map[uint64]shmArea{}, pipes: map[uint64][2]int{}, ptys: map[int]*heldPty{}, unix: map[uint64]*treePair{}, listeners: map[uint64]*treeListener{}, self: -1}
}

// startTreeRoot starts the root's stub with its saved PID (a new one, said,
// when it stays taken: a tree is not retried just before it starts), and
// forks every other member's stub from it.
func (p *Process) startTreeRoot() error {
	return p.startTreeAt(freeRange(stubSize, p.snapshotRanges()))
}

// startTreeAt is startTreeRoot with the stubs' code at base.
func (p *Process) startTreeAt(base uint64) error {
	p.tree.members = []*Process{p}
	if err := p.launchStub(base); err != nil {
		return err
	}
	if err := p.tr.Do(p.stubPID); err != nil {
		return err
	}
	return p.tr.Do(func() error {
		if p.retryPID {
			if err := p.takePID(true); err != nil {
				return err
			}
		}
		t := p.tree
		root := t.img.Procs[0].Pid // p.proc's, when read (not early)
		t.pids[root] = p.pid
		if err := p.setGroup(t.img.Procs[0]); err != nil {
			return fmt.Errorf("pid %d: %w", root, err)
		}
		byPid := map[int]*Process{root: p}
		helpers, err := p.groupHelpers()
		if err != nil {
			return err
		}
		for _, m := range t.img.Procs[1:] {
			parent := byPid[m.PPid]
			c := &Process{tr: p.tr, opts: p.opts, tree: t, parent: parent, base: parent.base}
			t.members = append(t.members, c)
			byPid[m.Pid] = c
			if m.Cow || parent.cow {
				// Forked once its parent's memory is built (forkLate),
				// as is every descendant of such a member: its parent
				// does not exist yet.
				c.cow = true
				continue
			}
			if err := c.forkMember(m); err != nil {
				return fmt.Errorf("pid %d: %w", m.Pid, err)
			}
		}
		return p.endGroupHelpers(helpers)
	})
}

// forkMember makes the stub of member m, p, as a fork of its parent's, in
// its group and session; a zombie's stub ends at once (exitAs). Runs on
// the tracer thread.
func (p *Process) forkMember(m image.TreeProc) error {
	if err := p.parent.fork(p, m.Pid); err != nil {
		return err
	}
	p.tree.pids[m.Pid] = p.pid
	if err := p.setGroup(m); err != nil {
		return err
	}
	if m.Zombie {
		if err := p.exitAs(m.ExitStatus); err != nil {
			return fmt.Errorf("zombie: %w", err)
		}
	}
	return nil
}

// groupHelpers makes, for each process group of members whose leader is
// gone (no member leads it; the freeze checked that nothing outside the
// tree is in it), a helper: a fork of the root's stub with the group's
// number as its PID, leading a group of its own, for the members to join
// (setGroup); endGroupHelpers then ends and reaps it, and the group goes
// on as long as a member is in it, as it did. In a tree's own PID
// namespace stand-ins do this (pidns_linux.go). Runs on the tracer
// thread.
func (p *Process) groupHelpers() ([]*Process, error) {
	t := p.tree
	if t.ns != nil {
		return nil, nil
	}
	members := map[int]bool{}
	for _, m := range t.img.Procs {
		members[m.Pid] = true
	}
	var helpers []*Process
	for _, m := range t.img.Procs[1:] {
		if members[m.Pgid] || m.Pgid == t.img.Procs[0].Pgid || t.pids[m.Pgid] != 0 {
			continue
		}
		h := &Process{tr: p.tr, opts: p.opts, tree: t, parent: p, base: p.base}
		if err := p.fork(h, m.Pgid); err != nil {
			return helpers, fmt.Errorf("process group %d: helper: %w", m.Pgid, err)
		}
		helpers = append(helpers, h)
		if _, err := h.call(unix.SYS_SETPGID, 0, 0); err != nil {
			return helpers, fmt.Errorf("process group %d: helper: setpgid(0, 0): %w", m.Pgid, err)
		}
		t.pids[m.Pgid] = h.pid
	}
	return helpers, nil
}

// endGroupHelpers ends the helpers groupHelpers made, reaps them in the
// root and takes their SIGCHLD back (the root's pending signals are the
// saved ones, queued later). Runs on the tracer thread.
func (p *Process) endGroupHelpers(helpers []*Process) error {
	if len(helpers) == 0 {
		return nil
	}
	for _, h := range helpers {
		if err := h.exitAs(0); err != nil {
			return fmt.Errorf("process group helper %d: %w", h.pid, err)
		}
		if _, err := p.call(unix.SYS_WAIT4, uintptr(h.pid), 0, unix.WALL, 0); err != nil {
			return fmt.Errorf("process group helper %d: wait4: %w", h.pid, err)
		}
		for saved, here := range p.tree.pids {
			if here == h.pid {
				delete(p.tree.pids, saved)
			}
		}
	}
	return p.takeSIGCHLD()
}

// takeSIGCHLD takes back the SIGCHLD pending in stub p (its pending
// signals are the saved ones, queued later). Runs on the tracer thread.
func (p *Process) takeSIGCHLD() error {
	scratch := p.base + stubScratchOff
	b := make([]byte, 32)
	binary.LittleEndian.PutUint64(b, 1<<(unix.SIGCHLD-1)) // and a zero timeout at 16
	if err := p.mem.Write(scratch, b); err != nil {
		return err
	}
	for {
		if _, err := p.call(unix.SYS_RT_SIGTIMEDWAIT, uintptr(scratch), 0, uintptr(scratch+16), 8); err != nil {
			break // EAGAIN: none left
		}
	}
	return nil
}

// exitAs ends the stub of a zombie member with its saved wait status,
// exit_group(code) or the signal that killed it, and takes the exit
// notification owed to us as its tracer: the process stays a zombie for
// its parent to reap. Runs on the tracer thread.
func (p *Process) exitAs(status int) error {
	p.zombie = true
	p.mem.Close()
	ws := unix.WaitStatus(status)
	switch {
	case ws.Exited():
		// The call does not return: the step ends in the exit.
		p.in.Syscall(unix.SYS_EXIT_GROUP, uintptr(ws.ExitStatus()))
	case ws.Signaled():
		// No core file: the original's, if any, was written when it died.
		unix.Prlimit(p.pid, unix.RLIMIT_CORE, &unix.Rlimit{}, nil)
		sig := ws.Signal()
		// Stubs run with every signal blocked; this one must arrive.
		if err := ptrace.SetSigmask(p.pid, 0); err != nil {
			return err
		}
		if err := unix.Tgkill(p.pid, p.pid, sig); err != nil {
			return fmt.Errorf("kill with %v: %w", sig, err)
		}
		// SIGKILL ends the stub at once, traced and stopped as it is:
		// there is nothing to resume (ESRCH), only the exit to wait for.
		if err := ptrace.Cont(p.pid, 0); err != nil && !(sig == unix.SIGKILL && errors.Is(err, unix.ESRCH)) {
			return err
		}
		// One bound for the whole death, however many stops come first.
		deadline := time.Now().Add(ptrace.StopTimeout)
		for {
			st, err := ptrace.WaitTimeout(p.pid, time.Until(deadline))
			if errors.Is(err, ptrace.ErrExited) {
				break
			}
			if err != nil {
				return err
			}
			// Deliver our signal at its delivery stop; nothing else.
			var deliver unix.Signal
			if st.Sig() == sig && st.Event() == 0 {
				deliver = sig
			}
			if err := ptrace.Cont(p.pid, deliver); err != nil && !(sig == unix.SIGKILL && errors.Is(err, unix.ESRCH)) {
				return err
			}
		}
	default:
		return fmt.Errorf("%w: wait status %#x", image.ErrCorrupt, status)
	}
	if !dying(p.pid) {
		return fmt.Errorf("pid %d did not end", p.pid)
	}
	return nil
}

// fork makes c's stub: a copy of p's, p's child, with PID want (a new
// one, said, when want is taken on this host). In a tree's own PID
// namespace want is the number there. Runs on the tracer thread.
func (p *Process) fork(c *Process, want int) error {
	set := want
	if p.opts.NewPID {
		set = 0
	}
	child, err := forkStub(p.in, p.mem, p.base, 0, uint64(unix.SIGCHLD), set)
	// In a new PID namespace every saved PID is free: a taken one is a
	// damaged snapshot, not a reason to change it.
	if set > 0 && !p.opts.PIDNamespace && (errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EPERM)) {
		why := err
		if child, err = forkStub(p.in, p.mem, p.base, 0, uint64(unix.SIGCHLD), 0); err == nil {
			if errors.Is(why, unix.EEXIST) {
				p.notice("pid %d is taken on this host; restored as pid %d", want, child)
			} else {
				p.notice("cannot restore pid %d (%v); restored as pid %d", want, why, child)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("fork: %w", err)
	}
	c.pid = child
	c.mem = ptrace.NewMem(child)
	in, err := ptrace.NewInjector(child, uintptr(c.base+stubCodeOff))
	if err != nil {
		return err
	}
	c.in = in
	return nil
}

// setGroup puts the new stub of member m in its session and process
// group. Its children inherit them, so this is done before they are
// forked. A group or session led from outside the tree stays the one
// inherited (in a tree's own PID namespace, the one of a stand-in that
// holds the leader's PID). Runs on the tracer thread.
func (p *Process) setGroup(m image.TreeProc) error {
	// The group's leader as the process names it: ours, or in the tree's
	// own namespace the saved number, once it exists there.
	leader := p.tree.pids[m.Pgid]
	if ns := p.tree.ns; ns != nil {
		leader = 0
		if ns.has(m.Pgid, p.tree.pids) {
			leader = m.Pgid
		}
	}
	switch {
	case m.Sid == m.Pid:
		if _, err := p.call(unix.SYS_SETSID); err != nil {
			return fmt.Errorf("setsid: %w", err)
		}
	case m.Pgid == m.Pid:
		if _, err := p.call(unix.SYS_SETPGID, 0, 0); err != nil {
			return fmt.Errorf("setpgid(0, 0): %w", err)
		}
	case leader != 0:
		if _, err := p.call(unix.SYS_SETPGID, 0, uintptr(leader)); err != nil {
			return fmt.Errorf("setpgid(0, %d): %w", leader, err)
		}
	}
	return nil
}

// checkStubRoom checks that a forked member's memory leaves room for the
// stub it was forked as (placed clear of the root's memory only).
func (p *Process) checkStubRoom() error {
	lo, hi := p.base, p.base+stubSize
	for _, r := range p.snapshotRanges() {
		if r[0] < hi && lo < r[1] {
			return fmt.Errorf("memory %#x-%#x overlaps the restorer's stub at %#x (not supported yet)", r[0], r[1], lo)
		}
	}
	return nil
}

// sharedArea returns how to map v, a shared anonymous area, when another
// area of its object was mapped before: the path of that area's object
// and v's offset in it. Without one, v becomes the first.
func (p *Process) sharedArea(v *image.VMA) (path string, off uint64, ok bool, err error) {
	if p.tree == nil || v.Shm == 0 {
		return "", 0, false, nil
	}
	a, ok := p.tree.shm[v.Shm]
	if !ok {
		return "", 0, false, nil
	}
	if v.Offset < a.delta || v.Offset-a.delta+v.Len() > a.size {
		return "", 0, false, fmt.Errorf("%s: lies outside the %#x bytes of its memory object (mapped first at %#x-%#x of pid %d): not supported yet", vmaName(v), a.size, a.start, a.end, a.pid)
	}
	return fmt.Sprintf("/proc/%d/map_files/%x-%x", a.pid, a.start, a.end), v.Offset - a.delta, true, nil
}

// mappedShared records v, just mapped as a fresh shared anonymous area, as
// the first of its object, which is whole (size bytes, v at its saved
// offset) or v alone.
func (p *Process) mappedShared(v *image.VMA, whole bool, size uint64) {
	if p.tree != nil && v.Shm != 0 {
		a := shmArea{pid: p.pid, start: v.Start, end: v.End, delta: v.Offset, size: v.Len()}
		if whole {
			a.delta, a.size = 0, size
		}
		p.tree.shm[v.Shm] = a
	}
}

// startTree finishes every member, then lets them all run, children
// first, so that no parent finds a child still being built. Runs on the
// tracer thread.
func (p *Process) startTree() error {
	defer p.tree.closePipes()
	if err := p.tree.shutdownUnix(); err != nil {
		return err
	}
	if err := p.bindTreeListeners(); err != nil {
		return err
	}
	p.tree.virtWanted = p.tree.wantVirt(p.opts)
	if err := p.lateMounts(); err != nil {
		return err
	}
	for _, m := range p.tree.members {
		if m.zombie {
			continue
		}
		if err := m.finish(); err != nil {
			return fmt.Errorf("pid %d: %w", m.proc.Pid, err)
		}
	}
	// Every member holds its own attachments and fds of the objects by
	// now: pthaw's go before any member runs, so that what the program
	// sees (a SysV segment's attachment count, a file's holders) is its
	// own from its first instruction on.
	closeAllObjects(p.tree.objects)
	p.tree.objects = nil
	// Init and the stand-ins first: each blocks in wait4 for a child that
	// is still stopped, and a failure here still finds every member
	// stopped, to kill.
	if ns := p.tree.ns; ns != nil {
		if err := ns.start(p.base); err != nil {
			return err
		}
	}
	resume := (*Process).detach
	if p.tree.virtWanted {
		v := newVirtTree(p.tree)
		p.notice("virtual PIDs: every member of the tree sees its saved PIDs (%s): pthaw traces the members and translates getpid, gettid, getppid, getpgid, getsid, wait4, waitid and signals by PID", v.describe(p.tree))
		resume = (*Process).resumeTraced
		p.tree.virt = v
	}
	var errs []error
	for i := len(p.tree.members) - 1; i >= 0; i-- {
		if m := p.tree.members[i]; !m.zombie {
			if err := resume(m); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// subreaper counts the tree aborts under way, which make this process a
// child subreaper (PR_SET_CHILD_SUBREAPER) while they last.
var subreaper struct {
	sync.Mutex
	n   int
	was bool // a subreaper already, before the first
}

// abortTree kills every process of the tree's restore — every member, its
// threads, the root's first stub, a namespace's init and stand-ins — and
// reaps them all. A member's parent is another member, a stopped stub
// that cannot reap it: killed too, it leaves its children to the nearest
// child subreaper, init otherwise, which may never reap them (docs/
// pfreeze.md: a damaged snapshot leaves nothing behind). So for as long
// as the abort lasts we are a subreaper: every member is our descendant,
// and comes back to us to be reaped. (In a namespace of its own, its
// init reaps them, and we init.)
func (p *Process) abortTree() {
	t := p.tree
	var pids []int
	for _, m := range t.members {
		pids = append(pids, m.release()...)
	}
	if t.ns != nil {
		pids = append(pids, t.ns.release()...)
	}
	if len(pids) > 0 {
		becomeSubreaper()
		killAndReap(p.tr, pids)
		endSubreaper()
	}
	t.closePipes()
}

func becomeSubreaper() {
	subreaper.Lock()
	defer subreaper.Unlock()
	if subreaper.n == 0 {
		subreaper.was = isSubreaper()
		unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	}
	subreaper.n++
}

func endSubreaper() {
	subreaper.Lock()
	defer subreaper.Unlock()
	if subreaper.n--; subreaper.n == 0 && !subreaper.was {
		unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	}
}

// Pids returns the host PIDs of every process restored: the root (and the
// process waited for in its place, when another), or each member of a
// tree, parents before their children.
func (p *Process) Pids() []int {
	if p.tree == nil {
		if p.pid != p.WaitPid() {
			return []int{p.WaitPid(), p.pid}
		}
		return []int{p.pid}
	}
	pids := make([]int, 0, len(p.tree.members))
	for _, m := range p.tree.members {
		pids = append(pids, m.pid)
	}
	return pids
}

// forkLate makes the stub of a member that shares pages with its parent
// (image.TreeProc.Cow: zdtm's cow00): a fork of its parent's stub once the
// parent's memory is built, so that the pages the two had in common
// (image.VMA.InParent) are one physical page again, copy-on-write, not
// two copies. (A descendant of such a member, whose parent did not exist
// before, is forked so too, image.LateMembers, with no pages kept unless
// it is Cow itself.) Its areas with such pages are kept from the fork (p.kept),
// read-write for the pages records to come, and their other pages
// dropped (they read as zero until those records fill them); every other
// area of the parent's goes when the member's memory is mapped
// (moveKernelAreas), its fds when its own are opened (openFiles).
func (p *Process) forkLate(m image.TreeProc) error {
	return p.tr.Do(func() error {
		parent := p.parent
		if err := p.forkMember(m); err != nil {
			return err
		}
		if err := p.checkStubRoom(); err != nil {
			return err
		}
		if p.kept == nil {
			p.kept = map[uint64]bool{}
		}
		var calls []batchCall
		for _, v := range p.vmas {
			if len(v.InParent) == 0 {
				continue
			}
			if !parent.hasAnon(v.Start, v.End) {
				return fmt.Errorf("%w: %s: pages in the parent, which has no private area there", image.ErrCorrupt, vmaName(v))
			}
			p.kept[v.Start] = true
			fail := func(err error) error { return fmt.Errorf("%s: %w", vmaName(v), err) }
			calls = append(calls, batchCall{nr: unix.SYS_MPROTECT, args: [6]uintptr{uintptr(v.Start), uintptr(v.Len()), unix.PROT_READ | unix.PROT_WRITE}, fail: fail})
			at := v.Start
			for _, r := range append(v.InParent, [2]uint64{v.End, v.End}) {
				if r[0] > at {
					calls = append(calls, batchCall{nr: unix.SYS_MADVISE, args: [6]uintptr{uintptr(at), uintptr(r[0] - at), unix.MADV_DONTNEED}, fail: fail})
				}
				at = r[1]
			}
		}
		_, err := p.callBatch(calls)
		return err
	})
}

// hasAnon reports whether [start, end) lies in one private anonymous area
// of p's.
func (p *Process) hasAnon(start, end uint64) bool {
	for _, v := range p.vmas {
		if v.Kind == image.VMAAnon && !v.Shared && v.Start <= start && end <= v.End {
			return true
		}
	}
	return false
}
