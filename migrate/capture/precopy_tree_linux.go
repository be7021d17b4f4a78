package capture

import (
	"fmt"
	"os"
	"time"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Live migration of a process tree (pfreeze -live -tree, and a PID
// namespace frozen whole through its init). Every member found while the
// tree runs gets a pre-copy of its own (its own userfaultfd: each member
// has an address space of its own), and the rounds send every member's
// written pages, each after a PrecopyMember record naming it by the PID
// the snapshot knows it by. The bounds hold for the tree as a whole.
// Then the tree is stopped as without -live (AttachTree: every member,
// the members forked meanwhile too), and before the tree record each
// member found again — the same process: its start time is unchanged —
// gets its final round, after a final PrecopyMember record. A member gone
// by then gets none, and the receiver forgets its pages (its PID may be
// another process's by now); a member forked during the rounds was never
// tracked and is sent in full, as are shared memory (MAP_SHARED, memfd,
// System V: never tracked, so exact as of the stop) and every area whose
// tracking was lost.

// treePrecopy is the pre-copy of a tree's members.
type treePrecopy struct {
	pid     int // the root
	o       LiveOptions
	stats   *LiveStats
	members []*precopy
	// announce is the tree as the pre-copy found it, every member tracked
	// (nil when one is not: the receiver keeps the pages until the stop).
	announce *image.PrecopyTree
}

// startTreePrecopy starts tracking every member of the running tree of
// pid. A member that cannot be tracked is told (Notice) and sent in full
// at the stop; nil, nil when none can.
func startTreePrecopy(tr *ptrace.Tracer, pid int, o LiveOptions) (*treePrecopy, error) {
	if o.MaxRounds <= 0 {
		o.MaxRounds = 8
	}
	if o.Downtime <= 0 {
		o.Downtime = 100 * time.Millisecond
	}
	if o.Stats == nil {
		o.Stats = &LiveStats{}
	}
	ns, err := childNSInit(pid)
	if err != nil {
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	t := &treePrecopy{pid: pid, o: o, stats: o.Stats}
	queue, seen := []int{pid}, map[int]bool{pid: true}
	whole := true // every process of the tree tracked
	var found []treeFound
	byPid := map[int]*precopy{} // the members tracked, by host pid
	for len(queue) > 0 {
		m := queue[0]
		queue = queue[1:]
		stat, err := procfs.Stat(m)
		if err != nil || len(stat) == 0 || stat[0] == "Z" {
			whole = false
			continue // gone or a zombie: AttachTree sees to it
		}
		kids, _ := procfs.Children(m)
		for _, k := range kids {
			if !seen[k] {
				seen[k] = true
				queue = append(queue, k)
			}
		}
		if m == os.Getpid() {
			whole = false
			continue // AttachTree refuses it
		}
		saved := m
		f := treeFound{pid: m, stat: stat}
		if ns != "" {
			st, err := procfs.Status(m)
			if err == nil {
				saved, err = innermost(st, "NSpid")
			}
			if err != nil {
				whole = false
				continue
			}
			f.status = st
		}
		pc, err := startPrecopyWith(tr, m, o, func() (*Frozen, error) { return attachMember(tr, m, ns) }, true)
		if err != nil {
			whole = false
			t.notice(fmt.Sprintf("live %d: pid %d is not copied live (%v): stopped for the whole copy", pid, m, err))
			continue
		}
		pc.saved, pc.started = saved, procfs.StatField(stat, 22)
		// Its parent was found before it (breadth first).
		pc.parent = byPid[int(procfs.StatField(stat, 4))]
		byPid[m] = pc
		t.members = append(t.members, pc)
		found = append(found, f)
	}
	if len(t.members) == 0 {
		return nil, nil
	}
	if ns != "" {
		// A container's namespaces come with the tree record, made at
		// the stop: its processes cannot be made before.
		if ctr, err := containerNS(pid); err != nil || len(ctr) > 0 {
			whole = false
		}
	}
	if whole {
		t.announce = announceTree(found, t.members, ns != "")
	}
	return t, nil
}

// treeFound is a process of the tree as startTreePrecopy found it: its
// stat fields, and in a PID namespace frozen whole its status.
type treeFound struct {
	pid    int
	stat   []string
	status map[string]string
}

// announceTree describes the tree found (parents before children, each
// with its pre-copy in pcs) as its members know it: in a PID namespace
// frozen whole (inNS) by the namespace's numbers, as nsNumbers does for
// the tree record. Nil when a number cannot be read: the receiver then
// makes the processes at the stop.
func announceTree(found []treeFound, pcs []*precopy, inNS bool) *image.PrecopyTree {
	saved := map[int]int{}
	for i, f := range found {
		saved[f.pid] = pcs[i].saved
	}
	a := &image.PrecopyTree{}
	for i, f := range found {
		m := image.PrecopyProc{Pid: pcs[i].saved, PPid: saved[int(procfs.StatField(f.stat, 4))],
			Pgid: int(procfs.StatField(f.stat, 5)), Sid: int(procfs.StatField(f.stat, 6))}
		if !inNS {
			// The root's parent is outside the tree: its number as is.
			if i == 0 {
				m.PPid = int(procfs.StatField(f.stat, 4))
			}
		} else {
			var err error
			if m.Pgid, err = innermost(f.status, "NSpgid"); err != nil {
				return nil
			}
			if m.Sid, err = innermost(f.status, "NSsid"); err != nil {
				return nil
			}
		}
		a.Procs = append(a.Procs, m)
		maps, err := procfs.MapsLayout(f.pid)
		if err != nil {
			return nil
		}
		for _, r := range maps {
			end := r.End
			if r.Path == "[heap]" {
				end += 64 << 20 // room for it to grow, as a receiver leaves
			}
			a.Avoid = append(a.Avoid, [2]uint64{r.Start, end})
		}
	}
	return a
}

// attachMember stops every thread of pid, a member of a tree in PID
// namespace ns ("" for ours), for the calls that open its pre-copy.
func attachMember(tr *ptrace.Tracer, pid int, ns string) (*Frozen, error) {
	if err := mayTrace(pid, pid); err != nil {
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	if err := checkSupported(pid, true, ns); err != nil {
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	f := &Frozen{Pid: pid, tr: tr, mem: ptrace.NewMem(pid)}
	if err := tr.Do(f.stopAll); err != nil {
		f.detach()
		return nil, fmt.Errorf("freeze %d: %w", pid, err)
	}
	return f, nil
}

func (t *treePrecopy) notice(s string) {
	if t.o.Notice != nil {
		t.o.Notice(s)
	}
}

// run sends the rounds while the tree runs, and returns when it should
// be stopped for the final one.
func (t *treePrecopy) run(enc *image.Encoder) error {
	if t.announce != nil {
		if err := enc.Write(t.announce); err != nil {
			return err
		}
		for _, pc := range t.members {
			if err := enc.Write(&image.PrecopyMember{Pid: pc.saved}); err != nil {
				return err
			}
			if err := pc.announce(enc); err != nil {
				return err
			}
		}
	}
	return runRounds(enc, t.pid, t.o, t.stats, t.members, true)
}

// finish runs with the tree stopped, its members described (rs, in the
// order of members), before the tree record: the final round of every
// member still the process that was tracked. It leaves in each member
// the areas whose pages are all sent (Frozen.precopyDone).
func (t *treePrecopy) finish(enc *image.Encoder, members []*Frozen, rs []*records) error {
	t.stats.StoppedAt = time.Now()
	at := map[int]int{}
	for i, f := range members {
		at[f.Pid] = i
	}
	var bytes uint64
	for _, pc := range t.members {
		i, ok := at[pc.pid]
		if ok {
			stat, err := procfs.Stat(pc.pid)
			ok = err == nil && procfs.StatField(stat, 22) == pc.started
		}
		if !ok {
			t.stats.Untracked += len(pc.areas)
			continue
		}
		if err := enc.Write(&image.PrecopyMember{Pid: pc.saved, Final: true}); err != nil {
			return err
		}
		done, n, err := pc.last(enc, rs[i].vmas)
		if err != nil {
			return fmt.Errorf("live: pid %d: %w", pc.pid, err)
		}
		members[i].precopyDone = done
		bytes += n
	}
	t.stats.FinalBytes = bytes
	return enc.Write(&image.Round{N: t.stats.Rounds, Bytes: bytes, Final: true, At: t.stats.StoppedAt.UnixNano()})
}

// takeFlags gives every member of the tree, stopped, the flags its
// pre-copy read while it ran, if still right (Frozen.takeFlags), before
// any call is injected into any of them: a member forked during the
// rounds counts its calls in its parent's counters too.
func (t *treePrecopy) takeFlags(members []*Frozen) error {
	at := map[int]*Frozen{}
	for _, f := range members {
		at[f.Pid] = f
	}
	all := len(members) == len(t.members)
	for _, pc := range t.members {
		f := at[pc.pid]
		if f == nil {
			continue
		}
		if stat, err := procfs.Stat(pc.pid); err != nil || procfs.StatField(stat, 22) != pc.started {
			all = false
			continue
		}
		ok, err := f.takeFlags(pc)
		if err != nil {
			return fmt.Errorf("pid %d: %w", pc.pid, err)
		}
		all = all && ok
	}
	t.stats.FlagsAtStop = !all
	return nil
}

func (t *treePrecopy) close() {
	for _, pc := range t.members {
		pc.close()
	}
}
