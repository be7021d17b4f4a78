package loader

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sort"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// call injects a system call into the process being built.
// Runs on the tracer thread.
func (p *Process) call(nr uintptr, args ...uintptr) (uintptr, error) {
	return p.in.Syscall(nr, args...)
}

// putString writes a NUL-terminated string into the stub's scratch page.
func (p *Process) putString(s string) (uintptr, error) {
	if len(s)+1 > pageSize {
		return 0, fmt.Errorf("path too long: %q", s)
	}
	addr := p.base + stubScratchOff
	if err := p.mem.Write(addr, append([]byte(s), 0)); err != nil {
		return 0, err
	}
	return uintptr(addr), nil
}

// buildProt is the protection an area gets while it is filled.
func buildProt(v *image.VMA) uint32 {
	if v.Kind == image.VMAFile && v.Shared {
		return v.Prot
	}
	return v.Prot | unix.PROT_READ | unix.PROT_WRITE
}

// mapMemory replaces the stub's own areas by the snapshot's: the files
// they map are opened one by one, then every area is mapped in one batch.
func (p *Process) mapMemory() error {
	return p.tr.Do(func() error {
		// The layout only (maps, not smaps): smaps walks the page
		// tables, and a live migration's stub holds the pre-copied
		// memory by now (20 ms a GiB, in the stop).
		cur, err := procfs.MapsLayout(p.pid)
		if err != nil {
			return err
		}
		if err := p.moveKernelAreas(cur); err != nil {
			return err
		}
		if err := p.attachSysV(); err != nil {
			return err
		}
		files := map[string]uintptr{}
		defer func() {
			var closes []batchCall
			for _, fd := range files {
				closes = append(closes, batchCall{nr: unix.SYS_CLOSE, args: [6]uintptr{fd}})
			}
			p.callBatch(closes)
		}()
		var maps []batchCall
		var mapped []*image.VMA
		for _, v := range p.vmas {
			if v.Kind.Kernel() {
				continue
			}
			if p.kept[v.Start] {
				// Mapped, read-write, as its pre-copied pages came.
				if prot := buildProt(v); prot != unix.PROT_READ|unix.PROT_WRITE {
					if _, err := p.call(unix.SYS_MPROTECT, uintptr(v.Start), uintptr(v.Len()), uintptr(prot)); err != nil {
						return fmt.Errorf("%s: mprotect: %w", vmaName(v), err)
					}
				}
				continue
			}
			flags := uintptr(unix.MAP_FIXED_NOREPLACE)
			fd := ^uintptr(0)
			switch v.Kind {
			case image.VMAAnon:
				flags |= unix.MAP_PRIVATE | unix.MAP_ANONYMOUS
				if v.GrowsDown() {
					flags |= unix.MAP_GROWSDOWN
				}
				// Flags only mmap sets (smaps: "nr" no swap space
				// accounted, "dp" pages the kernel may drop).
				if hasVmFlag(v.VmFlags, "nr") {
					flags |= unix.MAP_NORESERVE
				}
				if hasVmFlag(v.VmFlags, "dp") {
					flags = flags&^unix.MAP_PRIVATE | unix.MAP_DROPPABLE
				}
			case image.VMASharedAnon:
				if err := p.mapSharedAnon(v); err != nil {
					return err
				}
				continue
			case image.VMAFile:
				if p.sysvObject(v) != nil {
					continue // attached by attachSysV
				}
				mode := uintptr(unix.O_RDONLY)
				flags |= unix.MAP_PRIVATE
				if v.Shared {
					flags = flags&^unix.MAP_PRIVATE | unix.MAP_SHARED
					// "mw" (VM_MAYWRITE): the file was opened for
					// writing, so a later mprotect(PROT_WRITE) of a
					// read-only area succeeds (zdtm's maps_file_prot).
					if v.Prot&unix.PROT_WRITE != 0 || hasVmFlag(v.VmFlags, "mw") {
						mode = unix.O_RDWR
					}
				}
				name := v.Name
				if v.Object != 0 {
					name = p.objectPath(v.Object)
				}
				key := fmt.Sprintf("%d:%s", mode, name)
				f, ok := files[key]
				if !ok {
					path, err := p.putString(name)
					if err != nil {
						return err
					}
					f, err = p.call(unix.SYS_OPEN, path, mode|unix.O_CLOEXEC)
					if err != nil {
						return fmt.Errorf("%s: open: %w", vmaName(v), err)
					}
					files[key] = f
				}
				fd = f
			}
			maps = append(maps, batchCall{nr: unix.SYS_MMAP,
				args: [6]uintptr{uintptr(v.Start), uintptr(v.Len()), uintptr(buildProt(v)), flags, fd, uintptr(v.Offset)},
				fail: func(err error) error { return fmt.Errorf("%s: mmap: %w", vmaName(v), err) }})
			mapped = append(mapped, v)
		}
		got, err := p.callBatch(maps)
		if err != nil {
			return err
		}
		for i, v := range mapped {
			if got[i] != v.Start {
				return fmt.Errorf("%s: mapped at %#x", vmaName(v), got[i])
			}
		}
		p.uffd = p.openUffd()
		return nil
	})
}

