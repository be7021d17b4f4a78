package image

import (
	"fmt"
	"sort"
)

// Bounds on what a snapshot may ask for: a snapshot can come from anyone
// who can reach a listener, so nothing it says sizes work unchecked.
const (
	MaxThreads = 1 << 16
	MaxVMAs    = 1 << 20 // vm.max_map_count is 65530 by default
	MaxPending = 1 << 12 // per queue; RLIMIT_SIGPENDING is in this range
	// MaxAuxv is what fits in the loader's scratch page after struct
	// prctl_mm_map (104 bytes): (4096 - 104) / 8 words.
	MaxAuxv   = 499
	MaxGroups = 65536 // NGROUPS_MAX
	MaxFd     = 1 << 20
	// MaxAddr is the end of the x86-64 user address space (4-level paging).
	MaxAddr = 1 << 47
	// SiginfoSize is the size of a siginfo_t on every Linux architecture.
	SiginfoSize = 128
)

// Signals whose disposition cannot be changed (sigaction refuses them).
const (
	sigKill = 9
	sigStop = 19
)

const pageSize = 4096

// checker holds the structural rules of a snapshot, applied by the
// Decoder to every record in turn: which record may follow which, and
// the bounds and order of each record's fields. Every reader of a
// snapshot — a restore, pthaw -debug, pfreeze -debug — gets the same
// verdict from it, before it acts on a record. (What depends on the host
// — files that changed, PIDs that are taken — is the loader's to check.)
type checker struct {
	regs int // registers per thread; 0: not checked

	seen   bool // a record was read
	parent bool // the snapshot has a Parent record (incremental)

	started bool
	tree    *Tree
	ns      bool // a Namespaces record was read
	member  int  // index in tree.Procs of the member being read

	proc    *Process
	threads []*Thread
	vmas    []*VMA
	meta    bool // the process's metadata (threads, areas) is complete
	lastFd  int
	fds     int
	fdSet   map[int]bool // the process's fds so far
	fdRefs  []fdRef      // fds one of them names, checked at its end
	// treeFds are the fds of each tree member read so far, by saved
	// PID, and treeRefs the fds of other members a member names,
	// checked at the tree's end.
	treeFds  map[int]map[int]bool
	treeRefs []treeRef
	files    map[uint64]int64 // File records so far (of every member): the next offset of each
	sizes    map[uint64]int64 // and their sizes
}

// fdRef is an fd that fd from names (the description it shares, or an
// epoll registration): it must be in the snapshot too.
type fdRef struct {
	from, to int
	what     string
}

// treeRef is fd to of tree member holder that fd from of member pid
// names (a queued fd, SCM_RIGHTS): it must be in the snapshot too.
type treeRef struct {
	pid, from  int
	holder, to int
}

