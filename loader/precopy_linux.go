package loader

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// A live migration (pfreeze -live) sends most memory before the process
// record, in rounds, while the original still runs: later pages replace
// earlier ones at the same address and drop records take back ranges.
//
// The sender first announces the areas the pages fall in (PrecopyArea).
// At the first page the receiver starts the stub, before it knows the
// saved PID, and maps each announced area in it as it was (private,
// anonymous): the pages of every round go straight into the process being
// built, so that the stop costs only the last round, not the process's
// size. Pages outside a mapped area (an area not announced, or one that
// could not be mapped where it was) are kept here and written once the
// areas exist, before the snapshot's own pages.
//
// When the process record and its areas arrive, each mapped area is kept
// if a memory area of the snapshot is exactly it (private, anonymous, not
// growing down); otherwise its pages are read back into staging and it is
// unmapped. Should the stub's code sit where the snapshot needs memory,
// every mapped area is read back and the stub replaced. A drop of a whole
// mapped area (the sender's word that it changed) unmaps it; a drop of
// part of one gives the pages back (MADV_DONTNEED: they read as zero).

const (
	stageBlock = 64 << 10 // bytes of one staging block
	stagePages = stageBlock / pageSize
)

type stageBlockT struct {
	data []byte
	have [stagePages]bool
	n    int // pages held
}

// maxAnnounced bounds the areas a sender may announce (as many as a
// process may have).
const maxAnnounced = 1 << 16

// staging holds the pre-copied pages by address.
type staging struct {
	blocks map[uint64]*stageBlockT
	rounds int
	// announced: the areas the sender announced, before the first page.
	announced [][2]uint64
	launched  bool        // the stub was started at the first page
	placed    [][2]uint64 // announced areas mapped in the stub, by address
	buf       []byte
	// members: in a tree's live migration, each member's pages by the
	// saved pid (image.PrecopyMember), staged until it is built; final:
	// those whose last round came (the others are forgotten).
	members map[int]*staging
	final   map[int]bool
	// tree: the tree the sender announced before its rounds
	// (image.PrecopyTree); early: its processes were made then, and
	// proc, on a member's staging, is its process, whose placed areas
	// its pages go into (early_linux.go).
	tree  *image.PrecopyTree
	early bool
	proc  *Process
	pid   int // a member's saved pid
}

// member returns the staging of the tree member with saved pid pid.
func (st *staging) member(pid int) *staging {
	if st.members == nil {
		st.members, st.final = map[int]*staging{}, map[int]bool{}
	}
	m := st.members[pid]
	if m == nil {
		// Never placed, unless the tree was announced: a member's stub
		// is forked from its parent's once the tree is known, so its
		// pages wait here.
		m = &staging{blocks: map[uint64]*stageBlockT{}, launched: st.tree == nil || st.early, pid: pid}
		st.members[pid] = m
	}
	return m
}

// forMember returns the pages staged for the tree member with saved pid
// pid, if its last round came, and forgets them.
func (st *staging) forMember(pid int) *staging {
	if st == nil || !st.final[pid] {
		return nil
	}
	m := st.members[pid]
	delete(st.members, pid)
	return m
}

// maxMembers bounds the tree members a sender may name (as many as PIDs).
const maxMembers = 1 << 22

// PrecopyStats is what a live migration's sender said of its pre-copy.
type PrecopyStats struct {
	Rounds    int       // rounds sent while the process ran (the full copy included)
	Bytes     uint64    // page contents sent in them
	StoppedAt time.Time // when the sender stopped the process for the last round (its clock); zero if not said
	// Early: a tree whose processes were made while the rounds came,
	// the rounds written straight into them, and kept at the stop
	// (early_linux.go); false when its pages waited for the stop.
	Early bool
}

// Precopy returns what the snapshot's sender said of its pre-copy (zero
// without one: not a live migration).
func (p *Process) Precopy() PrecopyStats { return p.precopyStats }

