package loader

import (
	"fmt"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// A tree's live migration, its processes made early. The sender announces
// the tree before its rounds (image.PrecopyTree: each member's saved PID,
// parent, group and session) and each member's areas (PrecopyArea after a
// PrecopyMember). At the first pre-copied page the receiver makes the
// tree as startTreeRoot does at the tree record — the namespace's init,
// every other member forked from its parent's stub, in its group and
// session — then maps each member's announced areas in its stub, and the
// pages of every round go straight into them (putPrecopy), as for a
// single process. Without this the pages of a member wait in this
// process's memory until the tree record, in the stop, and are copied
// into the member then: twice the memory touched, and a copy of the
// whole tree's memory on the critical path (docs/benchmarks.md).
//
// Only a PID namespace moved whole (pthaw -pidns, the agents' workloads:
// the root is pid 1, so every PID is free from the start) is made early;
// any other tree waits for its tree record. At the tree record, the tree
// made is kept if it is exactly the one the record describes — the same
// members in the same order, each with the same parent, group and
// session, none a zombie, each found again at the stop (its final round
// came), no container namespaces — and the root's memory leaves room for
// the stubs' code. A member that shares pages with its parent at the stop
// (Cow), and every descendant of one (image.LateMembers), is made again:
// its pre-copied pages are read back into its staging, its stub ended,
// and it is forked from its parent's once that is built (forkLate), as
// without -live, so that the pages the two share are one page again.
// Otherwise it falls back: the pages of every placed area are read back
// into the member's staging, every process made is killed and reaped,
// and the tree is built from the record as without the announcement.

// buildEarly makes the announced tree, if it can be made early, and maps
// each member's announced areas; it marks top.early whatever it decides.
func (p *Process) buildEarly(top *staging) error {
	top.early = true
	a := top.tree
	var img *image.Tree
	if p.opts.PIDNamespace && a.Procs[0].Pid == 1 && a.Procs[0].PPid == 0 {
		img = &image.Tree{}
		for _, m := range a.Procs {
			img.Procs = append(img.Procs, image.TreeProc{Pid: m.Pid, PPid: m.PPid, Pgid: m.Pgid, Sid: m.Sid, Threads: 1})
		}
		if image.CheckTree(img) != nil {
			img = nil
		}
	}
	for _, m := range top.members {
		m.launched = true // no more announcements
	}
	if img == nil {
		top.tree = nil
		return nil
	}
	avoid := append([][2]uint64(nil), a.Avoid...)
	for _, m := range top.members {
		avoid = append(avoid, m.announced...)
	}
	p.tree = newTree(img)
	p.tree.members, p.tree.made = []*Process{p}, img
	if err := p.startTreeAt(freeRange(stubSize, avoid)); err != nil {
		return fmt.Errorf("pre-copy: %w", err)
	}
	for i, m := range p.tree.members {
		m.early = true
		st := top.member(img.Procs[i].Pid)
		st.proc = m
		if err := m.placeMember(st); err != nil {
			return fmt.Errorf("pre-copy: pid %d: %w", img.Procs[i].Pid, err)
		}
	}
	return nil
}

// placeMember maps the areas announced for member p (stub forked, no area
// of its own yet) where they were; one that cannot be (the stub's own
// memory is there) is left out, its pages staged.
func (p *Process) placeMember(st *staging) error {
	st.buf = make([]byte, readAheadSize)
	sort.Slice(st.announced, func(i, j int) bool { return st.announced[i][0] < st.announced[j][0] })
	return p.tr.Do(func() error {
		if err := p.mapAnnounced(st); err != nil {
			return err
		}
		// The first round's pages land on pages not there yet: copied
		// in with UFFDIO_COPY (no fault, no zeroing per page), until
		// that round ends (closeEarlyUffds).
		if len(st.placed) > 0 {
			p.uffd = p.openUffdAreas(st.placed)
		}
		return nil
	})
}

// closeEarlyUffds closes the userfaultfd of every member made early, at
// the end of the first round: a later round's page may land where a page
// was given back (a drop), and with the userfaultfd registered there the
// usual write would fail (it is opened for faults from user mode only).
func (top *staging) closeEarlyUffds() {
	for _, m := range top.members {
		if m.proc != nil {
			m.proc.closeUffd()
		}
	}
}

// earlyKeeps reports whether the tree made early can become the one img
// describes (every member found again at the stop: staged.final): the
// same root, no container; each member made early and still in img with
// the same parent, group and session, and found again unless it is a
// zombie now; no group or session of img led by a member that is gone
// (its stub ends: a member joining the group after would not find it).
// Members forked late (Cow, and their descendants) are made again by
// reconcileEarly: image.CheckTree has seen that nobody forked before them
// needs them.
func (p *Process) earlyKeeps(img *image.Tree, staged *staging) bool {
	made := map[int]image.TreeProc{}
	for _, m := range p.tree.made.Procs {
		made[m.Pid] = m
	}
	in := map[int]bool{}
	for _, m := range img.Procs {
		in[m.Pid] = true
	}
	if p.ctr != nil || len(p.tree.members) != len(p.tree.made.Procs) || img.Procs[0].Pid != p.tree.made.Procs[0].Pid {
		return false
	}
	for _, m := range img.Procs {
		if e, ok := made[m.Pid]; ok && (m.PPid != e.PPid || m.Pgid != e.Pgid || m.Sid != e.Sid || !m.Zombie && !staged.final[m.Pid]) {
			return false
		}
		for _, led := range []int{m.Pgid, m.Sid} {
			if _, ok := made[led]; ok && !in[led] {
				return false
			}
		}
	}
	return true
}

// reconcileEarly turns the tree made early into the one img describes
// (earlyKeeps said it can): a member gone since is ended and reaped by
// its parent's stub, as if it had never been; one forked late
// (image.LateMembers: it shares pages with its parent, or descends from
// one that does) has the pages of its placed areas read back into its
// staging (in staged), and is ended and reaped so too, to be forked once
// its parent is built (forkLate, p.cow); one that is a zombie now
// ends with its status, for its parent to reap; one forked during the
// rounds is forked now from its parent's stub (whose placed areas it
// inherits, to be unmapped when its own memory is mapped, as for a
// member forked late: forkLate); the members are then in img's order.
// Runs on the tracer thread.
func (p *Process) reconcileEarly(img *image.Tree, staged *staging) error {
	t := p.tree
	byPid := map[int]*Process{}
	for i, m := range t.made.Procs {
		byPid[m.Pid] = t.members[i]
	}
	in := map[int]bool{}
	for _, m := range img.Procs {
		in[m.Pid] = true
	}
	late := image.LateMembers(img.Procs)
	// Gone, or forked late: children before their parents (the made
	// order reversed).
	for i := len(t.made.Procs) - 1; i > 0; i-- {
		m := t.made.Procs[i]
		_, redo := late[m.Pid]
		if in[m.Pid] && !redo {
			continue
		}
		what := "gone since the pre-copy began"
		if redo {
			what = "made again to share pages with its parent"
		}
		mp := byPid[m.Pid]
		mp.closeUffd() // unplace reads the areas
		if st := staged.members[m.Pid]; redo && st != nil {
			for _, a := range st.placed {
				if err := mp.unplace(st, a, false); err != nil {
					return fmt.Errorf("pid %d, %s: %w", m.Pid, what, err)
				}
			}
			st.placed, st.proc = nil, nil
		}
		if err := mp.exitAs(0); err != nil {
			return fmt.Errorf("pid %d, %s: %w", m.Pid, what, err)
		}
		if err := mp.parent.reap(m.Pid); err != nil {
			return fmt.Errorf("pid %d, %s: %w", m.Pid, what, err)
		}
		mp.done = true // nothing left to kill
		delete(t.pids, m.Pid)
		delete(byPid, m.Pid)
	}
	members := make([]*Process, 0, len(img.Procs))
	for _, m := range img.Procs {
		mp := byPid[m.Pid]
		if _, ok := late[m.Pid]; ok {
			// Forked once its parent is built (buildTree), as
			// startTreeAt leaves such a member.
			parent := byPid[m.PPid]
			if parent == nil {
				return fmt.Errorf("%w: pid %d: parent %d is not in the tree", image.ErrCorrupt, m.Pid, m.PPid)
			}
			mp = &Process{tr: p.tr, opts: p.opts, tree: t, parent: parent, base: parent.base, cow: true}
			byPid[m.Pid] = mp
			members = append(members, mp)
			continue
		}
		switch {
		case mp != nil && m.Zombie:
			mp.closeUffd()
			mp.early = false
			if err := mp.exitAs(m.ExitStatus); err != nil {
				return fmt.Errorf("pid %d: zombie: %w", m.Pid, err)
			}
		case mp == nil:
			parent := byPid[m.PPid]
			if parent == nil {
				return fmt.Errorf("%w: pid %d: parent %d is not in the tree", image.ErrCorrupt, m.Pid, m.PPid)
			}
			mp = &Process{tr: p.tr, opts: p.opts, tree: t, parent: parent, base: parent.base}
			if err := mp.forkMember(m); err != nil {
				return fmt.Errorf("pid %d, forked during the pre-copy: %w", m.Pid, err)
			}
			byPid[m.Pid] = mp
		}
		members = append(members, mp)
	}
	t.members = members
	return nil
}

// reap takes, in stub p, the exit of its child whose pid in p's
// namespace is pid (ended by exitAs, its tracer's notification taken),
// and the SIGCHLD it sent p. Runs on the tracer thread.
func (p *Process) reap(pid int) error {
	if _, err := p.call(unix.SYS_WAIT4, uintptr(pid), 0, unix.WALL, 0); err != nil {
		return fmt.Errorf("wait4 in pid %d: %w", p.pid, err)
	}
	return p.takeSIGCHLD()
}

// prepareEarlyRoot, the root's prepare step when the tree was made early
// (its metadata read, staged holding every member's staging): it keeps
// the tree if it can become the one the records describe
// (reconcileEarly) and the root's memory leaves the stubs' code room,
// and keeps the root's placed areas its memory areas are exactly;
// otherwise it falls back to making the tree as without the announcement
// (startTreeRoot), every placed area's pages read back first.
func (p *Process) prepareEarlyRoot(staged *staging) error {
	if p.earlyKeeps(p.tree.img, staged) && p.checkStubRoom() == nil {
		if err := p.tr.Do(func() error { return p.reconcileEarly(p.tree.img, staged) }); err != nil {
			return err
		}
		p.precopyStats.Early = true
		return p.keepPlaced(p.staged)
	}
	if err := p.abandonEarly(staged); err != nil {
		return err
	}
	p.notice("the tree changed during the live migration, or its memory is where its stubs were: rebuilt at the stop")
	return p.startTreeRoot()
}

// prepareEarly is a member's prepare step in a tree made early (the root
// kept it): the member's memory must leave room for the stub's code, and
// its placed areas are kept where its memory areas are exactly them.
func (p *Process) prepareEarly() error {
	if err := p.checkStubRoom(); err != nil {
		return err
	}
	return p.keepPlaced(p.staged)
}

// keepPlaced keeps each placed area of st that a memory area of p's
// snapshot is exactly (private, anonymous, not growing down), reads the
// others back into st and unmaps them.
func (p *Process) keepPlaced(st *staging) error {
	p.closeUffd()
	p.kept = map[uint64]bool{}
	if st == nil {
		return nil
	}
	return p.keepExact(st)
}

// keepExact keeps (p.kept) each placed area of st that a memory area of
// p's snapshot is exactly (private, anonymous, not growing down), reads
// the others back into st and unmaps them.
func (p *Process) keepExact(st *staging) error {
	for _, a := range st.placed {
		i := sort.Search(len(p.vmas), func(i int) bool { return p.vmas[i].Start >= a[0] })
		if i < len(p.vmas) {
			if v := p.vmas[i]; v.Start == a[0] && v.End == a[1] && v.Kind == image.VMAAnon && !v.Shared && !v.GrowsDown() {
				p.kept[a[0]] = true
				continue
			}
		}
		if err := p.unplace(st, a, true); err != nil {
			return err
		}
	}
	st.placed = nil
	return nil
}

// abandonEarly reads back the pages of every member's placed areas into
// its staging (the root's is p.staged, the others' still in staged), then
// kills and reaps every process of the early tree, and leaves p as before
// its stub was started.
func (p *Process) abandonEarly(staged *staging) error {
	t := p.tree
	for i, m := range t.members {
		m.closeUffd() // unplace reads the areas
		st := p.staged
		if i > 0 || st == nil {
			st = staged.members[t.made.Procs[i].Pid]
		}
		if st == nil {
			continue
		}
		for _, a := range st.placed {
			if err := m.unplace(st, a, false); err != nil {
				return err
			}
		}
		st.placed, st.proc = nil, nil
	}
	var pids []int
	for _, m := range t.members[1:] {
		pids = append(pids, m.release()...)
	}
	if t.ns != nil {
		pids = append(pids, t.ns.release()...)
	}
	if p.mem != nil {
		p.mem.Close()
	}
	pids = append(pids, p.pid, p.stub, p.init)
	becomeSubreaper()
	killAndReap(p.tr, pids)
	endSubreaper()
	p.pid, p.stub, p.init, p.in, p.mem, p.base = 0, 0, 0, nil, nil, 0
	p.early = false
	t.members, t.pids, t.ns, t.made = []*Process{p}, map[int]int{}, nil, nil
	return nil
}
