package capture

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// FrozenTree is a process and all its descendants, every thread of every
// member stopped together by AttachTree. Exactly one of Resume or Kill
// must be called.
type FrozenTree struct {
	Pid     int
	queried func()           // as Frozen's, once for every member
	parent  *Parent          // makes the snapshot incremental (FreezeOptions.Parent)
	members []*Frozen        // creation order: every parent before its children
	procs   []image.TreeProc // the same order, zombies included
	// pidNS is set when the root is the init of a child PID namespace,
	// which is frozen whole (pidns_linux.go).
	pidNS string
	// cow, for a checkpoint that leaves the tree running (forksnap_linux.go).
	cow *cowRun
	// precopy: the members' pre-copy of a live migration, whose final
	// rounds come before the tree record.
	precopy *treePrecopy
	// ctrNS are the root's namespaces of the other kinds that are not
	// ours, carried with the PID namespace (container_linux.go).
	ctrNS map[string]string
}

// AttachTree stops pid and every descendant. Members are stopped parent
// first, and a member's children are listed only once it is stopped, so
// that no member can fork a process the snapshot would miss.
func AttachTree(tr *ptrace.Tracer, pid int) (*FrozenTree, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("freeze: invalid pid %d", pid)
	}
	if _, err := os.Stat(procfs.Path(pid, "")); err != nil {
		return nil, fmt.Errorf("freeze %d: no such process", pid)
	}
	ns, err := childNSInit(pid)
	if err != nil {
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	t := &FrozenTree{Pid: pid, pidNS: ns}
	if ns != "" {
		if t.ctrNS, err = containerNS(pid); err != nil {
			return nil, fmt.Errorf("freeze %d: %w", pid, err)
		}
	}
	if err := t.stopAll(tr); err != nil {
		t.detach()
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	return t, nil
}

func (t *FrozenTree) stopAll(tr *ptrace.Tracer) error {
	queue := []int{t.Pid}
	in := map[int]bool{t.Pid: true}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		if pid == os.Getpid() {
			return fmt.Errorf("cannot freeze a tree holding myself (pid %d)", pid)
		}
		stat, err := procfs.Stat(pid)
		if err != nil {
			return fmt.Errorf("pid %d: %w", pid, err)
		}
		m := image.TreeProc{Pid: pid, PPid: int(procfs.StatField(stat, 4)),
			Pgid: int(procfs.StatField(stat, 5)), Sid: int(procfs.StatField(stat, 6))}
		// A zombie child (exited, not yet reaped by its parent) is only
		// its place in the tree and its wait status: it cannot be
		// traced and has no children.
		// (Not a main thread that exited while others run on: that
		// process lives, and checkSupported names it.)
		if pid != t.Pid && len(stat) > 0 && stat[0] == "Z" && procfs.Reader(pid) == 0 {
			m.Zombie, m.ExitStatus = true, int(procfs.StatField(stat, 52))
			t.procs = append(t.procs, m)
			continue
		}
		f, err := t.stopMember(tr, pid)
		if err != nil && pid != t.Pid {
			// It may have ended meanwhile (a shell's short-lived
			// child): its parent, stopped already, has not reaped it,
			// so it is a zombie member, as if it had ended before.
			switch zombie, gone := endedMember(pid); {
			case gone:
				continue // reaped at once: its parent ignores SIGCHLD
			case zombie != nil:
				m.Zombie, m.ExitStatus = true, int(procfs.StatField(zombie, 52))
				t.procs = append(t.procs, m)
				continue
			}
		}
		if err != nil {
			return err
		}
		m.Threads = len(f.threads)
		// Read again now that it is stopped: it may have moved meanwhile.
		if stat, err = procfs.Stat(pid); err != nil {
			return fmt.Errorf("pid %d: %w", pid, err)
		}
		m.Pgid, m.Sid = int(procfs.StatField(stat, 5)), int(procfs.StatField(stat, 6))
		t.procs = append(t.procs, m)
		kids, err := liveChildren(pid)
		if err != nil {
			return fmt.Errorf("pid %d: children: %w", pid, err)
		}
		for _, k := range kids {
			if !in[k] {
				in[k] = true
				queue = append(queue, k)
			}
		}
	}
	// A member's group and session are rebuilt from inside the tree: led
	// by a member, or inherited from the root (whose own are pthaw's
	// unless it leads them).
	root := t.procs[0]
	for _, m := range t.procs[1:] {
		if !in[m.Pgid] && m.Pgid != root.Pgid && !groupOnlyInside(m.Pgid, in) {
			return unsupported("pid %d: process group %d is led from outside the tree", m.Pid, m.Pgid)
		}
		if !in[m.Sid] && m.Sid != root.Sid {
			return unsupported("pid %d: session %d is led from outside the tree", m.Pid, m.Sid)
		}
	}
	if t.pidNS != "" {
		if err := t.checkWholeNS(in); err != nil {
			return err
		}
		if err := t.checkOutsiders(in); err != nil {
			return err
		}
		return t.nsNumbers()
	}
	return nil
}

