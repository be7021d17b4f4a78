// Package loader builds a running process from a snapshot (the seed's
// pload). It starts a tiny generated stub under ptrace, gives it the
// snapshot's PID with clone3(set_tid), and then reshapes it by injected
// system calls: kernel areas moved to their saved addresses, every memory
// area mapped and filled, files reopened onto their numbers, signal state,
// mm fields, credentials; last the registers. The process runs only once
// the whole snapshot has been read and its checksum verified; until then
// it is stopped, and any failure kills it, so a failed restore leaves
// nothing behind. A tree snapshot (pfreeze -tree) is built the same way,
// member by member, after every member's stub has been forked from its
// parent's (tree_linux.go); the root's Process owns the others. With
// Options.PIDNamespace the process or tree is built in a new PID namespace
// under a stub kept as its init (pidns_linux.go for trees); with
// Options.VirtPID, in this one with the pid calls virtualised
// (virtpid_linux.go, virtpid_tree_linux.go for trees).
package loader

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

const pageSize = 4096

// Options control a restore.
type Options struct {
	// NewPID restores with a fresh PID even when the saved one is free.
	NewPID bool
	// PIDNamespace restores into a new PID namespace, where the process
	// (every member of a tree) gets its saved PID whatever this host's
	// PIDs are; the stub stays behind as the namespace's init (pid 1),
	// unless the process was pid 1 itself. Not with NewPID or VirtPID.
	PIDNamespace bool
	// VirtPID: when the saved PID is taken, restore with a new one and
	// virtualise getpid, gettid and signals to itself with a seccomp
	// filter answered by Supervise; for a tree, every pid call between
	// members, with the caller of Wait as the members' tracer
	// (virtpid_tree_linux.go).
	VirtPID bool
	// Detach says the restorer will not stay the process's parent: the
	// parent-death signal, which would fire as soon as it exits, is not set.
	Detach bool
	// Stdio, where set, are the files the process's inherited descriptors
	// 0, 1 and 2 become (those it had from its parent: a terminal, a log
	// pipe); nil entries mean the restorer's own. An agent points them at
	// the workload's log files; a test, at a pipe it reads.
	Stdio [3]*os.File
	// StdioFiles makes Stdio replace fds 0-2 also when the snapshot has
	// them as files to reopen by path: a cluster agent's workloads write
	// to log files under the agent's data directory, and after a move the
	// target's own log files take the place of the source's.
	StdioFiles bool
	// InheritFDs gives the process, for a saved fd (its number) that
	// was a pipe leading outside (image.FDPipeOut), a new open of this
	// file of ours (a pipe or FIFO) instead of a pipe whose far end is
	// closed (pthaw -inherit-fd N=FD).
	InheritFDs map[int]*os.File
	// Notice receives one-line messages for the user (the PID was
	// taken...), when the process starts: a restore that fails says only
	// why.
	Notice func(string)
}