// check applies the rules to rec, the next record.
func (c *checker) check(rec any) error {
	first := !c.seen
	c.seen = true
	// An incremental snapshot names its parent first (parent.go).
	if r, ok := rec.(*Parent); ok {
		if !first {
			return c.unexpected(r)
		}
		if len(r.SHA256) != DigestSize {
			return corruptf("parent record: digest of %d bytes", len(r.SHA256))
		}
		c.parent = true
		return nil
	}
	// Pre-copy records come before everything else; a tree's are each
	// after the PrecopyMember record of the member they are for.
	switch r := rec.(type) {
	case *PrecopyMember:
		if r.Pid <= 0 {
			return corruptf("pre-copy member pid %d", r.Pid)
		}
		return c.precopy(r, 0, pageSize)
	case *Precopy:
		return c.precopy(r, r.Addr, r.Len)
	case *Drop:
		return c.precopy(r, r.Addr, r.Len)
	case *Round:
		return c.precopy(r, 0, pageSize)
	case *PrecopyTree:
		if len(r.Procs) == 0 {
			return corruptf("pre-copy tree of no process")
		}
		for _, m := range r.Procs {
			if m.Pid <= 0 {
				return corruptf("pre-copy tree: pid %d", m.Pid)
			}
		}
		return c.precopy(r, 0, pageSize)
	case *PrecopyArea:
		if r.End <= r.Start {
			return corruptf("pre-copy area %#x-%#x", r.Start, r.End)
		}
		return c.precopy(r, r.Start, r.End-r.Start)
	}
	if !c.started {
		c.started = true
		if t, ok := rec.(*Tree); ok {
			return c.startTree(t)
		}
	}
	switch r := rec.(type) {
	case *Tree:
		return c.unexpected(r)
	case *Namespaces:
		// Right after the tree record, once; the tree's root is the init
		// of its PID namespace (pid 1).
		if c.tree == nil || c.proc != nil || c.ns || c.tree.Procs[0].Pid != 1 {
			return c.unexpected(r)
		}
		c.ns = true
		return CheckNamespaces(r)
	case *Process:
		if c.proc != nil {
			// The next member of a tree.
			if c.tree == nil {
				return c.unexpected(r)
			}
			if err := c.endProcess(); err != nil {
				return err
			}
			c.member++
			c.skipZombies()
			if c.member >= len(c.tree.Procs) {
				return c.unexpected(r)
			}
			if m := c.tree.Procs[c.member]; r.Pid != m.Pid {
				return c.wrap(corruptf("process %d where the tree has %d", r.Pid, m.Pid))
			}
		}
		c.proc, c.threads, c.vmas, c.meta, c.fds = r, nil, nil, false, 0
		c.fdSet, c.fdRefs = map[int]bool{}, nil
		if c.files == nil { // a tree's members share them: kept across
			c.files, c.sizes = map[uint64]int64{}, map[uint64]int64{}
		}
		return nil
	case *Thread:
		p := c.proc
		if c.meta {
			return c.unexpected(r)
		}
		if p == nil || len(c.vmas) > 0 || len(c.threads) >= p.Threads || p.Threads > MaxThreads {
			return c.wrap(corruptf("unexpected thread record"))
		}
		if !ThreadInPlace(p, len(c.threads), r.Tid) {
			return c.wrap(corruptf("thread %d out of place", r.Tid))
		}
		if c.regs > 0 && len(r.Regs) != c.regs {
			return c.wrap(corruptf("thread %d has %d registers", r.Tid, len(r.Regs)))
		}
		c.threads = append(c.threads, r)
		return nil
	case *VMA:
		if c.proc == nil || c.meta || len(c.threads) != c.proc.Threads {
			if c.meta {
				return c.unexpected(r)
			}
			return c.wrap(corruptf("memory area before the thread records"))
		}
		if err := CheckVMA(r, c.vmas); err != nil {
			return c.wrap(err)
		}
		c.vmas = append(c.vmas, r)
		return nil
	case *File:
		if c.proc == nil || c.meta || len(c.threads) != c.proc.Threads {
			return c.unexpected(r)
		}
		return c.wrap(c.checkFile(r))
	}
	// Pages, FD, End: the metadata is complete.
	if err := c.completeMeta(); err != nil {
		return err
	}
	switch r := rec.(type) {
	case *Pages:
		return c.wrap(CheckPages(r.Addr, r.Len, c.vmas))
	case *ParentPages:
		n := len(r.Digests)
		if !c.parent || n == 0 || n%DigestSize != 0 || n > MaxParentPages*DigestSize || r.Addr%pageSize != 0 {
			return c.wrap(corruptf("parent pages at %#x (%d digest bytes) in a snapshot without a parent record, or malformed", r.Addr, n))
		}
		return c.wrap(CheckPages(r.Addr, r.Len(), c.vmas))
	case *FD:
		if err := CheckFD(r); err != nil {
			return c.wrap(err)
		}
		if c.fds > 0 && c.lastFd >= r.Fd {
			return c.wrap(corruptf("fds out of order at %d", r.Fd))
		}
		if _, ok := c.files[r.Object]; r.Object != 0 && (!ok || r.Kind != FDFile) {
			return c.wrap(corruptf("fd %d: file object %#x", r.Fd, r.Object))
		}
		c.lastFd, c.fds = r.Fd, c.fds+1
		c.fdSet[r.Fd] = true
		if (r.Kind != FDInherit || r.Fd > 2) && r.Desc != r.Fd {
			c.fdRefs = append(c.fdRefs, fdRef{r.Fd, r.Desc, "shares fd"})
		}
		if r.Unix != nil {
			for i, m := range r.Unix.Rights {
				for j, x := range m {
					if by := r.Unix.Holder(i, j); by != 0 {
						if c.tree == nil {
							return c.wrap(corruptf("fd %d (unix socket) carries fd %d of pid %d, outside a tree", r.Fd, x, by))
						}
						c.treeRefs = append(c.treeRefs, treeRef{c.tree.Procs[c.member].Pid, r.Fd, by, x})
						continue
					}
					c.fdRefs = append(c.fdRefs, fdRef{r.Fd, x, "(unix socket) carries fd"})
				}
			}
		}
		for _, t := range r.Epoll {
			if t.Via != nil {
				c.fdRefs = append(c.fdRefs, fdRef{r.Fd, *t.Via, "(epoll) watches the file of fd"})
				continue
			}
			c.fdRefs = append(c.fdRefs, fdRef{r.Fd, t.Fd, "(epoll) watches fd"})
		}
		return nil
	case *End:
		if c.tree == nil {
			return c.checkFdRefs()
		}
		if err := c.endProcess(); err != nil {
			return err
		}
		c.member++
		c.skipZombies()
		if c.member < len(c.tree.Procs) {
			return corruptf("unexpected %T record after the tree", r)
		}
		for _, t := range c.treeRefs {
			if !c.treeFds[t.holder][t.to] {
				return corruptf("pid %d: fd %d (unix socket) carries fd %d of pid %d, which is not in the snapshot", t.pid, t.from, t.to, t.holder)
			}
		}
		return nil
	}
	return c.unexpected(rec)
}

