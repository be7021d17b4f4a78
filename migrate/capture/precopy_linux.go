package capture

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Live migration (pfreeze -live) copies memory while the process runs.
// Its private anonymous areas are registered with a userfaultfd in
// asynchronous write-protect mode (UFFD_FEATURE_WP_ASYNC, with
// WP_UNPOPULATED so that pages faulted in later count as written too):
// the kernel write-protects every page, and a write just clears the
// protection, with no fault for us to serve. PAGEMAP_SCAN with
// PM_SCAN_WP_MATCHING then returns the pages written since the last scan
// and protects them again, atomically. Round 0 sends every page; each
// later round the pages written during the one before; when what is left
// can be sent within the downtime aimed at (or the rounds stop paying),
// the process is stopped and the final round sends the rest. Soft-dirty
// bits would do as well but are not built into these kernels.
//
// The userfaultfd is the process's own (only its creator's mm can be
// registered): it is made by one call injected into the stopped process,
// taken over with pidfd_getfd and closed in the process again, so the
// process runs with no fd of ours. Closing ours unregisters every area.
//
// What escapes tracking is never trusted: an area that was unmapped,
// remapped or resized since it was registered (PAGEMAP_SCAN's
// PM_SCAN_CHECK_WPASYNC refuses a range that is no longer registered), or
// whose round failed, is dropped on the receiver and sent in full after
// the stop; pages the receiver holds that are gone from the process
// (madvise(MADV_DONTNEED) clears a page without a write) are dropped.

// LiveOptions bound a live migration's pre-copy.
type LiveOptions struct {
	// MaxRounds bounds the rounds after the first full copy (0: 8).
	MaxRounds int
	// Downtime is the stop aimed at: pre-copy ends once the pages
	// written during a round can be sent in this long (0: 100 ms).
	Downtime time.Duration
	// Bandwidth caps the bytes per second the rounds send (0: as fast as
	// the sink takes them).
	Bandwidth int64
	// Notice receives one-line messages for the user (the fallback to
	// stop-and-copy).
	Notice func(string)
	// Stats, if set, is filled in as the migration goes.
	Stats *LiveStats
	// Round, if set, is called after each round sent while the process
	// runs (n: 0 for the full copy), with the bytes of pages it sent:
	// progress, before the next round or the stop.
	Round func(n int, bytes uint64)
}

// LiveStats report what a live migration did.
type LiveStats struct {
	Rounds       int    // pre-copy rounds before the stop (the full copy included)
	PrecopyBytes uint64 // page contents sent while the process ran
	FinalBytes   uint64 // page contents of tracked areas sent after the stop
	// SharedBytes: pages a tree member shared with its parent (copy on
	// write) when its pre-copy began, left out of it: they come with the
	// fork of its parent on the receiver, or, those unshared by the
	// stop, in FinalBytes.
	SharedBytes uint64
	Untracked   int       // areas sent in full after the stop
	StoppedAt   time.Time // when the process was stopped for the final round
	Fallback    bool      // the writer outran the link: stopped early
	// FlagsAtStop: the areas' VmFlags were read (smaps, a walk of every
	// page table) with the process stopped, not while it ran
	// (vmwatch_linux.go).
	FlagsAtStop bool
}

const (
	pagemapScanIoctl         = 0xc0606610 // _IOWR('f', 16, struct pm_scan_arg)
	pmScanWPMatching         = 1 << 0
	pmScanCheckWPAsync       = 1 << 1
	pageIsWritten            = 1 << 1
	pageIsPresent            = 1 << 3
	pageIsSwapped            = 1 << 4
	pageIsPfnZero            = 1 << 5
	uffdAPI                  = 0xaa
	uffdUserModeOnly         = 1
	uffdioAPI                = 0xc018aa3f
	uffdioRegister           = 0xc020aa00
	uffdRegisterModeWP       = 1 << 1
	uffdFeatureWPUnpopulated = 1 << 13
	uffdFeatureWPAsync       = 1 << 15
)

type uffdioAPIArg struct{ API, Features, Ioctls uint64 }

type uffdioRegisterArg struct {
	Start, Len, Mode, Ioctls uint64
}