// Process is a restored process, fully built and stopped until Start.
type Process struct {
	tr   *ptrace.Tracer
	opts Options
	pid  int // the restored process
	stub int // the first stub, while it lives

	proc    *image.Process
	threads []*image.Thread // main thread first
	vmas    []*image.VMA
	fds     []*image.FD
	mem     *ptrace.Mem
	in      *ptrace.Injector
	base    uint64 // stub load address
	// retryPID: the saved PID was taken when the build began; try again
	// before starting.
	retryPID bool
	tids     []int // threads made by cloneThread, for Abort
	init     int   // -pidns: the stub, kept as the namespace's init
	// listener is the seccomp listener of -virtpid; virtTids maps our
	// thread ids to the saved ones.
	listener *os.File
	virtTids map[int]int
	// listeners are the re-created listening sockets, bound in finish.
	listeners []*image.FD
	// socks are the re-created TCP connections and UDP sockets, given
	// their addresses in finish (tcp_linux.go).
	socks []*image.FD
	// unixEnds holds, by the saved socket's inode, the second end of a
	// unix socket pair made for an earlier fd, until its own fd is
	// placed (unix_linux.go).
	unixEnds map[uint64]uintptr
	// pipes holds pthaw's ends of a single process's own pipes while its
	// fds are opened (a tree's are in tree.pipes).
	pipes map[uint64][2]int
	// pipesTaken: the pipe ends (pipe id, O_RDONLY or O_WRONLY) whose
	// pthaw file the process took by pidfd_getfd (takePipeEnd).
	pipesTaken map[[2]uint64]bool
	// ptys holds pthaw's masters of a single process's ptys, by saved
	// index, likewise (a tree's are in tree.ptys).
	ptys map[int]*heldPty
	// unixListeners are the re-created listening unix sockets, bound in
	// finish.
	unixListeners []*image.FD
	// unixConnects are the unix sockets connected again to a peer
	// outside when the process starts (pfreeze -unix-reconnect).
	unixConnects []*image.FD
	vdso         uint64   // syscall site in the moved vdso
	uffd         *os.File // fills private anonymous memory while building
	// staged: the pages of a live migration sent before the stop; kept:
	// the areas (by start) mapped as they came, left in place.
	staged *staging
	kept   map[uint64]bool
	// precopyStats: what the pre-copy records said (Precopy).
	precopyStats PrecopyStats
	// cow: a tree member forked from its parent only once the parent's
	// memory is built, to share its pages, or under such a member
	// (forkLate, image.LateMembers).
	cow bool
	// early: a tree member made while the pre-copy rounds came, its
	// announced areas mapped and filled (early_linux.go).
	early bool
	built bool
	done  bool
	tasks []*task // the threads finish made ready, detached to start
	// notes holds the notices for the user until Start passes them to
	// notify, the caller's Options.Notice.
	notes  *[]string
	notify func(string)

	// In a tree (pfreeze -tree): what all members share, and the parent.
	tree   *tree
	parent *Process
	zombie bool // a member that only exited, left for its parent to reap

	// objects are the files without a path (memfds, deleted files) the
	// snapshot brings, by File ID (objects_linux.go).
	objects map[uint64]*object
	// createdShm are the System V segments made for this restore, removed
	// if it fails.
	createdShm []int
	// ctr, on a tree's root, is the container restored (container_linux.go).
	ctr *container
}

// Pid returns the restored process's PID (in our namespace).
func (p *Process) Pid() int { return p.pid }

// WaitPid returns our child whose exit status is the restored process's:
// the process itself, or in -pidns mode the namespace's init, which exits
// with its status.
func (p *Process) WaitPid() int {
	if p.init > 0 {
		return p.init
	}
	return p.pid
}

// localPid returns the id the process knows thread tid by (tid is ours):
// in a PID namespace of its own, the saved one.
func (p *Process) localPid(tid int, saved int) int {
	if p.opts.PIDNamespace {
		return saved
	}
	return tid
}

// SavedPid returns the PID the process had when it was frozen.
func (p *Process) SavedPid() int { return p.proc.Pid }

// Build reads a snapshot from dec and builds the process. On success the
// whole snapshot has been read and verified, and the process waits,
// stopped, for Start or Abort. On failure nothing is left behind.
//
// Cancelling ctx gives up at the next record read (or at the end): the
// half-built process is killed and reaped, and the error wraps ctx's
// cause. A read blocked on the input ends only with the input: close it
// too to give up at once (ReceiveFrom does).
func Build(ctx context.Context, tr *ptrace.Tracer, dec *image.Decoder, opts Options) (*Process, error) {
	if opts.PIDNamespace && (opts.NewPID || opts.VirtPID) {
		return nil, errors.New("thaw: a new PID namespace keeps the saved PIDs: it cannot be combined with new or virtual PIDs")
	}
	// Notices wait for Start; tree members share the root's options.
	notes := &[]string{}
	p := &Process{tr: tr, opts: opts, notes: notes, notify: opts.Notice}
	p.opts.Notice = func(s string) { *notes = append(*notes, s) }
	if err := p.build(ctx, dec); err != nil {
		p.Abort()
		return nil, fmt.Errorf("thaw: %w", err)
	}
	if ctx.Err() != nil {
		p.Abort()
		return nil, fmt.Errorf("thaw: %w: nothing restored", context.Cause(ctx))
	}
	return p, nil
}

func (p *Process) notice(format string, args ...any) {
	if p.opts.Notice != nil {
		p.opts.Notice(fmt.Sprintf(format, args...))
	}
}