// stopMember checks that pid may be frozen and stops all its threads; it
// is a member once stopped. A failure leaves it running.
func (t *FrozenTree) stopMember(tr *ptrace.Tracer, pid int) (*Frozen, error) {
	if err := mayTrace(pid, pid); err != nil {
		return nil, err
	}
	if err := checkSupported(pid, true, t.pidNS); err != nil {
		return nil, fmt.Errorf("pid %d: %w", pid, err)
	}
	if t.pidNS != "" {
		if err := t.checkMemberNS(pid); err != nil {
			return nil, fmt.Errorf("pid %d: %w", pid, err)
		}
	}
	f := &Frozen{Pid: pid, tr: tr, mem: ptrace.NewMem(pid)}
	if err := tr.Do(f.stopAll); err != nil {
		f.detach()
		f.mem.Close()
		return nil, fmt.Errorf("pid %d: %w", pid, err)
	}
	t.members = append(t.members, f)
	return f, nil
}

// endedMember says whether pid, which failed to stop, has ended since:
// its stat when it is a zombie (every thread gone), or gone.
func endedMember(pid int) (zombie []string, gone bool) {
	stat, err := procfs.Stat(pid)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, true
	}
	if err == nil && len(stat) > 0 && stat[0] == "Z" && procfs.Reader(pid) == 0 {
		return stat, false
	}
	return nil, false
}