// stagePrecopy reads the pre-copy records at the start of a snapshot,
// first being the first record, and returns the first record after them.
// Pages in an announced area go straight into the stub it starts.
func (p *Process) stagePrecopy(dec *image.Decoder, first any) (*staging, any, error) {
	var st *staging
	get := func() *staging {
		if st == nil {
			st = &staging{blocks: map[uint64]*stageBlockT{}}
		}
		return st
	}
	// cur is where the pages go: the whole snapshot's, or in a tree the
	// member last named.
	var cur *staging
	// drops: the Drop records in a row for the placed areas of dropsIn
	// (the process's, or a tree member's made early), applied together
	// before the next record of another kind.
	var drops [][2]uint64
	var dropsIn *staging
	rec := first
	for {
		if _, ok := rec.(*image.Drop); !ok && len(drops) > 0 {
			q := p
			if dropsIn.proc != nil {
				q = dropsIn.proc
			}
			if err := q.dropPlaced(dropsIn, drops); err != nil {
				if dropsIn.proc != nil {
					err = fmt.Errorf("pid %d: %w", dropsIn.pid, err)
				}
				return nil, nil, err
			}
			drops = drops[:0]
		}
		switch r := rec.(type) {
		case *image.PrecopyTree:
			top := get()
			if top.launched || len(top.announced) > 0 || top.members != nil || top.tree != nil {
				return nil, nil, fmt.Errorf("%w: pre-copy tree record after pre-copied pages", image.ErrCorrupt)
			}
			top.tree = r
		case *image.PrecopyMember:
			top := get()
			if top.launched || len(top.announced) > 0 {
				return nil, nil, fmt.Errorf("%w: pre-copy member record after a single process's pages", image.ErrCorrupt)
			}
			if _, ok := top.members[r.Pid]; !ok && len(top.members) >= maxMembers {
				return nil, nil, fmt.Errorf("%w: more than %d pre-copy members", image.ErrCorrupt, maxMembers)
			}
			cur = top.member(r.Pid)
			if r.Final {
				top.final[r.Pid] = true
			}
		case *image.PrecopyArea:
			// A tree member's, once the tree is announced: noted
			// until its first page (cur.announce ignores it after).
			if cur != nil {
				cur.announce(r.Start, r.End)
			} else {
				get().announce(r.Start, r.End)
			}
		case *image.Precopy:
			if cur != nil {
				if top := get(); top.tree != nil && !top.early {
					if err := p.buildEarly(top); err != nil {
						return nil, nil, err
					}
				}
				if cur.proc != nil {
					if err := cur.proc.putPrecopy(cur, dec, r.Addr, r.Len); err != nil {
						return nil, nil, fmt.Errorf("pid %d: %w", cur.pid, err)
					}
					break
				}
				if err := cur.put(dec, r.Addr, r.Len); err != nil {
					return nil, nil, err
				}
				break
			}
			st := get()
			if !st.launched {
				st.launched = true
				if err := p.placeAreas(st); err != nil {
					return nil, nil, err
				}
			}
			if err := p.putPrecopy(st, dec, r.Addr, r.Len); err != nil {
				return nil, nil, err
			}
		case *image.Drop:
			if cur != nil {
				// Consecutive drops are one member's: a PrecopyMember
				// record applies those before.
				cur.drop(r.Addr, r.Len)
				if cur.proc != nil {
					dropsIn, drops = cur, append(drops, [2]uint64{r.Addr, r.Len})
				}
			} else if st != nil {
				st.drop(r.Addr, r.Len)
				dropsIn, drops = st, append(drops, [2]uint64{r.Addr, r.Len})
			}
		case *image.Round:
			top := get()
			if r.Final {
				if r.At > 0 {
					p.precopyStats.StoppedAt = time.Unix(0, r.At)
				}
			} else {
				top.closeEarlyUffds()
				top.rounds++
				p.precopyStats.Rounds++
				p.precopyStats.Bytes += r.Bytes
			}
		default:
			// The stub, if started, is p's: Abort ends it.
			return st, rec, nil
		}
		var err error
		if rec, err = dec.Next(); err != nil {
			return nil, nil, err
		}
	}
}