func (p *Process) build(ctx context.Context, dec *image.Decoder) (err error) {
	first, err := dec.Next()
	if err != nil {
		return err
	}
	// Pages sent while the original still ran (pfreeze -live).
	if p.staged, first, err = p.stagePrecopy(dec, first); err != nil {
		return err
	}
	// A reader goroutine decodes ahead (memory contents into a few
	// buffers) while this one builds the process: reading, decrypting and
	// decompressing overlap with writing the process's memory.
	items := make(chan item, readAheadBufs)
	stop := make(chan struct{})
	defer func() {
		close(stop)
		if err != nil {
			p.Abort() // before waiting for a reader that may be stuck on input
		}
		for range items {
		}
	}()
	// The builder checksums the page data it fills; the decoder stops
	// waiting for those sums when the builder stops.
	dec.GiveUpSums(stop)
	go readAhead(ctx, dec, first, items, stop)
	if t, ok := first.(*image.Tree); ok {
		if p.staged != nil && p.staged.members == nil {
			return fmt.Errorf("%w: a single process's pre-copy records before a tree", image.ErrCorrupt)
		}
		<-items // the tree record itself
		// A container's namespaces come next.
		it, err := next(items)
		if err != nil {
			return err
		}
		rec := it.rec
		if ns, ok := rec.(*image.Namespaces); ok {
			if p.ctr, err = p.newContainer(ns); err != nil {
				return err
			}
			rec = nil
		}
		return p.buildTree(t, items, rec)
	}
	if p.staged != nil && p.staged.members != nil {
		return fmt.Errorf("%w: pre-copy member records before a single process", image.ErrCorrupt)
	}
	prepare := p.startStub
	if p.staged != nil {
		prepare = p.prepareLive
	}
	last, err := p.buildOne(items, nil, prepare)
	if err != nil {
		return err
	}
	if _, ok := last.(*image.End); !ok {
		return fmt.Errorf("%w: unexpected %T record", image.ErrCorrupt, last)
	}
	p.built = true
	return nil
}

// next returns the next decoded item.
func next(items <-chan item) (item, error) {
	it, ok := <-items
	if !ok {
		return item{}, fmt.Errorf("%w: no end record", image.ErrCorrupt)
	}
	return it, it.err
}

// buildOne builds one process from its records: rec (its process record,
// when already read) and those that follow on items. prepare makes its
// stub once the metadata is known. It returns the record after the
// process's own: the end record, or in a tree the next member's process
// record.
func (p *Process) buildOne(items <-chan item, rec any, prepare func() error) (any, error) {
	var it item
	// Metadata first: process, thread, memory areas.
meta:
	for {
		if rec == nil {
			var err error
			if it, err = next(items); err != nil {
				return nil, err
			}
			rec = it.rec
		}
		switch r := rec.(type) {
		case *image.Process:
			if p.proc != nil {
				break meta // the next member's
			}
			p.proc = r
			rec = nil
			continue
		case *image.Thread:
			if p.proc == nil || len(p.vmas) > 0 || len(p.threads) >= p.proc.Threads || p.proc.Threads > maxThreads {
				return nil, fmt.Errorf("%w: unexpected thread record", image.ErrCorrupt)
			}
			if !image.ThreadInPlace(p.proc, len(p.threads), r.Tid) {
				return nil, fmt.Errorf("%w: thread %d out of place", image.ErrCorrupt, r.Tid)
			}
			if len(r.Regs) != ptrace.NumRegs {
				return nil, fmt.Errorf("%w: thread %d has %d registers", image.ErrCorrupt, r.Tid, len(r.Regs))
			}
			p.threads = append(p.threads, r)
			rec = nil
			continue
		case *image.VMA:
			if p.proc == nil || len(p.threads) != p.proc.Threads {
				return nil, fmt.Errorf("%w: memory area before the thread records", image.ErrCorrupt)
			}
			if err := checkVMA(r, p.vmas); err != nil {
				return nil, err
			}
			p.vmas = append(p.vmas, r)
			rec = nil
			continue
		case *image.File:
			if p.proc == nil || len(p.threads) != p.proc.Threads {
				return nil, fmt.Errorf("%w: file record before the thread records", image.ErrCorrupt)
			}
			if err := p.addFile(r); err != nil {
				return nil, err
			}
			rec = nil
			continue
		}
		break
	}
	if p.proc == nil || len(p.threads) == 0 || len(p.threads) != p.proc.Threads {
		return nil, fmt.Errorf("%w: missing process or thread records", image.ErrCorrupt)
	}
	if err := checkProcess(p.proc, p.threads); err != nil {
		return nil, err
	}
	if err := checkCreds(p.proc); err != nil {
		return nil, err
	}
	if err := checkThreadCreds(p.proc, p.threads); err != nil {
		return nil, err
	}
	if err := p.checkFiles(); err != nil {
		return nil, err
	}
	if err := p.sealFiles(); err != nil {
		return nil, err
	}
	if err := prepare(); err != nil {
		return nil, err
	}
	if err := p.mapMemory(); err != nil {
		return nil, err
	}
	if p.staged != nil {
		p.dropInParent(p.staged)
		err := p.applyStaged(p.staged)
		p.staged = nil
		if err != nil {
			return nil, err
		}
	}
	// Memory contents, then files, then the end record (or the next
	// member of a tree).
	for {
		switch r := rec.(type) {
		case *image.Pages:
			err := p.fill(r.Addr, it.data, it.sum)
			it.free <- it.data[:cap(it.data)]
			if err != nil {
				return nil, err
			}
		case *image.FD:
			if err := checkFD(r, p.fds); err != nil {
				return nil, err
			}
			p.fds = append(p.fds, r)
		case *image.End, *image.Process:
			if err := p.finishMemory(); err != nil {
				return nil, err
			}
			if err := p.openFiles(); err != nil {
				return nil, err
			}
			// Every area and fd holds its own reference by now.
			p.closeObjects()
			return rec, nil
		default:
			return nil, fmt.Errorf("%w: unexpected %T record", image.ErrCorrupt, rec)
		}
		var err error
		if it, err = next(items); err != nil {
			return nil, err
		}
		rec = it.rec
	}
}