// mapSharedAnon maps a shared anonymous area at once, not in the batch: a
// later area of the same object (in this process too) maps it through
// this one. In a tree, an object another area mapped first is mapped
// through that area's /proc/PID/map_files link, so the pages stay shared.
// Runs on the tracer thread.
func (p *Process) mapSharedAnon(v *image.VMA) error {
	path, off, ok, err := p.sharedArea(v)
	if err != nil {
		return err
	}
	flags := uintptr(unix.MAP_FIXED_NOREPLACE | unix.MAP_SHARED)
	fd, what := ^uintptr(0), ""
	if ok {
		s, err := p.putString(path)
		if err != nil {
			return err
		}
		if fd, err = p.call(unix.SYS_OPEN, s, unix.O_RDWR|unix.O_CLOEXEC); err != nil {
			return fmt.Errorf("%s: open %s: %w", vmaName(v), path, err)
		}
		defer p.call(unix.SYS_CLOSE, fd)
		what = " " + path
	} else if whole := p.wholeObject(v); whole > 0 {
		// The first of several areas at other offsets of one object
		// (areas moved or cut apart, zdtm's maps01): the object is made
		// whole, and v is its part at v's offset.
		return p.mapObjectPart(v, whole)
	} else {
		flags |= unix.MAP_ANONYMOUS
		off = 0
	}
	r, err := p.call(unix.SYS_MMAP, uintptr(v.Start), uintptr(v.Len()), uintptr(buildProt(v)), flags, fd, uintptr(off))
	if err != nil {
		return fmt.Errorf("%s: mmap%s: %w", vmaName(v), what, err)
	}
	if uint64(r) != v.Start {
		return fmt.Errorf("%s: mapped at %#x", vmaName(v), r)
	}
	if !ok {
		p.mappedShared(v, false, 0)
	}
	return nil
}

// wholeObject returns the size of the memory object of v, a tree's shared
// anonymous area, when v is not all of it (other areas may map the rest),
// or 0.
func (p *Process) wholeObject(v *image.VMA) uint64 {
	size := uint64(v.FileSize)
	if p.tree == nil || v.Shm == 0 || v.FileSize <= 0 || size%pageSize != 0 || v.Offset+v.Len() > size || (v.Offset == 0 && v.Len() == size) {
		return 0
	}
	return size
}

// mapObjectPart makes v's memory object whole (size bytes: a shared
// anonymous mapping anywhere) and moves v's part of it to v's place
// (mremap keeps its offset in the object), unmapping the rest: later
// areas of the object map it by offset. Runs on the tracer thread.
func (p *Process) mapObjectPart(v *image.VMA, size uint64) error {
	prot := uintptr(buildProt(v))
	// v's place must be free, as for every area.
	r, err := p.call(unix.SYS_MMAP, uintptr(v.Start), uintptr(v.Len()), unix.PROT_NONE, unix.MAP_FIXED_NOREPLACE|unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uintptr(0), 0)
	if err != nil || uint64(r) != v.Start {
		return fmt.Errorf("%s: its place is not free: %v", vmaName(v), err)
	}
	whole, err := p.call(unix.SYS_MMAP, 0, uintptr(size), prot, unix.MAP_SHARED|unix.MAP_ANONYMOUS, ^uintptr(0), 0)
	if err != nil {
		return fmt.Errorf("%s: its memory object of %#x bytes: %w", vmaName(v), size, err)
	}
	if _, err := p.call(unix.SYS_MREMAP, whole+uintptr(v.Offset), uintptr(v.Len()), uintptr(v.Len()), unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(v.Start)); err != nil {
		p.call(unix.SYS_MUNMAP, whole, uintptr(size))
		return fmt.Errorf("%s: mremap its part of its memory object: %w", vmaName(v), err)
	}
	if v.Offset > 0 {
		p.call(unix.SYS_MUNMAP, whole, uintptr(v.Offset))
	}
	if rest := v.Offset + v.Len(); rest < size {
		p.call(unix.SYS_MUNMAP, whole+uintptr(rest), uintptr(size-rest))
	}
	p.mappedShared(v, true, size)
	return nil
}