// Write streams the state of every member to enc and closes enc.
func (t *FrozenTree) Write(enc *image.Encoder) error {
	// A container's namespaces are described (and refused) first.
	ns, err := t.namespaces()
	if err != nil {
		return fmt.Errorf("freeze %d: %w", t.Pid, err)
	}
	inner, err := t.innerPipes()
	if err != nil {
		return fmt.Errorf("freeze %d: %w", t.Pid, err)
	}
	// Each member's /proc is read through its reader (Frozen.rd), a
	// live thread when the main one has exited.
	pids := make([]int, len(t.members))
	for i, f := range t.members {
		pids[i] = f.rd
	}
	ptys, err := innerPtys(pids)
	if err != nil {
		return fmt.Errorf("freeze %d: %w", t.Pid, err)
	}
	// A unix socket's peer may be held by any member.
	own := map[uint64]bool{}
	for _, pid := range pids {
		o, err := socketInodes(pid)
		if err != nil {
			return fmt.Errorf("freeze %d: pid %d: fds: %w", t.Pid, pid, err)
		}
		for ino := range o {
			own[ino] = true
		}
	}
	var members []treeMember
	j := 0
	for _, m := range t.procs {
		if !m.Zombie && j < len(t.members) {
			members = append(members, treeMember{pid: t.members[j].rd, saved: m.Pid})
			j++
		}
	}
	for _, f := range t.members {
		f.socks.ptys, f.socks.unixOwn, f.socks.tree, f.socks.members = ptys, own, true, members
	}
	// Every member is described (the calls injected into it) before the
	// first of them is written: queried may freeze them all another way
	// (an agent's cgroup), after which no injected call would run.
	if t.precopy != nil {
		if err := t.precopy.takeFlags(t.members); err != nil {
			return fmt.Errorf("freeze %d: %w", t.Pid, err)
		}
	}
	shm, files := map[uint64][][2]uint64{}, map[uint64]bool{}
	rs := make([]*records, len(t.members))
	for i, f := range t.members {
		if rs[i], err = f.gather(shm, inner); err != nil {
			return fmt.Errorf("freeze %d: pid %d: %w", t.Pid, f.Pid, err)
		}
	}
	// Which members share pages with their parent, read while all are
	// stopped (before the forks let them run: the pages must be those of
	// the snapshot). In a live migration too: the frames shared at the
	// stop are what counts, whatever the rounds sent of those pages (the
	// receiver drops its pre-copy of the ranges marked).
	if err := t.markCow(rs); err != nil {
		return fmt.Errorf("freeze %d: %w", t.Pid, err)
	}
	if t.cow != nil {
		forked, err := t.snapshotForks(rs, files)
		if err != nil {
			return fmt.Errorf("freeze %d: %w", t.Pid, err)
		}
		if forked {
			if t.queried != nil {
				t.queried()
			}
			// Every member's memory is read from its child from here
			// on: the tree runs on.
			if err := t.Resume(); err != nil {
				for i, f := range t.members {
					if rs[i].snap != nil {
						f.tr.Do(func() error { rs[i].snap.kill(); return nil })
					}
				}
				return fmt.Errorf("freeze %d: %w", t.Pid, err)
			}
			t.cow.released = time.Now()
			defer func() {
				for i, f := range t.members {
					f.releaseSnapshot(rs[i].snap)
				}
			}()
			t.queried = nil
		}
	}
	if t.queried != nil {
		t.queried()
	}
	// A live migration's final rounds: all pre-copy records come
	// before the tree record.
	if t.precopy != nil {
		if err := t.precopy.finish(enc, t.members, rs); err != nil {
			return fmt.Errorf("freeze %d: %w", t.Pid, err)
		}
	}
	if t.parent != nil {
		if err := enc.Write(&t.parent.Record); err != nil {
			return fmt.Errorf("freeze %d: %w", t.Pid, err)
		}
	}
	if err := enc.Write(&image.Tree{Procs: t.procs}); err != nil {
		return fmt.Errorf("freeze %d: %w", t.Pid, err)
	}
	if ns != nil {
		if err := enc.Write(ns); err != nil {
			return fmt.Errorf("freeze %d: %w", t.Pid, err)
		}
	}
	// Members are matched with the parent snapshot's by the PIDs the
	// records say (in a PID namespace's snapshot, the namespace's).
	recorded := make([]int, len(rs))
	for i, r := range rs {
		recorded[i] = r.proc.Pid
	}
	for i, m := range t.parent.pagesOf(recorded) {
		t.members[i].parentPages = m
	}
	for i, f := range t.members {
		f.files = files
		if err := f.emit(enc, rs[i]); err != nil {
			return fmt.Errorf("freeze %d: pid %d: %w", t.Pid, f.Pid, err)
		}
	}
	if err := enc.Close(); err != nil {
		return fmt.Errorf("freeze %d: %w", t.Pid, err)
	}
	return nil
}

// innerPipes returns the pipes and named FIFOs (by pipeID) that have both a read and a
// write end open in members of the tree, each false: its data is yet to
// be saved.
func (t *FrozenTree) innerPipes() (map[uint64]bool, error) {
	pids := make([]int, len(t.members))
	for i, f := range t.members {
		pids[i] = f.rd
	}
	return innerPipes(pids)
}