const (
	readAheadBufs = 4
	readAheadSize = 4 << 20
)

// item is one decoded record; for *image.Pages, data holds (part of) its
// contents at the record's Addr, in a buffer to give back on free, and
// sum, when not nil, waits for their CRC-32C (the filler computes it:
// image.Decoder.ReadDataDeferred).
type item struct {
	rec  any
	data []byte
	sum  *image.DeferredSum
	free chan []byte
	err  error
}

// readAhead decodes records from dec, the first being first, and sends
// them on items until the end record, an error, or stop. It owns dec.
// Once ctx is done it sends, instead of the next record, an error that
// wraps ctx's cause, so that the builder gives up.
func readAhead(ctx context.Context, dec *image.Decoder, first any, items chan<- item, stop <-chan struct{}) {
	defer close(items)
	free := make(chan []byte, readAheadBufs)
	for i := 0; i < readAheadBufs; i++ {
		free <- make([]byte, readAheadSize)
	}
	send := func(it item) bool {
		if ctx.Err() == nil {
			select {
			case items <- it:
				return true
			case <-stop:
				return false
			case <-ctx.Done():
			}
		}
		select {
		case items <- item{err: fmt.Errorf("%w before the process was built: nothing restored", context.Cause(ctx))}:
		case <-stop:
		}
		return false
	}
	rec := first
	for {
		if pg, ok := rec.(*image.Pages); ok {
			for addr, left := pg.Addr, pg.Len; left > 0; {
				var buf []byte
				select {
				case buf = <-free:
				case <-stop:
					return
				}
				n := min(uint64(len(buf)), left)
				sum, err := readPages(dec, buf[:n])
				if err != nil {
					send(item{err: err})
					return
				}
				if !send(item{rec: &image.Pages{Addr: addr, Len: n}, data: buf[:n], sum: sum, free: free}) {
					return
				}
				addr += n
				left -= n
			}
		} else if !send(item{rec: rec}) {
			return
		}
		if _, ok := rec.(*image.End); ok {
			return
		}
		var err error
		if rec, err = dec.Next(); err != nil {
			send(item{err: err})
			return
		}
	}
}

// The snapshot's structural rules and bounds are image's (migrate/image
// check.go): the decoder applies them to every record before the loader
// sees it, so that a restore and pthaw -debug reach one verdict. These
// names keep the loader's own checks of the same things on the same rules.
const (
	maxThreads = image.MaxThreads
	maxPending = image.MaxPending
)

func checkProcess(pr *image.Process, threads []*image.Thread) error {
	return image.CheckProcess(pr, threads)
}

func checkVMA(v *image.VMA, prev []*image.VMA) error { return image.CheckVMA(v, prev) }

func checkFD(f *image.FD, prev []*image.FD) error {
	if err := image.CheckFD(f); err != nil {
		return err
	}
	if len(prev) > 0 && prev[len(prev)-1].Fd >= f.Fd {
		return fmt.Errorf("%w: fds out of order at %d", image.ErrCorrupt, f.Fd)
	}
	return nil
}

func vmaName(v *image.VMA) string {
	s := fmt.Sprintf("map %#x-%#x", v.Start, v.End)
	if v.Name != "" {
		s += " (" + v.Name + ")"
	}
	return s
}