// trackedArea is a private anonymous area registered for tracking.
type trackedArea struct {
	start, end uint64
	sent       []uint64 // bitmap: pages the receiver holds
	ok         bool     // every write since registration is accounted for
	stack      bool     // grows down: not announced (a receiver maps it flat)
	// deferred: pages round 0 left out as its parent's (precopy.parent),
	// to be sent at the stop unless they are its parent's still
	deferred int
}

func (a *trackedArea) mark(addr, n uint64) {
	for p := (addr - a.start) / pageSize; p < (addr+n-a.start)/pageSize; p++ {
		a.sent[p/64] |= 1 << (p % 64)
	}
}

func (a *trackedArea) isSent(p uint64) bool { return a.sent[p/64]&(1<<(p%64)) != 0 }

// precopy is the state of one process's pre-copy.
type precopy struct {
	pid     int
	saved   int    // in a tree, the pid the snapshot knows it by
	started uint64 // in a tree, its start time (PID reuse shows)
	o       LiveOptions
	stats   *LiveStats
	mem     *ptrace.Mem
	uffd    *os.File
	pagemap *os.File
	areas   []*trackedArea
	vec     []pageRegion
	// watch: the areas' flags read while it ran, and the calls that can
	// have changed them since (vmwatch_linux.go).
	watch *vmWatch
	rd    int // the thread through which pid's /proc is read
	// parent: in a tree, the pre-copy of the member's parent, if
	// tracked. Round 0 leaves out the pages the member still shares
	// with it copy-on-write (the receiver forks the member from its
	// parent once that is built, image.TreeProc.Cow): what is still
	// shared at the stop comes with the fork, the rest is sent then.
	parent *precopy
}

// startPrecopy opens the tracking of pid's private anonymous memory:
// stopped only for the one injected call that makes the userfaultfd.
func startPrecopy(tr *ptrace.Tracer, pid int, o LiveOptions) (*precopy, error) {
	return startPrecopyWith(tr, pid, o, func() (*Frozen, error) { return Attach(tr, pid) }, true)
}

// startPrecopyWith is startPrecopy stopping pid with attach; watch: the
// calls that change the areas' flags are counted (vmwatch_linux.go).
func startPrecopyWith(tr *ptrace.Tracer, pid int, o LiveOptions, attach func() (*Frozen, error), watch bool) (*precopy, error) {
	if o.MaxRounds <= 0 {
		o.MaxRounds = 8
	}
	if o.Downtime <= 0 {
		o.Downtime = 100 * time.Millisecond
	}
	// The memory is read through a live thread: a main thread that ended
	// with pthread_exit is a zombie without an mm (its /proc files fail
	// with ESRCH) while the others run on. The files opened hold the mm,
	// whichever thread later ends.
	rd := procfs.Reader(pid)
	if rd == 0 {
		return nil, fmt.Errorf("live %d: process is a zombie", pid)
	}
	pc := &precopy{pid: pid, o: o, stats: o.Stats, mem: ptrace.NewMem(rd), vec: make([]pageRegion, 4096), rd: rd}
	if pc.stats == nil {
		pc.stats = &LiveStats{}
	}
	var err error
	if pc.pagemap, err = os.Open(procfs.Path(rd, "pagemap")); err != nil {
		pc.close()
		return nil, fmt.Errorf("live %d: %w", pid, err)
	}
	// The areas are read and registered while the process is stopped:
	// registering a range read from a running process's maps, which it
	// may have grown since, would split its area in two, and an mremap
	// of the whole would then fail (EFAULT) in the process.
	// The counters open while it runs (tens of milliseconds), before
	// the stop, which they must cover (vmwatch_linux.go).
	var w *vmWatch
	if watch {
		w = startVMWatch(pid)
	}
	defer func() { w.release() }() // unless the stop took it
	var apiErr error
	uffd, err := openTargetUffd(tr, pid, attach, func(uffd *os.File) error {
		api := uffdioAPIArg{API: uffdAPI, Features: uffdFeatureWPAsync | uffdFeatureWPUnpopulated}
		if err := uffdIoctl(uffd, uffdioAPI, &api); err != nil {
			apiErr = err
			return nil
		}
		// maps, not smaps: the layout is all it needs, and smaps
		// walks the page tables (20 ms a GiB, with the process
		// stopped).
		maps, err := procfs.MapsLayout(rd)
		if err != nil {
			return err
		}
		for _, m := range maps {
			if !trackable(&m) {
				continue
			}
			reg := uffdioRegisterArg{Start: m.Start, Len: m.End - m.Start, Mode: uffdRegisterModeWP}
			if uffdIoctl(uffd, uffdioRegister, &reg) != nil {
				continue // sent after the stop, as without -live
			}
			n := (m.End - m.Start) / pageSize
			pc.areas = append(pc.areas, &trackedArea{start: m.Start, end: m.End, sent: make([]uint64, (n+63)/64), ok: true, stack: m.Path == "[stack]"})
		}
		pc.watch, w = w.stopped(pid), nil
		return nil
	})
	pc.uffd = uffd
	if err != nil {
		pc.close()
		return nil, fmt.Errorf("live %d: userfaultfd: %w", pid, err)
	}
	if apiErr != nil {
		pc.close()
		return nil, fmt.Errorf("live %d: userfaultfd asynchronous write-protect: %w", pid, apiErr)
	}
	return pc, nil
}