// announce notes an area announced before the first page; one that
// overlaps another, or comes later, is ignored (its pages are staged).
func (st *staging) announce(start, end uint64) {
	if st.launched || len(st.announced) >= maxAnnounced {
		return
	}
	for _, a := range st.announced {
		if start < a[1] && a[0] < end {
			return
		}
	}
	st.announced = append(st.announced, [2]uint64{start, end})
}

// placeAreas starts the stub and maps the announced areas in it, each
// where it was; one that cannot be (the stub's own memory is there) is
// left out, its pages staged.
func (p *Process) placeAreas(st *staging) error {
	if len(st.announced) == 0 {
		return nil
	}
	sort.Slice(st.announced, func(i, j int) bool { return st.announced[i][0] < st.announced[j][0] })
	if err := p.launchStub(freeRange(stubSize, append([][2]uint64(nil), st.announced...))); err != nil {
		return fmt.Errorf("pre-copy: %w", err)
	}
	st.buf = make([]byte, readAheadSize)
	return p.tr.Do(func() error {
		if err := p.mapAnnounced(st); err != nil {
			return fmt.Errorf("pre-copy: %w", err)
		}
		return nil
	})
}

// mapAnnounced maps each area announced for p where it was and adds it to
// st.placed; one that cannot be (the stub's own memory is there) is left
// out, its pages staged. Runs on the tracer thread.
func (p *Process) mapAnnounced(st *staging) error {
	for _, a := range st.announced {
		got, err := p.call(unix.SYS_MMAP, uintptr(a[0]), uintptr(a[1]-a[0]), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uintptr(0), 0)
		if err != nil {
			continue
		}
		if uint64(got) != a[0] { // a kernel without MAP_FIXED_NOREPLACE
			if _, err := p.call(unix.SYS_MUNMAP, got, uintptr(a[1]-a[0])); err != nil {
				return fmt.Errorf("unmap %#x: %w", got, err)
			}
			continue
		}
		st.placed = append(st.placed, a)
	}
	return nil
}

// placedAt returns the index of the placed area holding addr, or of the
// first one after it (len(st.placed) if none), and whether it holds addr.
func (st *staging) placedAt(addr uint64) (int, bool) {
	i := sort.Search(len(st.placed), func(i int) bool { return st.placed[i][1] > addr })
	return i, i < len(st.placed) && st.placed[i][0] <= addr
}

// putPrecopy writes a pre-copy record's n bytes at addr into the stub
// where an area is placed, and stages the rest.
func (p *Process) putPrecopy(st *staging, dec *image.Decoder, addr, n uint64) error {
	for n > 0 {
		i, in := st.placedAt(addr)
		if !in {
			take := n
			if i < len(st.placed) {
				take = min(n, st.placed[i][0]-addr)
			}
			if err := st.put(dec, addr, take); err != nil {
				return err
			}
			addr += take
			n -= take
			continue
		}
		take := min(n, st.placed[i][1]-addr, uint64(len(st.buf)))
		if err := readAll(dec, st.buf[:take]); err != nil {
			return err
		}
		done := uint64(0)
		if p.uffd != nil {
			// A tree member's first round (early_linux.go). Where the
			// kernel refuses, the usual way, without the userfaultfd.
			if done = uint64(uffdFillOne(p.uffd, addr, st.buf[:take])); done < take {
				p.closeUffd()
			}
		}
		if done == take {
			addr += take
			n -= take
			continue
		}
		if err := p.mem.Write(addr+done, st.buf[done:take]); err != nil {
			return fmt.Errorf("pre-copied pages %#x+%#x: %w", addr, take, err)
		}
		addr += take
		n -= take
	}
	return nil
}