func (c *checker) startTree(t *Tree) error {
	if err := CheckTree(t); err != nil {
		return err
	}
	c.tree = t
	c.skipZombies()
	return nil
}

// skipZombies moves member past zombies: they have no records.
func (c *checker) skipZombies() {
	for c.member < len(c.tree.Procs) && c.tree.Procs[c.member].Zombie {
		c.member++
	}
}

// precopy checks a pre-copy record: before any other, in range.
func (c *checker) precopy(rec any, addr, n uint64) error {
	if c.started {
		return c.unexpected(rec)
	}
	return checkPrecopy(addr, n)
}

// completeMeta checks, when the first record after a process's threads
// and areas arrives, that they are all there and within bounds.
func (c *checker) completeMeta() error {
	if c.meta {
		return nil
	}
	if c.proc == nil || len(c.threads) == 0 || len(c.threads) != c.proc.Threads {
		return c.wrap(corruptf("missing process or thread records"))
	}
	if err := CheckProcess(c.proc, c.threads); err != nil {
		return c.wrap(err)
	}
	for _, v := range c.vmas {
		if _, ok := c.files[v.Object]; v.Object != 0 && (!ok || v.Kind != VMAFile) {
			return c.wrap(corruptf("%s: file object %#x", v.Label(), v.Object))
		}
	}
	c.meta = true
	return nil
}

// checkFdRefs checks, once a process's fds are all read, that every fd
// one of them names is among them.
func (c *checker) checkFdRefs() error {
	for _, r := range c.fdRefs {
		if !c.fdSet[r.to] {
			return c.wrap(corruptf("fd %d %s %d, which is not in the snapshot", r.from, r.what, r.to))
		}
	}
	return nil
}

// endProcess checks a tree member's records against the tree's.
func (c *checker) endProcess() error {
	if err := c.completeMeta(); err != nil {
		return err
	}
	if err := c.checkFdRefs(); err != nil {
		return err
	}
	m := c.tree.Procs[c.member]
	if c.proc.Pid != m.Pid || c.proc.Threads != m.Threads {
		return c.wrap(corruptf("process %d where the tree has %d", c.proc.Pid, m.Pid))
	}
	if c.treeFds == nil {
		c.treeFds = map[int]map[int]bool{}
	}
	c.treeFds[m.Pid] = c.fdSet
	return nil
}