// trackable: a private anonymous area, the kind pre-copy follows.
func trackable(m *procfs.Mapping) bool {
	if m.Shared() || m.Inode != 0 || !m.Readable() {
		return false
	}
	return m.Path == "" || m.Path == "[heap]" || m.Path == "[stack]" || strings.HasPrefix(m.Path, "[anon:")
}

// openTargetUffd makes pid create a userfaultfd of its own mm and hands
// it to us, and calls stopped with it: pid is stopped for the injected
// calls and stopped only.
func openTargetUffd(tr *ptrace.Tracer, pid int, attach func() (*Frozen, error), stopped func(*os.File) error) (*os.File, error) {
	f, err := attach()
	if err != nil {
		return nil, err
	}
	var mine int
	err = tr.Do(func() error {
		// The first stopped thread makes the call: the main thread
		// unless it has exited (f.rd).
		maps, err := procfs.MapsLayout(f.rd)
		if err != nil {
			return err
		}
		site, err := vdsoSyscallSite(f.mem, maps)
		if err != nil {
			return err
		}
		in, err := ptrace.NewSeizedInjector(f.threads[0].tid, uintptr(site))
		if err != nil {
			return err
		}
		f.threads[0].in = in
		if in.Check, err = seccompCheck(pid, in.Tid); err != nil {
			return err
		}
		if xs, err := ptrace.GetXState(in.Tid); err == nil {
			g, gl := f.gadget(maps)
			guardCalls(in, g, gl, pid, in.Tid, in.Saved().Rsp, maps, xs, 0)
		}
		in.Chain = true // settled by Resume (putBack)
		fd, err := in.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|uffdUserModeOnly)
		if err != nil {
			return err
		}
		// pidfd_getfd takes the fd from the pidfd's task: a zombie main
		// thread has no fd table any more, so then the thread's own
		// pidfd (PIDFD_THREAD, Linux 6.9).
		pidfd, err := unix.PidfdOpen(pid, 0)
		if f.rd != pid {
			pidfd, err = unix.PidfdOpen(f.rd, unix.PIDFD_THREAD)
		}
		if err == nil {
			mine, err = unix.PidfdGetfd(pidfd, int(fd), 0)
			unix.Close(pidfd)
		}
		if _, cerr := in.Syscall(unix.SYS_CLOSE, fd); cerr != nil && err == nil {
			err = cerr
		}
		return err
	})
	var uffd *os.File
	if err == nil {
		uffd = os.NewFile(uintptr(mine), "userfaultfd")
		err = stopped(uffd)
	} else if mine > 0 {
		unix.Close(mine)
	}
	if rerr := f.Resume(); rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		if uffd != nil {
			uffd.Close() // unregisters what was registered
		}
		return nil, err
	}
	return uffd, nil
}

// vdsoSyscallSite finds a syscall instruction in the vdso.
func vdsoSyscallSite(mem *ptrace.Mem, maps []procfs.Mapping) (uint64, error) {
	for _, m := range maps {
		if m.Path != "[vdso]" {
			continue
		}
		b := make([]byte, m.End-m.Start)
		if err := mem.Read(m.Start, b); err != nil {
			return 0, fmt.Errorf("vdso: %w", err)
		}
		for i := 0; i+1 < len(b); i++ {
			if b[i] == 0x0f && b[i+1] == 0x05 {
				return m.Start + uint64(i), nil
			}
		}
	}
	return 0, errors.New("no syscall instruction in the vdso")
}

