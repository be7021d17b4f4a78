package loader

import (
	"errors"
	"hash/crc32"
	"os"
	"runtime"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// Filling fresh anonymous memory through process_vm_writev costs one page
// fault per 4 KiB page: the kernel allocates the page, zeroes it, maps it,
// and only then copies the saved contents over the zeroes. UFFDIO_COPY
// allocates each page and copies into it directly, for a whole range in
// one call: no faults and no zeroing. This is how pthaw fills the private
// anonymous areas (the heap, stacks, most of any process): the stub opens
// a userfaultfd for its own mm, pthaw takes it over with pidfd_getfd and
// registers those areas, fills them, and closes it before anything runs,
// which unregisters them and leaves their flags as they were. Where the
// kernel refuses (no userfaultfd, a page already there) pages are written
// the usual way.

// struct uffdio_* from <linux/userfaultfd.h>.
const (
	uffdAPI             = 0xaa
	uffdUserModeOnly    = 1
	uffdioAPI           = 0xc018aa3f
	uffdioRegister      = 0xc020aa00
	uffdioCopy          = 0xc028aa03
	uffdRegisterMissing = 1
)

type uffdioAPIArg struct{ API, Features, Ioctls uint64 }

type uffdioRange struct{ Start, Len uint64 }

type uffdioRegisterArg struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

type uffdioCopyArg struct {
	Dst, Src, Len, Mode uint64
	Copy                int64
}

// openUffd gives pthaw a userfaultfd on the process's memory with every
// private anonymous area registered, or nil when the kernel offers none.
// Runs on the tracer thread, after mapMemory.
func (p *Process) openUffd() *os.File {
	var areas [][2]uint64
	for _, v := range p.vmas {
		if uffdArea(v) {
			areas = append(areas, [2]uint64{v.Start, v.End})
		}
	}
	return p.openUffdAreas(areas)
}

// openUffdAreas is openUffd for the ranges areas (each one private
// anonymous area). Runs on the tracer thread.
func (p *Process) openUffdAreas(areas [][2]uint64) *os.File {
	fd, err := p.call(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|uffdUserModeOnly)
	if err != nil {
		return nil
	}
	defer p.call(unix.SYS_CLOSE, fd)
	pidfd, err := unix.PidfdOpen(p.pid, 0)
	if err != nil {
		return nil
	}
	mine, err := unix.PidfdGetfd(pidfd, int(fd), 0)
	unix.Close(pidfd)
	if err != nil {
		return nil
	}
	f := os.NewFile(uintptr(mine), "userfaultfd")
	api := uffdioAPIArg{API: uffdAPI}
	if uffdIoctl(f, uffdioAPI, &api) != nil {
		f.Close()
		return nil
	}
	for _, a := range areas {
		reg := uffdioRegisterArg{Range: uffdioRange{a[0], a[1] - a[0]}, Mode: uffdRegisterMissing}
		if uffdIoctl(f, uffdioRegister, &reg) != nil {
			f.Close() // unregisters what was registered
			return nil
		}
	}
	return f
}

// uffdArea says whether v is filled through the userfaultfd.
func uffdArea(v *image.VMA) bool { return v.Kind == image.VMAAnon }

// uffdSplit is the smallest fill that uffdFill shares between two
// threads. The copy's cost is the kernel's (allocating, charging and
// filling each page), and two UFFDIO_COPY calls on different ranges of
// one mm run side by side: on 2 cores a 1 GiB fill took 0.40–0.55 s on one
// thread (docs/benchmarks.md).
const uffdSplit = 1 << 20

// uffdPiece is the unit of a fill: copied by one thread, then summed by
// it while its bytes are still in the core's cache.
const uffdPiece = 256 << 10

// uffdFill copies data to addr (both page-aligned) with UFFDIO_COPY and
// returns how many bytes it placed from the start; the caller closes the
// userfaultfd and writes the rest the usual way (and reports any error
// that is real). When summed, crc is the CRC-32C of all of data (placed
// or not). A large fill is shared, piece by piece, by this thread and a
// goroutine that ends before uffdFill returns: each takes the next piece
// when done with its last, so neither waits on the other for long when
// the other is slowed (the read-ahead goroutine, or another program,
// taking its core). After a piece is refused, no further piece is copied;
// the pieces are still summed.
func uffdFill(f *os.File, addr uint64, data []byte, summed bool) (placed int, crc uint32) {
	if len(data) < uffdSplit || runtime.GOMAXPROCS(0) < 2 {
		return uffdFillSummed(f, addr, data, summed)
	}
	type result struct {
		placed int
		crc    uint32
	}
	res := make([]result, (len(data)+uffdPiece-1)/uffdPiece)
	var next atomic.Int64
	var refused atomic.Bool
	work := func() {
		for {
			i := int(next.Add(1) - 1)
			if i >= len(res) {
				return
			}
			off := i * uffdPiece
			piece := data[off:min(off+uffdPiece, len(data))]
			if !refused.Load() {
				res[i].placed = uffdCopyAll(f, addr+uint64(off), piece)
				if res[i].placed < len(piece) {
					refused.Store(true)
				}
			}
			if summed {
				res[i].crc = crc32.Update(0, castagnoli, piece)
			}
		}
	}
	helper := make(chan struct{})
	go func() {
		defer close(helper)
		work()
	}()
	work()
	<-helper
	whole := true // every piece so far placed in full
	for i, r := range res {
		n := min(uffdPiece, len(data)-i*uffdPiece)
		if summed {
			crc = image.CRCJoin(crc, r.crc, uint64(n))
		}
		if whole {
			// Pieces placed after a refused one are written again
			// the usual way (process_vm_writev overwrites present
			// pages).
			placed += r.placed
			whole = r.placed == n
		}
	}
	return placed, crc
}

// uffdFillOne places data at addr on this thread, as uffdFill does.
func uffdFillOne(f *os.File, addr uint64, data []byte) int {
	placed, _ := uffdFillSummed(f, addr, data, false)
	return placed
}

// uffdFillSummed is uffdFillOne that also returns, when summed, the
// CRC-32C of all of data, each piece summed right after its copy.
func uffdFillSummed(f *os.File, addr uint64, data []byte, summed bool) (placed int, crc uint32) {
	refused := false
	for off := 0; off < len(data); off += uffdPiece {
		piece := data[off:min(off+uffdPiece, len(data))]
		if !refused {
			n := uffdCopyAll(f, addr+uint64(off), piece)
			placed += n
			refused = n < len(piece)
		}
		if summed {
			crc = crc32.Update(crc, castagnoli, piece)
		}
	}
	return placed, crc
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// uffdCopyAll places as much of data at addr as UFFDIO_COPY will.
func uffdCopyAll(f *os.File, addr uint64, data []byte) int {
	done := 0
	for done < len(data) {
		c := uffdioCopyArg{Dst: addr + uint64(done), Len: uint64(len(data) - done)}
		err := uffdCopy(f, &c, data[done:])
		if c.Copy > 0 {
			done += int(c.Copy)
		}
		// EAGAIN with progress: interrupted part-way, go on. Anything
		// else (EEXIST: a page is there already) ends it.
		if err != nil && (!errors.Is(err, unix.EAGAIN) || c.Copy <= 0) {
			break
		}
	}
	return done
}

// closeUffd closes the userfaultfd, which unregisters every area.
func (p *Process) closeUffd() {
	if p.uffd != nil {
		p.uffd.Close()
		p.uffd = nil
	}
}