func (c *checker) unexpected(rec any) error {
	return c.wrap(corruptf("unexpected %T record", rec))
}

// wrap names the tree member an error is about.
func (c *checker) wrap(err error) error {
	if err == nil || c.tree == nil || c.member >= len(c.tree.Procs) {
		return err
	}
	return fmt.Errorf("pid %d: %w", c.tree.Procs[c.member].Pid, err)
}

// CheckTree checks a tree record: members in an order where each parent
// comes before its children, the root first, unique PIDs.
func CheckTree(t *Tree) error {
	if len(t.Procs) == 0 {
		return corruptf("empty tree")
	}
	seen := map[int]bool{}
	zombie := map[int]bool{}
	for i, m := range t.Procs {
		if m.Pid <= 0 || seen[m.Pid] || (m.Threads <= 0) != m.Zombie || (m.Zombie && i == 0) || (m.Pid == 1 && i > 0) || m.Threads > MaxThreads {
			return corruptf("tree member %d (pid %d)", i, m.Pid)
		}
		if (i == 0) == seen[m.PPid] || zombie[m.PPid] {
			return corruptf("tree member pid %d out of place (parent %d)", m.Pid, m.PPid)
		}
		seen[m.Pid] = true
		zombie[m.Pid] = m.Zombie
	}
	// A member forked late (Cow, and every descendant of one) is one
	// nothing else needs earlier: whoever is in the group or session it
	// leads is forked late too, after it.
	for i, m := range t.Procs {
		if m.Cow && (i == 0 || m.Zombie) {
			return corruptf("tree member pid %d forked from its parent late", m.Pid)
		}
	}
	late := LateMembers(t.Procs)
	for i, o := range t.Procs {
		for _, l := range []int{o.Pgid, o.Sid} {
			if j, ok := late[l]; ok && l != o.Pid && (!lateAt(late, o.Pid) || i < j) {
				return corruptf("tree member pid %d forked from its parent late, but pid %d needs it earlier", l, o.Pid)
			}
		}
	}
	return nil
}

// LateMembers returns the members of a tree (procs, every parent before
// its children) that are forked from their parent only once the parent's
// memory is built: every Cow member and every descendant of one, each
// with its index in procs.
func LateMembers(procs []TreeProc) map[int]int {
	late := map[int]int{}
	for i, m := range procs {
		if _, ok := late[m.PPid]; i > 0 && (m.Cow || ok) {
			late[m.Pid] = i
		}
	}
	return late
}

func lateAt(late map[int]int, pid int) bool {
	_, ok := late[pid]
	return ok
}

// MayForkLate reports whether procs[i] may be forked from its parent
// once the parent's memory is built (marked Cow), it and its descendants
// (which then come late too) needed by nobody earlier: every member in a
// group or session one of them leads is one of them, after its leader.
// Never the root or a zombie.
func MayForkLate(procs []TreeProc, i int) bool {
	if i <= 0 || i >= len(procs) || procs[i].Zombie {
		return false
	}
	sub := map[int]int{procs[i].Pid: i} // the subtree, by index
	for j := i + 1; j < len(procs); j++ {
		if _, ok := sub[procs[j].PPid]; ok {
			sub[procs[j].Pid] = j
		}
	}
	for j, o := range procs {
		for _, l := range []int{o.Pgid, o.Sid} {
			if k, ok := sub[l]; ok && l != o.Pid && (!lateAt(sub, o.Pid) || j < k) {
				return false
			}
		}
	}
	return true
}

