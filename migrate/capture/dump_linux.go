package capture

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Memory is copied in chunks of chunkSize through nbufs buffers: one
// goroutine fills them with process_vm_readv while the caller encodes the
// previous one, so peak memory is nbufs*chunkSize whatever the process size.
const (
	chunkSize   = 4 << 20
	nbufs       = 3
	maxIov      = 1024 // IOV_MAX
	pagemapStep = 64 << 10
)

type run struct {
	addr uint64
	len  int
	anon bool // contents of an anonymous area: all-zero pages may be dropped
	// shared: pages shared copy-on-write with another process, read
	// through /proc/PID/mem (ptrace.Mem.ReadFile), which leaves them so
	shared bool
	off    int // where the contents are in the chunk's buffer (runs to write)
}

type chunk struct {
	buf  []byte
	runs []run // what to write: the read runs less their all-zero anonymous pages
	err  error
}

// dumpMemory writes the saved pages of every VMA as Pages records; with
// a parent, those the parent holds unchanged as ParentPages records.
func dumpMemory(pid int, mem *ptrace.Mem, vmas []image.VMA, enc *image.Encoder, parent map[uint64][image.DigestSize]byte) error {
	pagemap, err := os.Open(procfs.Path(pid, "pagemap"))
	if err != nil {
		return err
	}
	defer pagemap.Close()
	if parent != nil {
		// An incremental snapshot writes other records than the runs
		// read (ParentPages for the unchanged pages): they are summed as
		// they are written.
		dw := &deltaWriter{enc: enc, parent: parent}
		if err := copyMemory(mem, dw.write, func(r *reader) error { return r.readAll(pagemap, vmas) }); err != nil {
			return err
		}
		return dw.flush()
	}
	// The reader goroutine checksums the pages it has just read (still
	// in the cache), while this one writes the previous chunk.
	sum := enc.BeginPages()
	err = copyPages(mem, sum.Add, enc.WriteSummedPages, func(r *reader) error { return r.readAll(pagemap, vmas) })
	enc.EndPages(sum)
	return err
}

// copyMemory reads the runs that queue adds to the reader it is given and
// passes their contents to write (all-zero pages of anonymous runs left
// out), reading the next chunk while write handles the previous one.
func copyMemory(mem *ptrace.Mem, write func(addr uint64, data []byte) error, queue func(r *reader) error) error {
	return copyPages(mem, nil, write, queue)
}

// copyPages is copyMemory with sum, when not nil, called on the reader
// goroutine for every run before it is passed to write, in write's order.
func copyPages(mem *ptrace.Mem, sum func(addr uint64, data []byte), write func(addr uint64, data []byte) error, queue func(r *reader) error) error {
	free := make(chan []byte, nbufs)
	for i := 0; i < nbufs; i++ {
		free <- make([]byte, chunkSize)
	}
	full := make(chan chunk, nbufs)
	stop := make(chan struct{})
	// The reader goroutine ends when all memory is read, on its first
	// error, or when stop is closed because the writer failed.
	go func() {
		defer close(full)
		r := &reader{mem: mem, sum: sum, free: free, full: full, stop: stop}
		err := queue(r)
		if err == nil {
			err = r.flush()
		}
		if err != nil {
			select {
			case full <- chunk{err: err}:
			case <-stop:
			}
		}
	}()
	defer func() {
		close(stop)
		for range full {
		}
	}()
	for c := range full {
		if c.err != nil {
			return c.err
		}
		for _, r := range c.runs {
			if err := write(r.addr, c.buf[r.off:r.off+r.len]); err != nil {
				return err
			}
		}
		free <- c.buf
	}
	return nil
}

var zeroPage [pageSize]byte

// dropZeros appends to out the runs to write for the read run r, whose
// contents are buf[off:off+r.len]: all of it, or for an anonymous area the
// spans between its all-zero pages (they read back as zero from a fresh
// mapping). Each run's off is where its contents are in buf.
func dropZeros(out []run, r run, buf []byte, off int) []run {
	if !r.anon {
		r.off = off
		return append(out, r)
	}
	data := buf[off : off+r.len]
	start := -1
	for p := 0; p <= len(data); p += pageSize {
		zero := p == len(data) || bytes.Equal(data[p:p+pageSize], zeroPage[:])
		if !zero && start < 0 {
			start = p
		}
		if zero && start >= 0 {
			out = append(out, run{addr: r.addr + uint64(start), len: p - start, off: off + start})
			start = -1
		}
	}
	return out
}

type reader struct {
	mem  *ptrace.Mem
	sum  func(addr uint64, data []byte) // see copyPages
	free chan []byte
	full chan chunk
	stop chan struct{}

	buf  []byte
	used int
	runs []run
	iov  []unix.RemoteIovec
}

func (r *reader) readAll(pagemap *os.File, vmas []image.VMA) error {
	return r.readAreas(pagemap, nil, vmas, nil)
}