// dropPlaced applies drops (address, length) to the placed areas, in
// order: one dropped whole is unmapped (its pages, if any come, are the
// snapshot's), a part has its pages given back. The calls run in one
// batch (callBatch): a final round's dozens of drops, one injected call
// each, took 10 ms of the stop.
func (p *Process) dropPlaced(st *staging, drops [][2]uint64) error {
	placed := st.placed
	var calls []batchCall
	for _, d := range drops {
		addr, end := d[0], d[0]+d[1]
		var keep [][2]uint64
		for _, a := range placed {
			lo, hi := max(a[0], addr), min(a[1], end)
			switch {
			case lo >= hi:
				keep = append(keep, a)
			case lo == a[0] && hi == a[1]:
				calls = append(calls, batchCall{nr: unix.SYS_MUNMAP, args: [6]uintptr{uintptr(a[0]), uintptr(a[1] - a[0])},
					fail: func(err error) error { return fmt.Errorf("pre-copy: unmap %#x-%#x: %w", a[0], a[1], err) }})
			default:
				keep = append(keep, a)
				calls = append(calls, batchCall{nr: unix.SYS_MADVISE, args: [6]uintptr{uintptr(lo), uintptr(hi - lo), unix.MADV_DONTNEED},
					fail: func(err error) error { return fmt.Errorf("pre-copy: drop %#x-%#x: %w", lo, hi, err) }})
			}
		}
		placed = keep
	}
	if len(calls) > 0 {
		if err := p.tr.Do(func() error {
			_, err := p.callBatch(calls)
			return err
		}); err != nil {
			return err
		}
	}
	st.placed = placed
	return nil
}

// unplace reads the pages of a placed area back into staging (all-zero
// pages read as zero anyway; only the pages the stub has, by its
// pagemap: a tree member's area holds none of those it shares with its
// parent) and, if unmap, unmaps it.
func (p *Process) unplace(st *staging, a [2]uint64, unmap bool) error {
	zero := make([]byte, pageSize)
	for _, r := range p.residentRuns(a) {
		for addr := r[0]; addr < r[1]; {
			take := min(r[1]-addr, uint64(len(st.buf)))
			b := st.buf[:take]
			if err := p.mem.Read(addr, b); err != nil {
				return fmt.Errorf("pre-copied area %#x-%#x: read back: %w", a[0], a[1], err)
			}
			for off := uint64(0); off < take; off += pageSize {
				if pg := b[off : off+pageSize]; !bytes.Equal(pg, zero) {
					st.putBytes(addr+off, pg)
				}
			}
			addr += take
		}
	}
	if !unmap {
		return nil
	}
	return p.tr.Do(func() error {
		if _, err := p.call(unix.SYS_MUNMAP, uintptr(a[0]), uintptr(a[1]-a[0])); err != nil {
			return fmt.Errorf("pre-copy: unmap %#x-%#x: %w", a[0], a[1], err)
		}
		return nil
	})
}

// residentRuns returns the runs of a (a placed area) that the stub has
// pages in (present or swapped, by /proc/PID/pagemap), ascending; the
// whole of a if its pagemap cannot be read.
func (p *Process) residentRuns(a [2]uint64) [][2]uint64 {
	whole := [][2]uint64{a}
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", p.mem.Pid))
	if err != nil {
		return whole
	}
	defer f.Close()
	const step = 4096 // entries read at once
	buf := make([]byte, 8*step)
	var out [][2]uint64
	for base := a[0]; base < a[1]; base += step * pageSize {
		n := min((a[1]-base)/pageSize, step)
		if _, err := f.ReadAt(buf[:8*n], int64(base/pageSize*8)); err != nil {
			return whole
		}
		for j := uint64(0); j < n; j++ {
			if binary.LittleEndian.Uint64(buf[8*j:])&(1<<63|1<<62) == 0 {
				continue
			}
			addr := base + j*pageSize
			if k := len(out) - 1; k >= 0 && out[k][1] == addr {
				out[k][1] += pageSize
			} else {
				out = append(out, [2]uint64{addr, addr + pageSize})
			}
		}
	}
	return out
}

