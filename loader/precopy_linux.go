package loader

import (
	"fmt"
	"sort"

	"github.com/pcluster/pcluster/migrate/image"
)

// A live migration (pfreeze -live) sends most memory before the process
// record, in rounds, while the original still runs: later pages replace
// earlier ones at the same address and drop records take back ranges. The
// receiver keeps them here, and writes what is left into the process as
// soon as its areas are mapped, before the snapshot's own pages.

const (
	stageBlock = 64 << 10 // bytes of one staging block
	stagePages = stageBlock / pageSize
)

type stageBlockT struct {
	data []byte
	have [stagePages]bool
	n    int // pages held
}

// staging holds the pre-copied pages by address.
type staging struct {
	blocks map[uint64]*stageBlockT
	rounds int
}

// stagePrecopy reads the pre-copy records at the start of a snapshot,
// first being the first record, and returns the first record after them.
func stagePrecopy(dec *image.Decoder, first any) (*staging, any, error) {
	var st *staging
	rec := first
	for {
		switch r := rec.(type) {
		case *image.Precopy:
			if st == nil {
				st = &staging{blocks: map[uint64]*stageBlockT{}}
			}
			if err := st.put(dec, r.Addr, r.Len); err != nil {
				return nil, nil, err
			}
		case *image.Drop:
			if st != nil {
				st.drop(r.Addr, r.Len)
			}
		case *image.Round:
			if st == nil {
				st = &staging{blocks: map[uint64]*stageBlockT{}}
			}
			st.rounds++
		default:
			return st, rec, nil
		}
		var err error
		if rec, err = dec.Next(); err != nil {
			return nil, nil, err
		}
	}
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

// apply writes the staged pages into the process, by runs.
func (st *staging) apply(fill func(addr uint64, data []byte) error) error {
	bases := make([]uint64, 0, len(st.blocks))
	for a := range st.blocks {
		bases = append(bases, a)
	}
	sort.Slice(bases, func(i, j int) bool { return bases[i] < bases[j] })
	for _, base := range bases {
		b := st.blocks[base]
		for p := 0; p < stagePages; {
			if !b.have[p] {
				p++
				continue
			}
			q := p + 1
			for q < stagePages && b.have[q] {
				q++
			}
			if err := fill(base+uint64(p)*pageSize, b.data[p*pageSize:q*pageSize]); err != nil {
				return fmt.Errorf("pre-copied pages: %w", err)
			}
			p = q
		}
		delete(st.blocks, base) // memory back as it goes
	}
	return nil
}