func (pc *precopy) close() {
	pc.watch.release()
	pc.watch = nil
	if pc.uffd != nil {
		pc.uffd.Close() // unregisters every area
		pc.uffd = nil
	}
	if pc.pagemap != nil {
		pc.pagemap.Close()
		pc.pagemap = nil
	}
	pc.mem.Close()
}

// area returns the tracked area holding addr.
func (pc *precopy) area(addr uint64) *trackedArea {
	i := sort.Search(len(pc.areas), func(i int) bool { return pc.areas[i].end > addr })
	if i < len(pc.areas) && pc.areas[i].start <= addr {
		return pc.areas[i]
	}
	return nil
}

// scan returns the pages of a written since the last scan, protecting
// them again when protect is set. An area no longer registered as it was
// is marked not ok.
func (pc *precopy) scan(a *trackedArea, protect bool) ([][2]uint64, error) {
	flags := uint64(pmScanCheckWPAsync)
	if protect {
		flags |= pmScanWPMatching
	}
	return pc.scanFor(a, flags, pageIsWritten, 0, pageIsWritten, 0)
}

// stopScan walks a once with the process stopped: the pages written
// since the last round (which the final round sends) and those that hold
// contents (present, the shared zero page excepted, or swapped out: any
// other page the receiver holds is dropped there), from one PAGEMAP_SCAN
// returning each page's categories. Three walks did it before (still
// registered?, the written pages, the held ones): 4-5 ms each for a GiB
// of present pages. An area no longer registered as it was is marked
// not ok.
func (pc *precopy) stopScan(a *trackedArea) (written, held [][2]uint64, err error) {
	err = pc.walk(a, pmScanCheckWPAsync, 0, pageIsWritten|pageIsPresent|pageIsSwapped,
		pageIsWritten|pageIsPresent|pageIsSwapped|pageIsPfnZero, func(r pageRegion) {
			if r.Categories&pageIsWritten != 0 {
				written = appendRun(written, r.Start, r.End)
			}
			if r.Categories&(pageIsPresent|pageIsSwapped) != 0 && r.Categories&pageIsPfnZero == 0 {
				held = appendRun(held, r.Start, r.End)
			}
		})
	if err != nil || !a.ok {
		return nil, nil, err
	}
	return written, held, nil
}

// appendRun appends [start, end) to runs, joined to the last run when it
// follows it: the scan splits a run where other categories change.
func appendRun(runs [][2]uint64, start, end uint64) [][2]uint64 {
	if n := len(runs); n > 0 && runs[n-1][1] == start {
		runs[n-1][1] = end
		return runs
	}
	return append(runs, [2]uint64{start, end})
}

// scanFor runs PAGEMAP_SCAN over a, leaving out regions with a category
// of skip.
func (pc *precopy) scanFor(a *trackedArea, flags, mask, anyof, ret, skip uint64) ([][2]uint64, error) {
	var out [][2]uint64
	err := pc.walk(a, flags, mask, anyof, ret, func(r pageRegion) {
		if r.Categories&skip == 0 {
			out = append(out, [2]uint64{r.Start, r.End})
		}
	})
	if err != nil || !a.ok {
		return nil, err
	}
	return out, nil
}

// walk runs PAGEMAP_SCAN over a and gives each region found to fn. An
// area no longer registered as it was is marked not ok (fn may have been
// given regions of it by then).
func (pc *precopy) walk(a *trackedArea, flags, mask, anyof, ret uint64, fn func(pageRegion)) error {
	for start := a.start; start < a.end; {
		regs, walkEnd, err := pagemapScan(pc.pagemap, start, a.end, flags, mask, anyof, ret, pc.vec)
		if err != nil {
			// Unmapped or remapped, or (ESRCH) the process is gone, a
			// tree member that exited: no longer ours to follow.
			if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
				a.ok = false
				return nil
			}
			return fmt.Errorf("pagemap scan %#x-%#x: %w", start, a.end, err)
		}
		for _, r := range regs {
			fn(r)
		}
		if walkEnd <= start {
			return fmt.Errorf("pagemap scan %#x-%#x made no progress", start, a.end)
		}
		start = walkEnd
	}
	return nil
}

// sender writes pre-copy pages to enc, marking them sent (in pc, the
// process they are read from) and keeping the bandwidth cap.
type sender struct {
	pc    *precopy
	enc   *image.Encoder
	bw    int64 // bytes per second, 0: no cap
	t0    time.Time
	bytes uint64
	werr  error // the sink's failure, if any
}