// CheckProcess checks the bounds of a process record and its threads'.
func CheckProcess(pr *Process, threads []*Thread) error {
	switch {
	case pr.Pid <= 0:
		return corruptf("pid %d", pr.Pid)
	case len(pr.Rlimits) > 16, len(pr.Sigacts) > 64, len(pr.Itimers) > 3, len(pr.Auxv) > MaxAuxv,
		len(pr.Pending) > MaxPending, len(pr.Creds.Groups) > MaxGroups:
		return corruptf("process record out of bounds")
	}
	for res, rl := range pr.Rlimits {
		if rl.Cur > rl.Max {
			return corruptf("rlimit %d soft %d above hard %d", res, rl.Cur, rl.Max)
		}
	}
	for _, s := range pr.Sigacts {
		if s.Sig < 1 || s.Sig > 64 || s.Sig == sigKill || s.Sig == sigStop {
			return corruptf("sigaction for signal %d", s.Sig)
		}
	}
	if err := checkSiginfos(pr.Pending); err != nil {
		return err
	}
	if err := checkSeccomp(pr.Seccomp); err != nil {
		return err
	}
	if len(pr.Timers) > MaxTimers {
		return corruptf("%d POSIX timers", len(pr.Timers))
	}
	for _, tm := range pr.Timers {
		if tm.ID < 0 || tm.ValueNs < 0 || tm.IntervalNs < 0 || tm.Signo < 0 || tm.Signo > 64 {
			return corruptf("POSIX timer %d", tm.ID)
		}
	}
	for _, t := range threads {
		if err := checkSeccomp(t.Seccomp); err != nil {
			return fmt.Errorf("thread %d: %w", t.Tid, err)
		}
		if t.Creds != nil && len(t.Creds.Groups) > MaxGroups {
			return corruptf("thread %d record out of bounds", t.Tid)
		}
		if len(t.Pending) > MaxPending || len(t.XState) > 1<<16 {
			return corruptf("thread %d record out of bounds", t.Tid)
		}
		if err := checkSiginfos(t.Pending); err != nil {
			return fmt.Errorf("thread %d: %w", t.Tid, err)
		}
	}
	return nil
}

func checkSiginfos(q []Siginfo) error {
	for _, si := range q {
		if len(si) != SiginfoSize {
			return corruptf("siginfo of %d bytes", len(si))
		}
	}
	return nil
}

// CheckVMA checks a memory area against the areas before it: page
// aligned, in the user address space, in ascending order, of a known kind.
func CheckVMA(v *VMA, prev []*VMA) error {
	if len(prev) >= MaxVMAs {
		return corruptf("more than %d memory areas", MaxVMAs)
	}
	if v.Start%pageSize != 0 || v.End%pageSize != 0 || v.End <= v.Start || v.End > MaxAddr {
		return corruptf("memory area %#x-%#x", v.Start, v.End)
	}
	for i, r := range v.InParent {
		if v.Kind != VMAAnon || v.Shared || r[0]%pageSize != 0 || r[1]%pageSize != 0 || r[1] <= r[0] ||
			r[0] < v.Start || r[1] > v.End || (i > 0 && r[0] < v.InParent[i-1][1]) {
			return corruptf("memory area %#x-%#x: pages in its parent %#x-%#x", v.Start, v.End, r[0], r[1])
		}
	}
	if len(prev) > 0 && prev[len(prev)-1].End > v.Start {
		return corruptf("memory areas overlap or are out of order at %#x", v.Start)
	}
	switch v.Kind {
	case VMAAnon, VMAFile, VMASharedAnon, VMAVdso, VMAVvar, VMAVvarVclock:
	default:
		return corruptf("memory area %#x-%#x of unknown kind %d", v.Start, v.End, v.Kind)
	}
	return nil
}

// CheckPages checks that n bytes of contents at addr lie within one of
// vmas (sorted), one whose contents a snapshot carries.
func CheckPages(addr, n uint64, vmas []*VMA) error {
	i := sort.Search(len(vmas), func(i int) bool { return vmas[i].End > addr })
	if i == len(vmas) || addr < vmas[i].Start || addr+n > vmas[i].End || addr+n < addr {
		return corruptf("pages %#x+%#x outside every memory area", addr, n)
	}
	if v := vmas[i]; v.Kind.Kernel() || (v.Kind == VMAFile && v.Shared) {
		return corruptf("pages for %s", v.Label())
	}
	return nil
}

