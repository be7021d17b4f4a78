package capture

import (
	"fmt"
	"os"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// pmPFN masks the page frame number of a pagemap entry (bits 0-54),
// which the kernel shows to CAP_SYS_ADMIN only (zero otherwise).
const pmPFN = 1<<55 - 1

// markCow finds, for every member of the tree that may be forked from its
// parent once the parent's memory is built (image.TreeProc.Cow,
// image.MayForkLate: it and its descendants lead no group or session of
// a member forked before them), the pages of its private anonymous areas
// that are still its parent's (zdtm's cow00): the same physical page at the
// same address in a private anonymous area of the parent, as a fork left
// them where neither wrote since. Those pages are recorded in the area's
// InParent and not saved, so that the restore shares them again rather
// than making two copies. rs are the members' records (gather), in
// t.members' order. Without CAP_SYS_ADMIN pagemap shows no frame numbers
// and nothing is marked.
func (t *FrozenTree) markCow(rs []*records) error {
	// The members are t.procs' living ones in the same order; t.procs
	// names them as the snapshot does (a frozen PID namespace's own
	// numbers), t.members as this host does.
	byPid := map[int]int{} // saved pid -> index in t.members
	j := 0
	for _, m := range t.procs {
		if !m.Zombie && j < len(t.members) {
			byPid[m.Pid] = j
			j++
		}
	}
	for k := range t.procs {
		m := &t.procs[k]
		ci, ok := byPid[m.Pid]
		pi, pok := byPid[m.PPid]
		if !ok || !pok || ci == 0 || t.members[ci].leaderExited || !image.MayForkLate(t.procs, k) {
			continue
		}
		n, err := inParent(t.members[ci].rd, t.members[pi].rd, rs[ci], rs[pi])
		if err != nil {
			return fmt.Errorf("pid %d: %w", m.Pid, err)
		}
		m.Cow = n > 0
	}
	return nil
}

// inParent marks the pages of child's private anonymous areas that are
// parent's (markCow) in r.vmas and r.dump and returns how many.
func inParent(child, parent int, r, pr *records) (int, error) {
	cm, err := os.Open(procfs.Path(child, "pagemap"))
	if err != nil {
		return 0, err
	}
	defer cm.Close()
	pm, err := os.Open(procfs.Path(parent, "pagemap"))
	if err != nil {
		return 0, err
	}
	defer pm.Close()
	total := 0
	ranges := map[uint64][][2]uint64{}
	ce, pe := make([]uint64, pagemapStep), make([]uint64, pagemapStep)
	for _, v := range r.vmas {
		if v.Kind != image.VMAAnon || v.Shared || !parentAnon(pr.vmas, v.Start, v.End) {
			continue
		}
		var out [][2]uint64
		for base := v.Start; base < v.End; base += pagemapStep * pageSize {
			n := int(min((v.End-base)/pageSize, pagemapStep))
			if err := readPagemap(cm, base, ce[:n]); err != nil {
				return 0, err
			}
			if err := readPagemap(pm, base, pe[:n]); err != nil {
				return 0, err
			}
			for j := 0; j < n; j++ {
				c, p := ce[j], pe[j]
				if c&pmPresent == 0 || p&pmPresent == 0 || c&pmPFN == 0 || c&pmPFN != p&pmPFN {
					continue
				}
				addr := base + uint64(j)*pageSize
				if k := len(out) - 1; k >= 0 && out[k][1] == addr {
					out[k][1] += pageSize
				} else {
					out = append(out, [2]uint64{addr, addr + pageSize})
				}
				total++
			}
		}
		if len(out) > 0 {
			ranges[v.Start] = out
		}
	}
	for _, vs := range [][]image.VMA{r.vmas, r.dump} {
		for i := range vs {
			if out, ok := ranges[vs[i].Start]; ok && vs[i].Kind == image.VMAAnon {
				vs[i].InParent = out
			}
		}
	}
	return total, nil
}

// parentAnon reports whether [start, end) lies in one private anonymous
// area of the parent's.
func parentAnon(vmas []image.VMA, start, end uint64) bool {
	for _, v := range vmas {
		if v.Kind == image.VMAAnon && !v.Shared && v.Start <= start && end <= v.End {
			return true
		}
	}
	return false
}

// inParentAt reports whether the page at addr of v is its parent's
// (image.VMA.InParent), and if so where that run ends.
func inParentAt(v *image.VMA, addr uint64) (uint64, bool) {
	for _, r := range v.InParent {
		if r[0] <= addr && addr < r[1] {
			return r[1], true
		}
	}
	return 0, false
}