// readAreas is readAll leaving out, when parent (the pagemap of the
// process's parent) is not nil, the private anonymous pages that are
// still the parent's (the same frame at the same address), each told to
// skipped.
func (r *reader) readAreas(pagemap, parent *os.File, vmas []image.VMA, skipped func(addr uint64)) error {
	entries := make([]uint64, pagemapStep)
	var pe []uint64
	if parent != nil {
		pe = make([]uint64, pagemapStep)
	}
	for i := range vmas {
		v := &vmas[i]
		if v.Kind.Kernel() || (v.Kind == image.VMAFile && v.Shared) {
			continue
		}
		anon := v.Kind != image.VMAFile
		for base := v.Start; base < v.End; base += pagemapStep * pageSize {
			n := int((v.End - base) / pageSize)
			if n > pagemapStep {
				n = pagemapStep
			}
			e := entries[:n]
			if v.Kind != image.VMASharedAnon {
				if err := readPagemap(pagemap, base, e); err != nil {
					return err
				}
			}
			fromParent := parent != nil && v.Kind == image.VMAAnon && !v.Shared
			if fromParent {
				// A range the parent has not mapped reads as zeros.
				if err := readPagemap(parent, base, pe[:n]); err != nil {
					fromParent = false
				}
			}
			if fromParent {
				for j := range e {
					c, p := e[j], pe[j]
					if c&pmPresent != 0 && p&pmPresent != 0 && c&pmExclusive == 0 && c&pmPFN != 0 && c&pmPFN == p&pmPFN {
						e[j] = 0 // not wanted
						skipped(base + uint64(j)*pageSize)
					}
				}
			}
			want := func(j int) bool {
				if !wantPage(v, e[j]) {
					return false
				}
				// A page its parent holds (a tree's cow) comes with the fork.
				_, shared := inParentAt(v, base+uint64(j)*pageSize)
				return !shared
			}
			// A private anonymous page mapped elsewhere too (a fork's,
			// copy-on-write) is read so as to stay shared: a live
			// migration's or a failed freeze's original keeps it one
			// page, and a tree's sharing is still there to be found
			// at the stop (markCow).
			cow := func(j int) bool { return v.Kind == image.VMAAnon && !v.Shared && e[j]&pmExclusive == 0 }
			if err := r.addRuns(base, n, anon, want, cow); err != nil {
				return err
			}
		}
	}
	return r.flush()
}

// read fills r.buf with the queued runs: the shared ones each through
// /proc/PID/mem, the others gathered by process_vm_readv between them.
func (r *reader) read() error {
	off, from, fromOff := 0, 0, 0 // from: the first run not read yet
	for i, rr := range r.runs {
		if rr.shared {
			if err := r.mem.ReadV(r.buf[fromOff:off], r.iov[from:i]); err != nil {
				return err
			}
			if err := r.mem.ReadFile(rr.addr, r.buf[off:off+rr.len]); err != nil {
				return err
			}
			from, fromOff = i+1, off+rr.len
		}
		off += rr.len
	}
	return r.mem.ReadV(r.buf[fromOff:off], r.iov[from:])
}

// add queues a run of pages, flushing full buffers.
func (r *reader) add(addr uint64, n int, anon bool) error {
	return r.addRun(addr, n, anon, false)
}

// addRuns queues the pages j < n from base that want(j), in runs of pages
// alike in cow(j) (shared with another process: read so as to stay so).
func (r *reader) addRuns(base uint64, n int, anon bool, want, cow func(j int) bool) error {
	for j := 0; j < n; {
		if !want(j) {
			j++
			continue
		}
		k := j + 1
		for k < n && want(k) && cow(k) == cow(j) {
			k++
		}
		if err := r.addRun(base+uint64(j)*pageSize, (k-j)*pageSize, anon, cow(j)); err != nil {
			return err
		}
		j = k
	}
	return nil
}

// addRun is add for pages that may be shared copy-on-write (run.shared).
func (r *reader) addRun(addr uint64, n int, anon, shared bool) error {
	for n > 0 {
		if r.buf == nil {
			select {
			case b := <-r.free:
				r.buf = b[:cap(b)]
			case <-r.stop:
				return fmt.Errorf("stopped")
			}
			r.used, r.runs, r.iov = 0, r.runs[:0], r.iov[:0]
		}
		take := len(r.buf) - r.used
		if take > n {
			take = n
		}
		r.runs = append(r.runs, run{addr: addr, len: take, anon: anon, shared: shared})
		r.iov = append(r.iov, unix.RemoteIovec{Base: uintptr(addr), Len: take})
		r.used += take
		addr += uint64(take)
		n -= take
		if r.used == len(r.buf) || len(r.iov) == maxIov {
			if err := r.flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

func (r *reader) flush() error {
	if r.buf == nil {
		return nil
	}
	if err := r.read(); err != nil {
		return fmt.Errorf("read memory: %w", err)
	}
	// Zero pages are dropped and the rest summed here, on the pages just
	// read, rather than by the writer after they have left the cache.
	var runs []run
	off := 0
	for _, rr := range r.runs {
		runs = dropZeros(runs, rr, r.buf, off)
		off += rr.len
	}
	if r.sum != nil {
		for _, o := range runs {
			r.sum(o.addr, r.buf[o.off:o.off+o.len])
		}
	}
	select {
	case r.full <- chunk{buf: r.buf, runs: runs}:
	case <-r.stop:
		return fmt.Errorf("stopped")
	}
	r.buf = nil
	return nil
}