// checkFiles verifies, before anything is built, that every mapped file is
// the one that was frozen.
func (p *Process) checkFiles() error {
	for _, v := range p.vmas {
		if v.Kind != image.VMAFile {
			continue
		}
		if v.Object != 0 {
			if p.objs()[v.Object] == nil {
				return fmt.Errorf("%w: %s: file object %#x not in the snapshot", image.ErrCorrupt, vmaName(v), v.Object)
			}
			continue
		}
		// In a container, the path of the host's or of the container's
		// tmpfs, which the restore fills.
		name, saved := p.containerFile(v.Name)
		var st syscall.Stat_t
		switch {
		case saved != nil:
			st.Size, st.Mtim = int64(len(saved.Data)), syscall.NsecToTimespec(saved.Mtime)
		case name == "":
			continue
		default:
			if err := syscall.Stat(name, &st); err != nil {
				return fmt.Errorf("%s: %w", vmaName(v), err)
			}
		}
		mtime := st.Mtim.Sec*1e9 + st.Mtim.Nsec
		if st.Size != v.FileSize || mtime != v.FileMtime {
			return fmt.Errorf("%s: file changed since the freeze (size %d, was %d; mtime differs: %v)",
				vmaName(v), st.Size, v.FileSize, mtime != v.FileMtime)
		}
	}
	return nil
}

// freeRange finds size bytes not overlapping any of the areas in avoid,
// searching upward from 4 GiB.
func freeRange(size uint64, avoid [][2]uint64) uint64 {
	sort.Slice(avoid, func(i, j int) bool { return avoid[i][0] < avoid[j][0] })
	addr := uint64(1 << 32)
	for _, a := range avoid {
		if a[1]+pageSize <= addr {
			continue
		}
		if addr+size+pageSize <= a[0] {
			return addr
		}
		addr = a[1] + pageSize
	}
	return addr
}

func (p *Process) snapshotRanges() [][2]uint64 {
	var out [][2]uint64
	for _, v := range p.vmas {
		out = append(out, [2]uint64{v.Start, v.End})
	}
	// Leave room for the heap to grow back where it was.
	out = append(out, [2]uint64{p.proc.MM.StartBrk, p.proc.MM.Brk + 64<<20})
	return out
}

// startStub creates the stub process and, when possible, gives it the
// saved PID. Runs the tracer thread for every ptrace step.
func (p *Process) startStub() error {
	if err := p.launchStub(freeRange(stubSize, p.snapshotRanges())); err != nil {
		return err
	}
	return p.tr.Do(p.stubPID)
}

// launchStub starts the stub with its code at base, traced and named,
// before the saved PID is known (a live migration's receiver starts it at
// the first pre-copied page).
func (p *Process) launchStub(base uint64) error {
	p.base = base
	fd, err := unix.MemfdCreate("pcluster-stub", 0)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	memfd := os.NewFile(uintptr(fd), "pcluster-stub")
	defer memfd.Close()
	if _, err := memfd.Write(stubELF(p.base)); err != nil {
		return fmt.Errorf("write stub: %w", err)
	}
	return p.tr.Do(func() error {
		// Pdeathsig: a stub whose pthaw dies before PTRACE_O_EXITKILL is
		// set must not be left stopped forever.
		sys := &syscall.SysProcAttr{Ptrace: true, AmbientCaps: stubAmbientCaps(), Pdeathsig: syscall.SIGKILL}
		if p.opts.PIDNamespace {
			sys.Cloneflags = syscall.CLONE_NEWPID | p.ctr.cloneFlags()
		}
		files := []uintptr{0, 1, 2, memfd.Fd()}
		for i, f := range p.opts.Stdio {
			if f != nil {
				files[i] = f.Fd()
			}
		}
		nsFd := len(files)
		if p.ctr != nil && p.ctr.th != nil {
			// The container's namespaces to join: fds nsFd...
			nsFiles, err := p.ctr.stubFiles()
			if err != nil {
				return err
			}
			defer func() {
				for _, f := range nsFiles {
					f.Close()
				}
			}()
			for _, f := range nsFiles {
				files = append(files, f.Fd())
			}
		}
		pid, err := syscall.ForkExec("/proc/self/fd/3", []string{"pcluster-stub"}, &syscall.ProcAttr{
			Env:   []string{},
			Files: files,
			Sys:   sys,
		})
		if err != nil {
			if p.opts.PIDNamespace && errors.Is(err, unix.EPERM) {
				return fmt.Errorf("start stub in a new PID namespace: %w (needs CAP_SYS_ADMIN)", err)
			}
			return fmt.Errorf("start stub: %w", err)
		}
		p.stub, p.pid = pid, pid
		st, err := ptrace.Wait(pid)
		if err != nil {
			return fmt.Errorf("start stub: %w", err)
		}
		if st.Sig() != unix.SIGTRAP {
			return fmt.Errorf("start stub: %v", st)
		}
		if err := ptrace.SetOptions(pid, buildTraceOpts); err != nil {
			return fmt.Errorf("stub options: %w", err)
		}
		// Every signal blocked while the process is built (its own mask
		// comes last, with its registers): a signal would stop an injected
		// call and be lost, and the signals we queue must stay pending.
		if err := ptrace.SetSigmask(pid, blockAll); err != nil {
			return err
		}
		in, err := ptrace.NewInjector(pid, uintptr(p.base+stubCodeOff))
		if err != nil {
			return err
		}
		p.in = in
		p.mem = ptrace.NewMem(pid)
		// The kernel named it after the file it ran, "3". Its copies
		// inherit the name until each takes its saved one (finish); a
		// namespace's init and stand-ins keep it.
		name, err := p.putString("pcluster-stub")
		if err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_NAME, name); err != nil {
			return fmt.Errorf("name stub: %w", err)
		}
		if p.ctr != nil {
			return p.enterContainer(p.ctr, nsFd)
		}
		return nil
	})
}