// prepareLive, the prepare step of a live migration's process, keeps the
// placed areas the snapshot's memory areas are exactly, reads the others
// back, and gives the stub its PID. A stub started early in the way of
// the snapshot's memory is replaced.
func (p *Process) prepareLive() error {
	st := p.staged
	if p.stub == 0 {
		return p.startStub()
	}
	for _, r := range p.snapshotRanges() {
		if r[0] < p.base+stubSize && p.base < r[1] {
			for _, a := range st.placed {
				if err := p.unplace(st, a, false); err != nil {
					return err
				}
			}
			st.placed = nil
			killAndReap(p.tr, []int{p.stub})
			p.mem.Close()
			p.stub, p.pid, p.in, p.mem = 0, 0, nil, nil
			return p.startStub()
		}
	}
	p.kept = map[uint64]bool{}
	if err := p.keepExact(st); err != nil {
		return err
	}
	return p.tr.Do(p.stubPID)
}

// keptOutside returns the parts of [start, end) outside the kept areas.
func (p *Process) keptOutside(start, end uint64) [][2]uint64 {
	out := [][2]uint64{{start, end}}
	for _, v := range p.vmas {
		if !p.kept[v.Start] || v.End <= start || v.Start >= end {
			continue
		}
		var next [][2]uint64
		for _, r := range out {
			if v.End <= r[0] || v.Start >= r[1] {
				next = append(next, r)
				continue
			}
			if r[0] < v.Start {
				next = append(next, [2]uint64{r[0], v.Start})
			}
			if v.End < r[1] {
				next = append(next, [2]uint64{v.End, r[1]})
			}
		}
		out = next
	}
	return out
}

func (st *staging) put(dec *image.Decoder, addr, n uint64) error {
	for n > 0 {
		base := addr &^ (stageBlock - 1)
		b := st.blocks[base]
		if b == nil {
			b = &stageBlockT{data: make([]byte, stageBlock)}
			st.blocks[base] = b
		}
		off := addr - base
		take := min(n, stageBlock-off)
		if err := readAll(dec, b.data[off:off+take]); err != nil {
			return err
		}
		for p := off / pageSize; p < (off+take)/pageSize; p++ {
			if !b.have[p] {
				b.have[p] = true
				b.n++
			}
		}
		addr += take
		n -= take
	}
	return nil
}

// putBytes stages one page read back from the stub.
func (st *staging) putBytes(addr uint64, pg []byte) {
	base := addr &^ (stageBlock - 1)
	b := st.blocks[base]
	if b == nil {
		b = &stageBlockT{data: make([]byte, stageBlock)}
		st.blocks[base] = b
	}
	off := addr - base
	copy(b.data[off:off+pageSize], pg)
	if p := off / pageSize; !b.have[p] {
		b.have[p] = true
		b.n++
	}
}

func (st *staging) drop(addr, n uint64) {
	for end := addr + n; addr < end; {
		base := addr &^ (stageBlock - 1)
		next := min(base+stageBlock, end)
		if b := st.blocks[base]; b != nil {
			for p := (addr - base) / pageSize; p < (next-base)/pageSize; p++ {
				if b.have[p] {
					b.have[p] = false
					b.n--
				}
			}
			if b.n == 0 {
				delete(st.blocks, base)
			}
		}
		addr = next
	}
}

// fillAreas is fill for a run of pages that may span adjacent areas (the
// staged pages of two areas that touch make one run): each area's part is
// filled on its own.
func (p *Process) fillAreas(addr uint64, data []byte) error {
	for len(data) > 0 {
		n := uint64(len(data))
		i := sort.Search(len(p.vmas), func(i int) bool { return p.vmas[i].End > addr })
		if i < len(p.vmas) && p.vmas[i].Start <= addr {
			n = min(n, p.vmas[i].End-addr)
		}
		if err := p.fill(addr, data[:n], nil); err != nil {
			return err
		}
		addr, data = addr+n, data[n:]
	}
	return nil
}

// stagedRun is a run of staged pages: data goes at addr.
type stagedRun struct {
	addr uint64
	data []byte
}

// runs returns the staged pages as runs, by address.
func (st *staging) runs() []stagedRun {
	var out []stagedRun
	for _, base := range st.bases() {
		st.blocks[base].eachRun(base, func(r stagedRun) error {
			out = append(out, r)
			return nil
		})
	}
	return out
}