// advise re-applies the madvise flags /proc reported for v, and mlock
// ("lo": after the contents are written, which it keeps in memory).
func (p *Process) advise(v *image.VMA) error {
	if hasVmFlag(v.VmFlags, "lo") {
		if _, err := p.call(unix.SYS_MLOCK, uintptr(v.Start), uintptr(v.Len())); err != nil {
			return fmt.Errorf("%s: mlock: %w", vmaName(v), err)
		}
	}
	for _, a := range []struct {
		flag   string
		advice uintptr
	}{
		{"sr", unix.MADV_SEQUENTIAL},
		{"rr", unix.MADV_RANDOM},
		{"mg", unix.MADV_MERGEABLE},
		{"dd", unix.MADV_DONTDUMP},
		{"dc", unix.MADV_DONTFORK},
		{"wf", unix.MADV_WIPEONFORK},
		{"hg", unix.MADV_HUGEPAGE},
		{"nh", unix.MADV_NOHUGEPAGE},
	} {
		if !hasVmFlag(v.VmFlags, a.flag) {
			continue
		}
		if _, err := p.call(unix.SYS_MADVISE, uintptr(v.Start), uintptr(v.Len()), a.advice); err != nil {
			return fmt.Errorf("%s: madvise %s: %w", vmaName(v), a.flag, err)
		}
	}
	return nil
}

func hasVmFlag(flags, f string) bool {
	for i := 0; i+2 <= len(flags); i += 3 {
		if flags[i:i+2] == f {
			return true
		}
	}
	return false
}

// moveKernelAreas unmaps the stub's stack and moves its vvar, vvar_vclock
// and vdso to the snapshot's addresses. They are the kernel's own pages,
// so they can only be moved, and only when this kernel's vdso is the one
// the process was using. Runs on the tracer thread.
func (p *Process) moveKernelAreas(cur []procfs.Mapping) error {
	kinds := map[string]image.VMAKind{"[vdso]": image.VMAVdso, "[vvar]": image.VMAVvar, "[vvar_vclock]": image.VMAVvarVclock}
	have := map[image.VMAKind]procfs.Mapping{}
	var avoid [][2]uint64
	avoid = append(avoid, p.snapshotRanges()...)
	for _, m := range cur {
		avoid = append(avoid, [2]uint64{m.Start, m.End})
		if k, ok := kinds[m.Path]; ok {
			have[k] = m
			continue
		}
		if (m.Start >= p.base && m.End <= p.base+stubSize) || m.Path == "[vsyscall]" {
			continue
		}
		// Areas a live migration filled as it went stay (the kernel may
		// have merged one with a neighbour of the stub's).
		for _, r := range p.keptOutside(m.Start, m.End) {
			if _, err := p.call(unix.SYS_MUNMAP, uintptr(r[0]), uintptr(r[1]-r[0])); err != nil {
				return fmt.Errorf("unmap stub area %#x-%#x %s: %w", r[0], r[1], m.Path, err)
			}
		}
	}
	var want []*image.VMA
	for _, v := range p.vmas {
		if !v.Kind.Kernel() {
			continue
		}
		m, ok := have[v.Kind]
		if !ok {
			return fmt.Errorf("%s: this kernel has no such area", vmaName(v))
		}
		if m.End-m.Start != v.Len() {
			return fmt.Errorf("%s: this kernel's is %d bytes, the snapshot's %d", vmaName(v), m.End-m.Start, v.Len())
		}
		if v.Kind == image.VMAVdso {
			here := make([]byte, v.Len())
			if err := p.mem.Read(m.Start, here); err != nil {
				return fmt.Errorf("read vdso: %w", err)
			}
			if !bytes.Equal(here, v.Content) {
				return fmt.Errorf("the vdso of this kernel differs from the snapshot's (frozen on kernel %s): not supported yet", p.proc.Kernel)
			}
		}
		want = append(want, v)
	}
	if len(want) != len(have) {
		return fmt.Errorf("snapshot has %d kernel areas, this kernel %d", len(want), len(have))
	}
	// Two hops, via a range free in both layouts, so that no move lands
	// on an area still to be moved.
	sort.Slice(want, func(i, j int) bool { return want[i].Start < want[j].Start })
	total := want[len(want)-1].End - want[0].Start
	tmp := freeRange(total, avoid)
	for pass := 0; pass < 2; pass++ {
		for _, v := range want {
			m := have[v.Kind]
			dst := tmp + (v.Start - want[0].Start)
			src := m.Start
			if pass == 1 {
				src, dst = dst, v.Start
			}
			if _, err := p.call(unix.SYS_MREMAP, uintptr(src), uintptr(v.Len()), uintptr(v.Len()),
				unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(dst)); err != nil {
				return fmt.Errorf("move %s to %#x: %w", v.Name, dst, err)
			}
		}
	}
	for _, v := range want {
		if v.Kind == image.VMAVdso {
			i := bytes.Index(v.Content, []byte{0x0f, 0x05})
			if i < 0 {
				return fmt.Errorf("no syscall instruction in the vdso")
			}
			p.vdso = v.Start + uint64(i)
		}
	}
	return nil
}