// stubPID gives the stub the saved PID, or forks the process from it in a
// PID namespace of its own. Runs on the tracer thread.
func (p *Process) stubPID() error {
	if p.opts.PIDNamespace {
		return p.forkIntoNamespace()
	}
	if !p.opts.NewPID && p.proc.Pid != p.pid {
		return p.takePID(false)
	}
	return nil
}

// forkIntoNamespace makes the stub, init of a new PID namespace, fork a
// copy of itself with the saved PID there; the copy becomes the process.
// A process that was pid 1 is the stub itself, the new namespace's init;
// a tree takes enterTreeNS's way. Runs on the tracer thread.
func (p *Process) forkIntoNamespace() error {
	if p.tree != nil {
		return p.enterTreeNS()
	}
	want := p.proc.Pid
	if want == 1 {
		// It was its namespace's init: it is the new one's.
		p.stub = 0
		p.notice("restored as pid 1, the init of a new PID namespace (pid %d on this host)", p.pid)
		return nil
	}
	if err := p.cloneSelf(0, uint64(unix.SIGCHLD), want); err != nil {
		return fmt.Errorf("fork pid %d in a new PID namespace: %w", want, err)
	}
	p.init, p.stub = p.stub, 0
	p.notice("restored as pid %d in a new PID namespace (pid %d on this host)", want, p.pid)
	return nil
}

// takePID moves the process into its saved PID. At the start of a build
// the PID may still belong to the original, frozen until we report the
// restore built (a migration on this host); then the move is tried again
// just before the process starts, after the original has been killed,
// waiting briefly for its parent to reap it. Runs on the tracer thread.
func (p *Process) takePID(late bool) error {
	want := p.proc.Pid
	// A clone3 refused for a taken PID has copied the stub's memory
	// first (the kernel allocates the PID last): once the memory is built
	// (a live migration's, or a late retry), in proportion to its size,
	// in the stop. So it is not tried while the PID is visibly in use:
	// early, the late retry takes it; late, a holder that is going is
	// waited for (as long as before).
	var err error
	deadline := time.Now().Add(2 * time.Second)
	switch {
	case !late && pidInUse(want):
		err = unix.EEXIST
	default:
		for late && pidInUse(want) && dying(want) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		err = p.clonePID()
		for late && errors.Is(err, unix.EEXIST) && dying(want) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			err = p.clonePID()
		}
	}
	switch {
	case err == nil:
		p.retryPID = false
		return nil
	case errors.Is(err, unix.EEXIST) && !late:
		p.retryPID = true
		return nil
	case errors.Is(err, unix.EEXIST):
		p.notice("pid %d is taken on this host; restored as pid %d", want, p.pid)
	case errors.Is(err, unix.EPERM):
		p.notice("cannot restore pid %d without CAP_CHECKPOINT_RESTORE; restored as pid %d", want, p.pid)
	case errors.Is(err, errCloneSetup):
		return err
	default:
		p.notice("cannot restore pid %d (%v); restored as pid %d", want, err, p.pid)
	}
	p.retryPID = false
	return nil
}