// innerPipes returns the pipes and named FIFOs (by pipeID) that have both
// a read and a write end open in the processes pids, each false: its data
// is yet to be saved.
func innerPipes(pids []int) (map[uint64]bool, error) {
	const read, write = 1, 2
	ends := map[uint64]int{}
	for _, pid := range pids {
		infos, err := procfs.FDs(pid)
		if err != nil {
			return nil, fmt.Errorf("pid %d: fds: %w", pid, err)
		}
		for _, fi := range infos {
			var st syscall.Stat_t
			if err := syscall.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fi.Fd), &st); err != nil {
				continue // closed meanwhile: describeFDs reports it
			}
			id, ok := pipeID(fi.Link, &st)
			if !ok {
				continue
			}
			switch fi.Flags & unix.O_ACCMODE {
			case unix.O_WRONLY:
				ends[id] |= write
			case unix.O_RDWR: // a FIFO opened for both
				ends[id] |= read | write
			default:
				ends[id] |= read
			}
		}
	}
	inner := map[uint64]bool{}
	for ino, e := range ends {
		if e == read|write {
			inner[ino] = false // data not saved yet
		}
	}
	return inner, nil
}

// identifyShm gives every shared anonymous area of pid the identity of its
// memory object (the inode behind /proc/PID/map_files) and the object's
// size (FileSize), and returns the areas whose pages are to be saved: all
// but those whose part of the object an earlier area already saved (seen:
// the ranges of each object saved, by offset).
func identifyShm(pid int, vmas []image.VMA, seen map[uint64][][2]uint64) ([]image.VMA, error) {
	var dump []image.VMA
	for i := range vmas {
		v := &vmas[i]
		if v.Kind == image.VMASharedAnon {
			var st syscall.Stat_t
			mf := fmt.Sprintf("/proc/%d/map_files/%x-%x", pid, v.Start, v.End)
			if err := syscall.Stat(mf, &st); err != nil {
				return nil, fmt.Errorf("map %#x-%#x (shared): %w", v.Start, v.End, err)
			}
			v.Shm, v.FileSize = st.Ino, st.Size
			lo, hi := v.Offset, v.Offset+v.Len()
			if slices.ContainsFunc(seen[st.Ino], func(r [2]uint64) bool { return r[0] <= lo && hi <= r[1] }) {
				continue
			}
			seen[st.Ino] = append(seen[st.Ino], [2]uint64{lo, hi})
		}
		dump = append(dump, *v)
	}
	return dump, nil
}

// Resume lets every member run on where it was.
func (t *FrozenTree) Resume() error {
	var errs []error
	for _, f := range t.members {
		if err := f.Resume(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (t *FrozenTree) detach() {
	for _, f := range t.members {
		f.detach()
		f.mem.Close()
	}
}

// Kill ends every member (after the snapshot is safely written): all are
// sent SIGKILL first, so none runs again, then every thread's exit is
// reaped as it comes (reap): the init of a frozen PID namespace does not
// end before every process and thread of its namespace is reaped, and
// those we trace are released only as we take their exits. A member that
// is a child of this very process (started or restored by it: an agent's
// workload) is left to its parent's own wait once it has exited.
func (t *FrozenTree) Kill() error {
	_, err := kill(t.members)
	return err
}

// snapshotForks forks every member for a copy-on-write checkpoint
// (forksnap_linux.go) and reads what the children cannot give. If one cannot
// be forked, the children made are dropped and false returned: the tree
// stays stopped for the whole copy.
func (t *FrozenTree) snapshotForks(rs []*records, files map[uint64]bool) (bool, error) {
	for i, f := range t.members {
		f.files = files
		f.cow = t.cow
		snap, err := f.snapshotFork(t.cow, rs[i])
		if err == nil && snap != nil {
			continue
		}
		for j := 0; j < i; j++ {
			t.members[j].dropSnapshot(rs[j])
		}
		return false, err
	}
	return true, nil
}

// groupOnlyInside reports whether process group pgid, whose leader is not
// in the tree, has no process outside the tree: its leader is gone (a
// zombie's group after its leader was reaped, zdtm's zombie01), so pthaw
// makes the group again with a helper of that PID.
func groupOnlyInside(pgid int, in map[int]bool) bool {
	if err := unix.Kill(pgid, 0); err != unix.ESRCH {
		return false
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || in[pid] {
			continue
		}
		stat, err := procfs.Stat(pid)
		if err == nil && int(procfs.StatField(stat, 5)) == pgid {
			return false
		}
	}
	return true
}