func (s *sender) write(addr uint64, data []byte) error {
	if err := s.pc.enc(s.enc, addr, data); err != nil {
		s.werr = err
		return err
	}
	s.bytes += uint64(len(data))
	if bw := s.bw; bw > 0 {
		due := time.Duration(float64(s.bytes) / float64(bw) * float64(time.Second))
		if wait := due - time.Since(s.t0); wait > 0 {
			time.Sleep(wait)
		}
	}
	return nil
}

func (pc *precopy) enc(enc *image.Encoder, addr uint64, data []byte) error {
	if a := pc.area(addr); a != nil {
		a.mark(addr, uint64(len(data)))
	}
	return enc.WritePrecopy(addr, data)
}

// run sends the rounds while the process runs, and returns when it
// should be stopped for the final one.
func (pc *precopy) run(enc *image.Encoder) error {
	return runRounds(enc, pc.pid, pc.o, pc.stats, []*precopy{pc}, false)
}

// runRounds sends the rounds of every process of pcs while they run,
// and returns when they should be stopped for the final one; pid names
// them in notices. In a tree each process's records follow a
// PrecopyMember record naming it; the bounds (rounds, downtime,
// bandwidth) hold for all of them together.
func runRounds(enc *image.Encoder, pid int, o LiveOptions, stats *LiveStats, pcs []*precopy, tree bool) error {
	member := func(pc *precopy) error {
		if !tree {
			return nil
		}
		return enc.Write(&image.PrecopyMember{Pid: pc.saved})
	}
	// The areas' flags (vmwatch_linux.go), read before the full copy:
	// read after it, the 20 ms of smaps a GiB lengthened round 1 (more
	// pages written in it, at times one round more).
	for _, pc := range pcs {
		if pc.watch != nil {
			pc.watch.readFlags(pc.rd)
		}
	}
	s := &sender{enc: enc, bw: o.Bandwidth, t0: time.Now()}
	for _, pc := range pcs {
		if err := member(pc); err != nil {
			return err
		}
		s.pc = pc
		if err := pc.first(s, !tree); err != nil {
			return err
		}
	}
	if err := enc.Write(&image.Round{N: 0, Bytes: s.bytes}); err != nil {
		return err
	}
	stats.Rounds, stats.PrecopyBytes = 1, s.bytes
	if o.Round != nil {
		o.Round(0, s.bytes)
	}
	rate := float64(s.bytes) / max(time.Since(s.t0).Seconds(), 1e-6) // bytes/s the link took
	prev := uint64(s.bytes)
	for round := 1; round <= o.MaxRounds; round++ {
		s := &sender{enc: enc, bw: o.Bandwidth, t0: time.Now()}
		for _, pc := range pcs {
			if !pc.tracking() {
				continue
			}
			if err := member(pc); err != nil {
				return err
			}
			s.pc = pc
			if err := pc.round(s); err != nil {
				return err
			}
		}
		dirty := s.bytes
		if err := enc.Write(&image.Round{N: round, Bytes: dirty}); err != nil {
			return err
		}
		stats.Rounds++
		stats.PrecopyBytes += dirty
		if o.Round != nil {
			o.Round(round, dirty)
		}
		if took := time.Since(s.t0).Seconds(); dirty > 1<<20 && took > 0 {
			rate = float64(dirty) / took
		}
		// Small enough: what the next round would send fits the downtime.
		if float64(dirty) <= rate*o.Downtime.Seconds() {
			return nil
		}
		if dirty >= prev && round >= 2 {
			stats.Fallback = true
			what := "process writes"
			if tree {
				what = "process tree writes"
			}
			if o.Notice != nil {
				o.Notice(fmt.Sprintf("live %d: the %s %d MiB a round, faster than the link carries it (%.0f MiB/s): stopping it for the rest (stop-and-copy)",
					pid, what, dirty>>20, rate/(1<<20)))
			}
			return nil
		}
		prev = dirty
	}
	return nil
}

// tracking reports whether an area of pc is still followed.
func (pc *precopy) tracking() bool {
	for _, a := range pc.areas {
		if a.ok {
			return true
		}
	}
	return false
}