// PIDPending reports whether the built process still waits for its saved
// PID: the original held it when the build began (a migration between
// hosts that share a PID namespace, or on one host), and Start takes it,
// once the original is gone. A caller that learns of the move some other
// way than the sender's commit (a cluster's replicated state) must still
// let the original go before Start then; otherwise (a PID namespace of
// its own, a host where the PID was free) Start needs nothing of it.
func (p *Process) PIDPending() bool { return p.retryPID }

// pidInUse reports whether a process or thread has pid here.
func pidInUse(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// dying reports whether pid is gone, exiting, a zombie, or stopped by a
// tracer (frozen by a pfreeze -halt that has yet to kill it): a PID that
// is likely to be free soon.
func dying(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return true
	}
	switch b[i+2] {
	case 'Z', 'X', 'x', 't':
		return true
	}
	return false
}

// blockAll is a signal mask of everything that can be blocked.
const blockAll = ^uint64(0) &^ (1<<(unix.SIGKILL-1) | 1<<(unix.SIGSTOP-1))

// errCloneSetup marks clonePID failures that are not about the PID.
var errCloneSetup = errors.New("clone3")

// clonePID makes the stub clone3 a process with the saved PID, as a child
// of ours (CLONE_PARENT), and continues with it; the first stub is killed.
// The child shares the stub's memory (CLONE_VM) rather than copying it:
// late in a build that memory is the process's, and a copy of its page
// tables (and the stub's exit freeing the original's) cost about 150 ms a
// GiB, in the stop of a migration on this host. Once the stub is gone,
// the child is the memory's only user, as after a fork. Runs on the
// tracer thread.
func (p *Process) clonePID() error {
	old := p.stub
	// exit_signal stays 0: with CLONE_PARENT the child inherits ours.
	if err := p.cloneSelf(unix.CLONE_PARENT|unix.CLONE_VM, 0, p.proc.Pid); err != nil {
		return err
	}
	unix.Kill(old, unix.SIGKILL)
	for {
		if _, err := ptrace.Wait(old); err != nil {
			break
		}
	}
	p.stub = 0
	return nil
}

// cloneSelf injects clone3(flags, exit_signal, set_tid={pid}) into the
// current process and continues with the child, which ptrace attached for
// us stopped. Runs on the tracer thread.
func (p *Process) cloneSelf(flags, exitSignal uint64, pid int) error {
	child, err := forkStub(p.in, p.mem, p.base, flags, exitSignal, pid)
	if err != nil {
		return err
	}
	p.pid = child
	p.mem.Close()
	p.mem = ptrace.NewMem(child)
	in, err := ptrace.NewInjector(child, uintptr(p.base+stubCodeOff))
	if err != nil {
		return fmt.Errorf("%w: %v", errCloneSetup, err)
	}
	p.in = in
	return nil
}

// forkStub makes the stopped stub behind in and mem (loaded at base)
// inject clone3(flags, exit_signal, set_tid={pid}), or without set_tid
// when pid is 0, and returns the child by its pid here (in a nested PID
// namespace pid is the child's number there). The child, traced by us
// through PTRACE_O_TRACEFORK, is waited for until it stops. A clone3
// error wraps its errno (EEXIST: pid is taken); other failures
// wrap errCloneSetup, and kill the child if there is one. Runs on the
// tracer thread.
func forkStub(in *ptrace.Injector, mem *ptrace.Mem, base, flags, exitSignal uint64, pid int) (int, error) {
	scratch := base + stubScratchOff
	// struct clone_args (88 bytes) followed by the set_tid array.
	args := make([]byte, 96)
	putLE64(args[0:], flags)
	putLE64(args[32:], exitSignal)
	if pid > 0 {
		putLE64(args[64:], scratch+88) // set_tid
		putLE64(args[72:], 1)          // set_tid_size
		putLE64(args[88:], uint64(pid))
	}
	if err := mem.Write(scratch, args); err != nil {
		return 0, fmt.Errorf("%w arguments: %v", errCloneSetup, err)
	}
	in.NewChild = 0
	if _, err := in.Syscall(unix.SYS_CLONE3, uintptr(scratch), 88); err != nil {
		return 0, fmt.Errorf("clone3: %w", err)
	}
	child := in.NewChild
	if child <= 0 {
		return 0, fmt.Errorf("%w: no fork event", errCloneSetup)
	}
	st, err := ptrace.Wait(child)
	if err == nil && !st.Status.Stopped() {
		err = errors.New(st.String())
	}
	if err != nil {
		unix.Kill(child, unix.SIGKILL)
		for {
			if _, err := ptrace.Wait(child); err != nil {
				break
			}
		}
		return 0, fmt.Errorf("%w child %d: %v", errCloneSetup, child, err)
	}
	return child, nil
}