// fill writes saved page contents at addr into the process. When sum is
// not nil it is given their CRC-32C, the stream's checksum that the
// decoder left to the filler (image.Decoder.ReadDataDeferred): summed
// here, on the threads that copy, while the bytes are in their cache.
func (p *Process) fill(addr uint64, data []byte, sum *image.DeferredSum) error {
	n := uint64(len(data))
	i := sort.Search(len(p.vmas), func(i int) bool { return p.vmas[i].End > addr })
	if i == len(p.vmas) || addr < p.vmas[i].Start || addr+n > p.vmas[i].End || addr+n < addr {
		return fmt.Errorf("%w: pages %#x+%#x outside every memory area", image.ErrCorrupt, addr, n)
	}
	v := p.vmas[i]
	if v.Kind.Kernel() || (v.Kind == image.VMAFile && v.Shared) {
		return fmt.Errorf("%w: pages for %s", image.ErrCorrupt, vmaName(v))
	}
	whole, summed := data, false
	var crc uint32
	if p.uffd != nil && uffdArea(v) {
		if addr%pageSize == 0 && n%pageSize == 0 {
			var placed int
			placed, crc = uffdFill(p.uffd, addr, data, sum != nil)
			summed = sum != nil
			addr, data = addr+uint64(placed), data[placed:]
		}
		if len(data) > 0 {
			// While its areas are registered (user-mode-only faults),
			// the kernel refuses process_vm_writev into their missing
			// pages: from here on everything is written the usual way.
			p.closeUffd()
		}
	}
	if sum != nil && !summed {
		crc = image.CRC(whole)
	}
	if err := p.mem.Write(addr, data); err != nil {
		return fmt.Errorf("%s: %w", vmaName(v), err)
	}
	if sum != nil {
		sum.Set(crc)
	}
	return nil
}

// finishMemory gives every area its saved protection.
func (p *Process) finishMemory() error {
	p.closeUffd()
	var calls []batchCall
	for _, v := range p.vmas {
		if v.Kind.Kernel() || buildProt(v) == v.Prot {
			continue
		}
		calls = append(calls, batchCall{nr: unix.SYS_MPROTECT, args: [6]uintptr{uintptr(v.Start), uintptr(v.Len()), uintptr(v.Prot)},
			fail: func(err error) error { return fmt.Errorf("%s: mprotect: %w", vmaName(v), err) }})
	}
	return p.tr.Do(func() error {
		_, err := p.callBatch(calls)
		return err
	})
}

// batchCall is one system call of a batch: its number, its arguments, and
// what to say if it fails.
type batchCall struct {
	nr   uintptr
	args [6]uintptr
	fail func(error) error
}

// callBatch runs calls in the stub, up to a page of them per ptrace stop
// (its batch loop, stubBatchOff) instead of one stop each, and returns
// their results. They must not depend on each other's results. Runs on the
// tracer thread.
func (p *Process) callBatch(calls []batchCall) ([]uint64, error) {
	const max = pageSize / batchEntry
	table := p.base + stubScratchOff
	results := make([]uint64, 0, len(calls))
	for len(calls) > 0 {
		n := min(len(calls), max)
		b := make([]byte, n*batchEntry)
		for i, c := range calls[:n] {
			e := b[i*batchEntry:]
			binary.LittleEndian.PutUint64(e, uint64(c.nr))
			for j, a := range c.args {
				binary.LittleEndian.PutUint64(e[8+8*j:], uint64(a))
			}
		}
		if err := p.mem.Write(table, b); err != nil {
			return nil, err
		}
		done, err := p.in.Batch(uintptr(p.base+stubBatchOff), uintptr(table), n)
		if errno, ok := err.(syscall.Errno); ok && calls[done].fail != nil {
			return nil, calls[done].fail(errno)
		}
		if err != nil {
			return nil, err
		}
		if err := p.mem.Read(table, b); err != nil {
			return nil, err
		}
		for i := range n {
			results = append(results, binary.LittleEndian.Uint64(b[i*batchEntry+56:]))
		}
		calls = calls[n:]
	}
	return results, nil
}