// first sends round 0 of pc through s: it protects everything, then
// sends every page there is; announce: the areas are announced first
// (PrecopyArea, a single process's).
func (pc *precopy) first(s *sender, announce bool) error {
	for _, a := range pc.areas {
		if _, err := pc.scan(a, true); err != nil {
			return err
		}
	}
	var vmas []image.VMA
	for _, a := range pc.areas {
		if a.ok {
			vmas = append(vmas, image.VMA{Start: a.start, End: a.end, Kind: image.VMAAnon})
			// The receiver maps it now and writes the pages into the
			// process it builds as they come (finish drops all of an
			// area that changes).
			if announce && !a.stack {
				if err := s.enc.Write(&image.PrecopyArea{Start: a.start, End: a.end}); err != nil {
					return err
				}
			}
		}
	}
	err := copyMemory(pc.mem, s.write, func(r *reader) error {
		// An area unmapped or shrunk while it is read fails its pagemap
		// or memory read: like a later round's, given up (sent after the
		// stop), unless the sink failed.
		var parent *os.File
		if pc.parent != nil {
			parent = pc.parent.pagemap
		}
		if err := r.readAreas(pc.pagemap, parent, vmas, pc.deferPage); err != nil && s.werr == nil {
			return readErr{err}
		} else if err != nil {
			return err
		}
		return nil
	})
	if err != nil {
		return pc.giveUp(err)
	}
	return nil
}

// deferPage counts a page round 0 left out as its parent's.
func (pc *precopy) deferPage(addr uint64) {
	if a := pc.area(addr); a != nil {
		a.deferred++
		pc.stats.SharedBytes += pageSize
	}
}

// sendDeferred sends, at the stop, the pages of the areas kept that
// round 0 left out as the parent's (trackedArea.deferred) and that are
// neither sent since nor the parent's now (vmas: the areas as frozen,
// image.VMA.InParent marked): the parent wrote them during the rounds.
func (pc *precopy) sendDeferred(s *sender, kept []*trackedArea, vmas []image.VMA) error {
	var areas []*trackedArea
	for _, a := range kept {
		if a.deferred > 0 {
			areas = append(areas, a)
		}
	}
	if len(areas) == 0 {
		return nil
	}
	return copyMemory(pc.mem, s.write, func(r *reader) error {
		entries := make([]uint64, pagemapStep)
		for _, a := range areas {
			v := &image.VMA{Start: a.start, End: a.end, Kind: image.VMAAnon}
			for i := range vmas {
				if vmas[i].Start == a.start && vmas[i].End == a.end {
					v = &vmas[i]
				}
			}
			for base := a.start; base < a.end; base += pagemapStep * pageSize {
				n := int(min((a.end-base)/pageSize, pagemapStep))
				e := entries[:n]
				if err := readPagemap(pc.pagemap, base, e); err != nil {
					return err
				}
				want := func(j int) bool {
					addr := base + uint64(j)*pageSize
					_, shared := inParentAt(v, addr)
					return wantPage(v, e[j]) && !a.isSent((addr-a.start)/pageSize) && !shared
				}
				cow := func(j int) bool { return e[j]&pmExclusive == 0 }
				if err := r.addRuns(base, n, true, want, cow); err != nil {
					return err
				}
			}
		}
		return r.flush()
	})
}

// announce writes a PrecopyArea record for each area of pc followed,
// but a stack (a receiver maps it flat), as first does for a single
// process: a tree's, before its rounds.
func (pc *precopy) announce(enc *image.Encoder) error {
	for _, a := range pc.areas {
		if a.ok && !a.stack {
			if err := enc.Write(&image.PrecopyArea{Start: a.start, End: a.end}); err != nil {
				return err
			}
		}
	}
	return nil
}

// giveUp stops tracking every area after a failed round: they are all
// sent in full after the stop. A failure of the sink is returned.
func (pc *precopy) giveUp(err error) error {
	if !isReadErr(err) {
		return err
	}
	for _, a := range pc.areas {
		a.ok = false
	}
	pc.notice(fmt.Sprintf("live %d: pre-copy stopped (%v): the rest is sent after the stop", pc.pid, err))
	return nil
}

// readErr marks a failure to read the process's memory (an area unmapped
// while it was read), as opposed to the sink's.
type readErr struct{ err error }

func (e readErr) Error() string { return e.err.Error() }
func (e readErr) Unwrap() error { return e.err }