func putLE64(b []byte, v uint64) {
	for i := 0; i < 8; i++ {
		b[i] = byte(v >> (8 * i))
	}
}

// Abort kills the process (every member of a tree) if it was not started,
// and reaps it: nothing of the restore is left, not even a zombie.
func (p *Process) Abort() {
	defer p.ctr.close()
	if p.tree != nil && p.parent == nil {
		p.abortTree()
		return
	}
	if pids := p.release(); len(pids) > 0 {
		killAndReap(p.tr, pids)
	}
}

// release closes what p holds and returns its processes to kill: its
// threads, itself, the first stub, a namespace's init; nothing once
// aborted or started.
func (p *Process) release() []int {
	if p.done {
		return nil
	}
	p.done = true
	p.closeUffd()
	p.closeObjects()
	p.removeCreatedShm()
	if p.mem != nil {
		p.mem.Close()
	}
	return append(append([]int(nil), p.tids...), p.pid, p.stub, p.init)
}

// killAndReap sends SIGKILL to each of pids (ours: children or tracees;
// those not positive are skipped) and takes every notification owed to
// us for each, as its tracer and as its parent, until each is gone:
// reaped by us or, for a process whose parent is another of pids, by that
// parent, or by us once it is orphaned to us (abortTree makes us a child
// subreaper). The waits are polled all together, so no order among them
// matters (a namespace's init ends only once everything in its namespace
// is reaped, a thread group leader's exit is reported after its other
// threads'), and bounded by ptrace.StopTimeout.
func killAndReap(tr *ptrace.Tracer, pids []int) {
	type proc struct {
		pid   int
		start uint64 // to tell it from a later process with its PID
	}
	var left []proc
	seen := map[int]bool{}
	for _, pid := range pids {
		if pid <= 0 || seen[pid] {
			continue
		}
		seen[pid] = true
		left = append(left, proc{pid, startTime(pid)})
		unix.Kill(pid, unix.SIGKILL)
	}
	tr.Do(func() error {
		deadline := time.Now().Add(ptrace.StopTimeout)
		var pause time.Duration
		for len(left) > 0 && time.Now().Before(deadline) {
			progress := false
			keep := left[:0]
			for _, q := range left {
				var ws unix.WaitStatus
				got, err := unix.Wait4(q.pid, &ws, unix.WALL|unix.WNOHANG, nil)
				switch {
				case got == q.pid:
					// One notification; another may follow (as parent
					// after as tracer, or once orphaned to us).
					progress = true
					keep = append(keep, q)
				case errors.Is(err, unix.ECHILD):
					// Not ours (any more): done once it is gone. Until
					// then it waits for its parent to reap it, or to
					// be orphaned to us.
					if st := startTime(q.pid); st == 0 || st != q.start {
						progress = true
					} else {
						keep = append(keep, q)
					}
				default:
					keep = append(keep, q)
				}
			}
			left = keep
			if progress {
				pause = 0
				continue
			}
			pause = min(max(2*pause, 50*time.Microsecond), 5*time.Millisecond)
			time.Sleep(pause)
		}
		return nil
	})
}

// readAll is io.ReadFull for the decoder's page data.
func readAll(dec *image.Decoder, b []byte) error {
	for len(b) > 0 {
		n, err := dec.ReadData(b)
		if err == io.EOF {
			return fmt.Errorf("%w: short page data", image.ErrCorrupt)
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// readPages reads len(b) bytes of page data from dec, leaving their
// checksum to whoever fills them when dec allows it (the returned sum;
// nil when dec summed them itself, or had nothing to sum).
func readPages(dec *image.Decoder, b []byte) (*image.DeferredSum, error) {
	n, sum, err := dec.ReadDataDeferred(b)
	if err == io.EOF || (sum != nil && n < len(b)) {
		return nil, fmt.Errorf("%w: short page data", image.ErrCorrupt)
	}
	if err != nil {
		return nil, err
	}
	return sum, readAll(dec, b[n:])
}