// CheckFD checks one fd record on its own (the decoder also checks that
// fds come in ascending order).
func CheckFD(f *FD) error {
	if f.Fd < 0 || f.Fd > MaxFd {
		return corruptf("fd %d", f.Fd)
	}
	if f.Signal < 0 || f.Signal > 64 {
		return corruptf("fd %d: owner signal %d", f.Fd, f.Signal)
	}
	switch f.Kind {
	case FDFile, FDEpoll, FDPipe, FDListen:
	case FDEventfd:
		if f.EventCount == ^uint64(0) { // the kernel's counter stops below it
			return corruptf("fd %d: eventfd counter %#x", f.Fd, f.EventCount)
		}
	case FDTimerfd:
		if t := f.Timer; t == nil || t.ValueNs < 0 || t.IntervalNs < 0 {
			return corruptf("fd %d: timerfd state", f.Fd)
		}
	case FDSignalfd:
	case FDInotify:
		if len(f.Watches) > MaxWatches {
			return corruptf("fd %d: %d inotify watches", f.Fd, len(f.Watches))
		}
		for i, w := range f.Watches {
			if w.Wd <= 0 || w.Path == "" || (i > 0 && w.Wd <= f.Watches[i-1].Wd) {
				return corruptf("fd %d: inotify watch %d", f.Fd, w.Wd)
			}
		}
	case FDFanotify:
		if f.Fanotify == nil || len(f.Fanotify.Marks) > MaxWatches {
			return corruptf("fd %d: fanotify state", f.Fd)
		}
		for _, m := range f.Fanotify.Marks {
			if m.Path == "" || m.Kind < FanMarkInode || m.Kind > FanMarkFilesystem {
				return corruptf("fd %d: fanotify mark %q", f.Fd, m.Path)
			}
		}
	case FDTCP:
		if err := checkTCP(f.Fd, f.TCP); err != nil {
			return err
		}
	case FDUDP:
		u := f.UDP
		if u == nil || !checkAddr(u.Family, u.Local) || (u.Peer != nil && !checkAddr(u.Family, *u.Peer)) {
			return corruptf("fd %d: UDP socket", f.Fd)
		}
	case FDTCPNew:
		u := f.UDP
		if u == nil || !checkAddr(u.Family, u.Local) || u.Peer != nil || len(u.Opts.BindToDevice) > 15 {
			return corruptf("fd %d: unconnected TCP socket", f.Fd)
		}
	case FDPtyMaster, FDPtySlave:
		if t := f.Pty; t == nil || t.Index < 0 || t.Index > MaxPtyIndex || (t.Termios != nil && len(t.Termios.Cc) != 19) {
			return corruptf("fd %d: pty", f.Fd)
		}
	case FDPipeOut:
		if f.Pipe == 0 || f.PipeSize < 0 || len(f.PipeData) > max(f.PipeSize, 1<<20) {
			return corruptf("fd %d: pipe leading outside", f.Fd)
		}
	case FDUnix:
		if err := checkUnix(f.Fd, f.Unix); err != nil {
			return err
		}
	case FDInherit:
		// Fds 0-2, or a copy of one of them (Desc).
		if f.Fd > 2 && (f.Desc > 2 || f.Desc < 0 || f.Desc == f.Fd) {
			return corruptf("inherited fd %d", f.Fd)
		}
	default:
		return corruptf("fd %d of unknown kind %d", f.Fd, f.Kind)
	}
	return nil
}

// Socket families, as Linux numbers them.
const (
	afInet  = 2
	afInet6 = 10
)

// MaxSockQueue bounds each queue of a TCP connection: more than the
// kernel lets a socket buffer hold (net.core.wmem_max and rmem_max are
// far below).
const MaxSockQueue = 1 << 30