// bases returns the addresses of the staging blocks, ascending.
func (st *staging) bases() []uint64 {
	bases := make([]uint64, 0, len(st.blocks))
	for a := range st.blocks {
		bases = append(bases, a)
	}
	slices.Sort(bases)
	return bases
}

// eachRun calls fn with each run of pages block b (at base) holds, by
// address, and stops at its first error.
func (b *stageBlockT) eachRun(base uint64, fn func(stagedRun) error) error {
	for p := 0; p < stagePages; {
		if !b.have[p] {
			p++
			continue
		}
		q := p + 1
		for q < stagePages && b.have[q] {
			q++
		}
		if err := fn(stagedRun{base + uint64(p)*pageSize, b.data[p*pageSize : q*pageSize]}); err != nil {
			return err
		}
		p = q
	}
	return nil
}

// dropInParent forgets the pages staged for p (a live migration's
// pre-copy) that it shares with its parent (image.VMA.InParent, in the
// areas kept from the fork of its parent's built stub: forkLate). They
// are its parent's as of the stop, the same frame, so the fork holds
// them already; writing the pre-copied ones would be exact too, but
// would make each a copy of its own.
func (p *Process) dropInParent(st *staging) {
	for _, v := range p.vmas {
		if !p.kept[v.Start] {
			continue
		}
		for _, r := range v.InParent {
			st.drop(r[0], r[1]-r[0])
		}
	}
}

// applyStaged writes the pages staged for p into it. A tree member's
// whole memory may be staged (its process is made only once the tree
// record comes, in the stop), in runs of at most a staging block, each
// below uffdFill's split: with a userfaultfd and two CPUs the runs are
// shared by two threads copying at once instead (uffdSplit's reason: the
// copy's cost is the kernel's, per page). A run that is not wholly in
// one area registered with the userfaultfd, or the part of one it could
// not place, is written afterwards the usual way (fillAreas).
func (p *Process) applyStaged(st *staging) error {
	staged := 0
	for _, b := range st.blocks {
		staged += b.n * pageSize
	}
	if p.uffd == nil || staged < 2*uffdSplit || runtime.GOMAXPROCS(0) < 2 {
		return st.apply(p.fillAreas)
	}
	runs := st.runs()
	half, acc := 0, 0
	for half < len(runs) && acc < staged/2 {
		acc += len(runs[half].data)
		half++
	}
	var rest [2][]stagedRun
	place := func(k int, rs []stagedRun) {
		for _, r := range rs {
			placed := 0
			if p.uffdHolds(r.addr, uint64(len(r.data))) {
				placed = uffdFillOne(p.uffd, r.addr, r.data)
			}
			if placed < len(r.data) {
				rest[k] = append(rest[k], stagedRun{r.addr + uint64(placed), r.data[placed:]})
			}
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		place(1, runs[half:])
	}()
	place(0, runs[:half])
	<-done
	for _, rs := range rest {
		for _, r := range rs {
			if err := p.fillAreas(r.addr, r.data); err != nil {
				return fmt.Errorf("pre-copied pages: %w", err)
			}
		}
	}
	st.blocks = nil
	return nil
}

// uffdHolds reports whether addr+n lies wholly in one area registered
// with the userfaultfd.
func (p *Process) uffdHolds(addr, n uint64) bool {
	i := sort.Search(len(p.vmas), func(i int) bool { return p.vmas[i].End > addr })
	return i < len(p.vmas) && p.vmas[i].Start <= addr && addr+n <= p.vmas[i].End && addr+n > addr &&
		uffdArea(p.vmas[i]) && addr%pageSize == 0 && n%pageSize == 0
}

// apply writes the staged pages into the process, by runs.
func (st *staging) apply(fill func(addr uint64, data []byte) error) error {
	for _, base := range st.bases() {
		err := st.blocks[base].eachRun(base, func(r stagedRun) error { return fill(r.addr, r.data) })
		if err != nil {
			return fmt.Errorf("pre-copied pages: %w", err)
		}
		delete(st.blocks, base) // memory back as it goes
	}
	return nil
}