func isReadErr(err error) bool {
	var r readErr
	return errors.As(err, &r)
}

// round sends through s the pages of pc written since the last scan.
func (pc *precopy) round(s *sender) error {
	err := copyMemory(pc.mem, s.write, func(r *reader) error {
		for _, a := range pc.areas {
			if !a.ok {
				continue
			}
			runs, err := pc.scan(a, true)
			if err != nil {
				return err
			}
			for _, run := range runs {
				if err := r.add(run[0], int(run[1]-run[0]), false); err != nil {
					return readErr{err}
				}
			}
		}
		return nil
	})
	if err != nil {
		return pc.giveUp(err)
	}
	return nil
}

func (pc *precopy) notice(s string) {
	if pc.o.Notice != nil {
		pc.o.Notice(s)
	}
}

// finish runs with the process stopped, before its process record: it
// sends the pages written since the last round of every area still
// tracked and unchanged in vmas (the areas as frozen), drops on the
// receiver what it must not keep, and returns the areas whose pages are
// all sent (the snapshot's pages records leave them out).
func (pc *precopy) finish(enc *image.Encoder, vmas []image.VMA) (map[uint64]bool, error) {
	pc.stats.StoppedAt = time.Now()
	done, n, err := pc.last(enc, vmas)
	if err != nil {
		return nil, err
	}
	pc.stats.FinalBytes = n
	if err := enc.Write(&image.Round{N: pc.stats.Rounds, Bytes: n, Final: true, At: pc.stats.StoppedAt.UnixNano()}); err != nil {
		return nil, err
	}
	return done, nil
}

// last is finish but for the round record: it returns the areas whose
// pages are all sent and the bytes of pages it sent.
func (pc *precopy) last(enc *image.Encoder, vmas []image.VMA) (map[uint64]bool, uint64, error) {
	same := map[[2]uint64]bool{}
	for _, v := range vmas {
		if v.Kind == image.VMAAnon && !v.Shared {
			same[[2]uint64{v.Start, v.End}] = true
		}
	}
	done := map[uint64]bool{}
	s := &sender{pc: pc, enc: enc, t0: time.Now()} // stopped: no cap
	type keptArea struct {
		*trackedArea
		written, held [][2]uint64
	}
	var kept []keptArea
	for _, a := range pc.areas {
		if a.ok && !same[[2]uint64{a.start, a.end}] {
			a.ok = false
		}
		k := keptArea{trackedArea: a}
		if a.ok {
			var err error
			if k.written, k.held, err = pc.stopScan(a); err != nil {
				return nil, 0, err
			}
		}
		if !a.ok {
			pc.stats.Untracked++
			if err := enc.Write(&image.Drop{Addr: a.start, Len: a.end - a.start}); err != nil {
				return nil, 0, err
			}
			continue
		}
		kept = append(kept, k)
	}
	err := copyMemory(pc.mem, s.write, func(r *reader) error {
		for _, a := range kept {
			for _, run := range a.written {
				if err := r.add(run[0], int(run[1]-run[0]), false); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	// After the written pages are marked sent (by s.write). (The held
	// pages scanned before include those it sends: present, the
	// process stopped.)
	areas := make([]*trackedArea, len(kept))
	for i := range kept {
		areas[i] = kept[i].trackedArea
	}
	if err := pc.sendDeferred(s, areas, vmas); err != nil {
		return nil, 0, err
	}
	// Pages the receiver holds that the process no longer has: freed
	// (madvise) since they were sent, or the shared zero page since.
	for _, a := range kept {
		has := make([]uint64, len(a.sent))
		for _, h := range a.held {
			for p := (h[0] - a.start) / pageSize; p < (h[1]-a.start)/pageSize; p++ {
				has[p/64] |= 1 << (p % 64)
			}
		}
		n := (a.end - a.start) / pageSize
		gone := func(p uint64) bool { return a.isSent(p) && has[p/64]&(1<<(p%64)) == 0 }
		for p := uint64(0); p < n; {
			if !gone(p) {
				p++
				continue
			}
			q := p + 1
			for q < n && gone(q) {
				q++
			}
			if err := enc.Write(&image.Drop{Addr: a.start + p*pageSize, Len: (q - p) * pageSize}); err != nil {
				return nil, 0, err
			}
			p = q
		}
		done[a.start] = true
	}
	return done, s.bytes, nil
}