// checkUnix checks one end of a unix socket pair on its own: its type,
// two distinct ends, and queues the kernel could hold (a stream's bytes
// in one entry).
func checkUnix(fd int, u *UnixSocket) error {
	if u != nil && u.Listen {
		if u.Name == "" || len(u.Name) > 107 || (u.Name[0] != '/' && u.Name[0] != '@') || u.Peer != 0 || len(u.Queue) > 0 ||
			(u.Type != sockStream && u.Type != sockSeqpacket) {
			return corruptf("fd %d: listening unix socket", fd)
		}
		return nil
	}
	if u != nil && u.Handover != nil {
		if u.ID == 0 || u.Peer != 0 || u.Connect != "" || len(u.Queue) > 0 || u.Listen || u.PeerClosed || u.Handover.Pid <= 0 || u.Handover.Fd < 0 ||
			(u.Type != sockStream && u.Type != sockDgram && u.Type != sockSeqpacket) {
			return corruptf("fd %d: unix socket handed over", fd)
		}
		return nil
	}
	if u != nil && u.Connect != "" {
		if len(u.Connect) > 107 || (u.Connect[0] != '/' && u.Connect[0] != '@') || u.Peer != 0 || len(u.Queue) > 0 || u.Listen ||
			(u.Type != sockStream && u.Type != sockDgram && u.Type != sockSeqpacket) {
			return corruptf("fd %d: reconnected unix socket", fd)
		}
		return nil
	}
	if u != nil && u.PeerClosed {
		if u.ID == 0 || u.Peer != 0 || u.Listen || len(u.Rights) > 0 || (u.Type != sockStream && u.Type != sockSeqpacket) {
			return corruptf("fd %d: unix socket whose peer was closed", fd)
		}
		return nil
	}
	if u != nil && u.Peer == 0 && !u.Listen {
		// Neither connected nor listening: unbound, or bound to Name.
		if len(u.Queue) > 0 || len(u.Name) > 107 || (u.Name != "" && u.Name[0] != '/' && u.Name[0] != '@') ||
			(u.Type != sockStream && u.Type != sockDgram && u.Type != sockSeqpacket) {
			return corruptf("fd %d: unconnected unix socket", fd)
		}
		return nil
	}
	if u == nil || u.ID == 0 || u.Peer == 0 || u.ID == u.Peer || u.Shutdown < 0 || u.Shutdown > 3 || u.Name != "" {
		return corruptf("fd %d: unix socket", fd)
	}
	if len(u.Rights) > len(u.Queue) {
		return corruptf("fd %d: unix socket with fds for %d of %d messages", fd, len(u.Rights), len(u.Queue))
	}
	if len(u.RightsFrom) > 0 {
		if len(u.RightsFrom) != len(u.Rights) {
			return corruptf("fd %d: unix socket with holders for %d of %d messages", fd, len(u.RightsFrom), len(u.Rights))
		}
		for i, h := range u.RightsFrom {
			if len(h) != len(u.Rights[i]) {
				return corruptf("fd %d: unix socket message %d with holders for %d of %d fds", fd, i, len(h), len(u.Rights[i]))
			}
			for _, pid := range h {
				if pid < 0 || pid > 1<<22 { // PID_MAX_LIMIT
					return corruptf("fd %d: unix socket message %d carries an fd of pid %d", fd, i, pid)
				}
			}
		}
	}
	for _, r := range u.Rights {
		if len(r) > 253 { // SCM_MAX_FD
			return corruptf("fd %d: unix socket message with %d fds", fd, len(r))
		}
		for _, x := range r {
			if x < 0 || x > MaxFd {
				return corruptf("fd %d: unix socket message carries fd %d", fd, x)
			}
		}
	}
	switch u.Type {
	case sockStream:
		if len(u.Queue) > 1 && len(u.Rights) == 0 {
			return corruptf("fd %d: unix stream socket with %d queue entries", fd, len(u.Queue))
		}
	case sockDgram, sockSeqpacket:
	default:
		return corruptf("fd %d: unix socket of type %d", fd, u.Type)
	}
	if len(u.Queue) > MaxUnixQueue {
		return corruptf("fd %d: unix socket with %d queued messages", fd, len(u.Queue))
	}
	total := 0
	for _, m := range u.Queue {
		total += len(m)
	}
	if total > MaxSockQueue {
		return corruptf("fd %d: unix socket queue of %d bytes", fd, total)
	}
	return nil
}

// Socket types, as Linux numbers them.
const (
	sockStream    = 1
	sockDgram     = 2
	sockSeqpacket = 5
)

func checkTCP(fd int, c *TCPConn) error {
	if c == nil || !checkAddr(c.Family, c.Local) || !checkAddr(c.Family, c.Peer) || c.Peer.Port == 0 || c.Local.Port == 0 {
		return corruptf("fd %d: TCP connection addresses", fd)
	}
	if !TCPCarried(c.State) && !c.Closed {
		return corruptf("fd %d: TCP connection in state %d", fd, c.State)
	}
	if len(c.SendQueue) > MaxSockQueue || len(c.RecvQueue) > MaxSockQueue || c.Unsent < 0 || c.Unsent > len(c.SendQueue) {
		return corruptf("fd %d: TCP queues of %d and %d bytes, %d unsent", fd, len(c.SendQueue), len(c.RecvQueue), c.Unsent)
	}
	if c.SndWscale > 14 || c.RcvWscale > 14 || c.MSS > 65535 {
		return corruptf("fd %d: TCP options", fd)
	}
	return nil
}

// checkAddr reports whether a is a valid address of family.
func checkAddr(family int, a SockAddr) bool {
	switch family {
	case afInet:
		return len(a.IP) == 4 && a.Zone == 0 && a.Port >= 0 && a.Port <= 65535
	case afInet6:
		return len(a.IP) == 16 && a.Port >= 0 && a.Port <= 65535
	}
	return false
}

// Label names an area in messages: "map 0x1000-0x2000 (libc.so.6)".
func (v *VMA) Label() string {
	s := fmt.Sprintf("map %#x-%#x", v.Start, v.End)
	if v.Name != "" {
		s += " (" + v.Name + ")"
	}
	return s
}

// MaxWatches bounds the watches of one inotify instance.
const MaxWatches = 1 << 16

// checkSeccomp checks the bounds of a chain of seccomp filters.
func checkSeccomp(fs []SeccompFilter) error {
	if len(fs) > MaxSeccompFilters {
		return corruptf("%d seccomp filters", len(fs))
	}
	for i, f := range fs {
		if len(f.Prog) == 0 || len(f.Prog)%8 != 0 || len(f.Prog)/8 > MaxSeccompInsns {
			return corruptf("seccomp filter %d: program of %d bytes", i, len(f.Prog))
		}
	}
	return nil
}

// checkFile checks a File record against those before it: the first of
// an object says what it is, the others continue its data in order.
func (c *checker) checkFile(f *File) error {
	if f.ID == 0 || len(f.Data) > FileChunk || f.Off < 0 {
		return corruptf("file record %#x", f.ID)
	}
	next, seen := c.files[f.ID]
	if !seen {
		if (f.Kind != FileMemfd && f.Kind != FileDeleted && f.Kind != FileSysV) || (f.Kind == FileSysV && f.ShmID < 0) || f.Name == "" || f.Size < 0 || f.Size > MaxFileSize || len(c.files) >= MaxFiles {
			return corruptf("file %#x (%q)", f.ID, f.Name)
		}
		c.files[f.ID] = 0
		c.sizes[f.ID] = f.Size
		next = 0
	} else if f.Kind != 0 || f.Name != "" {
		return corruptf("file %#x described twice", f.ID)
	}
	if f.Off < next || f.Off+int64(len(f.Data)) > c.sizes[f.ID] {
		return corruptf("file %#x: data at %d+%d", f.ID, f.Off, len(f.Data))
	}
	c.files[f.ID] = f.Off + int64(len(f.Data))
	return nil
}

// MaxFiles bounds the File objects of a process.
const MaxFiles = 1 << 12

// ThreadInPlace reports whether a thread record for tid may follow n
// thread records of process p: the main thread's (tid == pid) comes
// first, or never when the main thread had exited (p.LeaderExited).
func ThreadInPlace(p *Process, n, tid int) bool {
	if tid <= 0 {
		return false
	}
	if p.LeaderExited {
		return tid != p.Pid
	}
	return (n == 0) == (tid == p.Pid)
}
