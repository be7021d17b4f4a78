package loader

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Start gives the built process its last state (signal handlers, mm
// fields, credentials, registers) and lets it run. If any step fails the
// process is killed.
func (p *Process) Start() error {
	if !p.built || p.done {
		return errors.New("thaw: start: process not built")
	}
	err := p.tr.Do(func() error {
		if p.retryPID {
			if err := p.takePID(true); err != nil {
				return err
			}
		}
		return p.finish()
	})
	if err != nil {
		p.Abort()
		return fmt.Errorf("thaw: %w", err)
	}
	p.done = true
	p.mem.Close()
	return nil
}

// finish runs on the tracer thread.
func (p *Process) finish() error {
	pr, t := p.proc, p.thread
	scratch := uintptr(p.base + stubScratchOff)
	write := func(b []byte) error { return p.mem.Write(uint64(scratch), b) }

	// madvise flags here, not when mapping: a fork (takePID) would not
	// carry MADV_DONTFORK areas and would wipe MADV_WIPEONFORK ones.
	for _, v := range p.vmas {
		if !v.Kind.Kernel() {
			if err := p.advise(v); err != nil {
				return err
			}
		}
	}
	// Signal dispositions.
	for _, s := range pr.Sigacts {
		if s.Sig < 1 || s.Sig > 64 || s.Sig == int(unix.SIGKILL) || s.Sig == int(unix.SIGSTOP) {
			return fmt.Errorf("%w: sigaction for signal %d", image.ErrCorrupt, s.Sig)
		}
		b := make([]byte, 32)
		binary.LittleEndian.PutUint64(b[0:], s.Handler)
		binary.LittleEndian.PutUint64(b[8:], s.Flags)
		binary.LittleEndian.PutUint64(b[16:], s.Restorer)
		binary.LittleEndian.PutUint64(b[24:], s.Mask)
		if err := write(b); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_RT_SIGACTION, uintptr(s.Sig), scratch, 0, 8); err != nil {
			return fmt.Errorf("sigaction %d: %w", s.Sig, err)
		}
	}
	if t.AltSP != 0 || t.AltFlags != 0 {
		b := make([]byte, 24)
		binary.LittleEndian.PutUint64(b[0:], t.AltSP)
		binary.LittleEndian.PutUint32(b[8:], uint32(t.AltFlags&^ssOnStack))
		binary.LittleEndian.PutUint64(b[16:], t.AltSize)
		if err := write(b); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_SIGALTSTACK, scratch, 0); err != nil {
			return fmt.Errorf("sigaltstack: %w", err)
		}
	}
	if pr.Cwd != "" {
		path, err := p.putString(pr.Cwd)
		if err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_CHDIR, path); err != nil {
			return fmt.Errorf("chdir %s: %w", pr.Cwd, err)
		}
	}
	if pr.Comm != "" {
		if err := write(append([]byte(pr.Comm), 0)); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_NAME, scratch); err != nil {
			return fmt.Errorf("set name: %w", err)
		}
	}
	if _, err := p.call(unix.SYS_UMASK, uintptr(pr.Umask)); err != nil {
		return fmt.Errorf("umask: %w", err)
	}
	if _, err := p.call(unix.SYS_PERSONALITY, uintptr(pr.Personality)); err != nil {
		return fmt.Errorf("personality %#x: %w", pr.Personality, err)
	}
	if pr.PdeathSig != 0 && !p.opts.Detach {
		if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, uintptr(pr.PdeathSig)); err != nil {
			return fmt.Errorf("pdeathsig: %w", err)
		}
	}
	if t.TidAddress != 0 {
		if _, err := p.call(unix.SYS_SET_TID_ADDRESS, uintptr(t.TidAddress)); err != nil {
			return fmt.Errorf("set_tid_address: %w", err)
		}
	}
	if t.RobustList != 0 {
		if _, err := p.call(unix.SYS_SET_ROBUST_LIST, uintptr(t.RobustList), uintptr(t.RobustLen)); err != nil {
			return fmt.Errorf("set_robust_list: %w", err)
		}
	}
	if t.RseqAddr != 0 {
		if _, err := p.call(unix.SYS_RSEQ, uintptr(t.RseqAddr), uintptr(t.RseqLen), 0, uintptr(t.RseqSig)); err != nil {
			return fmt.Errorf("rseq %#x: %w", t.RseqAddr, err)
		}
	}

	// The stub's pages go; from here on calls are made at the vdso's
	// syscall instruction, with scratch memory borrowed from the process.
	if _, err := p.call(unix.SYS_MUNMAP, uintptr(p.base), stubSize); err != nil {
		return fmt.Errorf("unmap stub: %w", err)
	}
	p.in.Site = uintptr(p.vdso)
	borrow, orig, err := p.borrow()
	if err != nil {
		return err
	}
	if err := p.setMM(borrow); err != nil {
		return err
	}
	if err := p.setCreds(borrow); err != nil {
		return err
	}
	if pr.Creds.NoNewPrivs {
		if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_DUMPABLE, uintptr(pr.Dumpable)); err != nil {
		return fmt.Errorf("dumpable: %w", err)
	}
	// Pending signals and timers last, so that they fire in the restored
	// process, not during its construction.
	for _, si := range t.Pending {
		if err := p.queueSignal(borrow, si, true); err != nil {
			return err
		}
	}
	for _, si := range pr.Pending {
		if err := p.queueSignal(borrow, si, false); err != nil {
			return err
		}
	}
	for which, it := range pr.Itimers {
		if it == (image.Itimer{}) {
			continue
		}
		b := make([]byte, 32)
		binary.LittleEndian.PutUint64(b[0:], uint64(it.IntervalSec))
		binary.LittleEndian.PutUint64(b[8:], uint64(it.IntervalUsec))
		binary.LittleEndian.PutUint64(b[16:], uint64(it.ValueSec))
		binary.LittleEndian.PutUint64(b[24:], uint64(it.ValueUsec))
		if err := p.mem.Write(uint64(borrow), b); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_SETITIMER, uintptr(which), borrow, 0); err != nil {
			return fmt.Errorf("setitimer %d: %w", which, err)
		}
	}
	if err := p.mem.Write(uint64(borrow), orig); err != nil {
		return fmt.Errorf("return borrowed memory: %w", err)
	}

	regs, err := ptrace.RegsFromSlice(t.Regs)
	if err != nil {
		return err
	}
	// A sleep interrupted by the freeze would be restarted through the
	// kernel's restart block, which this process does not have: re-run the
	// original call instead (its arguments are still in the registers).
	if -int64(regs.Rax) == ptrace.ERESTART_RESTARTBLOCK && int64(regs.Orig_rax) >= 0 && regs.Orig_rax != unix.SYS_RESTART_SYSCALL {
		restart := int64(-ptrace.ERESTARTNOINTR)
		regs.Rax = uint64(restart)
	}
	if err := ptrace.SetXState(p.pid, t.XState); err != nil {
		return err
	}
	if err := ptrace.SetSigmask(p.pid, t.Sigmask); err != nil {
		return err
	}
	if err := ptrace.SetRegs(p.pid, regs); err != nil {
		return err
	}
	return ptrace.Detach(p.pid, 0)
}

// ssOnStack is SS_ONSTACK: reported by sigaltstack, never accepted by it.
const ssOnStack = 1

// borrowLen is how much process memory finish borrows for arguments.
const borrowLen = 1024

// borrow picks memory of the restored process to pass arguments through,
// below the saved stack pointer's red zone, and returns its contents so
// they can be put back. Runs on the tracer thread.
func (p *Process) borrow() (uintptr, []byte, error) {
	rsp := p.thread.Regs[19]
	addr := (rsp - 128 - borrowLen) &^ 15
	ok := false
	for _, v := range p.vmas {
		if v.Start <= addr && rsp <= v.End && v.Kind == image.VMAAnon && v.Prot&unix.PROT_WRITE != 0 {
			ok = true
		}
	}
	if !ok {
		for _, v := range p.vmas {
			if v.Kind == image.VMAAnon && v.Prot&unix.PROT_WRITE != 0 && v.Len() >= borrowLen {
				addr, ok = v.Start, true
				break
			}
		}
	}
	if !ok {
		return 0, nil, errors.New("no writable memory to pass arguments through")
	}
	orig := make([]byte, borrowLen)
	if err := p.mem.Read(addr, orig); err != nil {
		return 0, nil, fmt.Errorf("borrow memory: %w", err)
	}
	return uintptr(addr), orig, nil
}

// setMM restores the mm fields, auxv and the executable link with
// prctl(PR_SET_MM_MAP). Runs on the tracer thread.
func (p *Process) setMM(scratch uintptr) error {
	pr := p.proc
	path := append([]byte(pr.Exe), 0)
	if len(path) > 512 {
		return fmt.Errorf("executable path too long: %s", pr.Exe)
	}
	if err := p.mem.Write(uint64(scratch)+borrowLen-512, path); err != nil {
		return err
	}
	exe, err := p.call(unix.SYS_OPEN, scratch+borrowLen-512, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open executable %s: %w", pr.Exe, err)
	}
	defer p.call(unix.SYS_CLOSE, exe)
	auxv := make([]byte, 8*len(pr.Auxv))
	for i, v := range pr.Auxv {
		binary.LittleEndian.PutUint64(auxv[8*i:], v)
	}
	const mapLen = 104 // struct prctl_mm_map
	if mapLen+len(auxv) > borrowLen-512 {
		return fmt.Errorf("%w: auxv of %d bytes", image.ErrCorrupt, len(auxv))
	}
	m := pr.MM
	b := make([]byte, mapLen)
	for i, v := range []uint64{m.StartCode, m.EndCode, m.StartData, m.EndData, m.StartBrk, m.Brk,
		m.StartStack, m.ArgStart, m.ArgEnd, m.EnvStart, m.EnvEnd, uint64(scratch) + mapLen} {
		binary.LittleEndian.PutUint64(b[8*i:], v)
	}
	binary.LittleEndian.PutUint32(b[96:], uint32(len(auxv)))
	binary.LittleEndian.PutUint32(b[100:], uint32(exe))
	if err := p.mem.Write(uint64(scratch), append(b, auxv...)); err != nil {
		return err
	}
	if _, err := p.call(unix.SYS_PRCTL, unix.PR_SET_MM, unix.PR_SET_MM_MAP, scratch, mapLen); err != nil {
		return fmt.Errorf("prctl(PR_SET_MM_MAP): %w", err)
	}
	return nil
}

// queueSignal re-queues a pending signal with its siginfo.
// Runs on the tracer thread.
func (p *Process) queueSignal(scratch uintptr, si image.Siginfo, thread bool) error {
	if len(si) != ptrace.SiginfoSize {
		return fmt.Errorf("%w: siginfo of %d bytes", image.ErrCorrupt, len(si))
	}
	sig := uintptr(binary.LittleEndian.Uint32(si[0:]))
	if err := p.mem.Write(uint64(scratch), si); err != nil {
		return err
	}
	var err error
	if thread {
		_, err = p.call(unix.SYS_RT_TGSIGQUEUEINFO, uintptr(p.pid), uintptr(p.pid), sig, scratch)
	} else {
		_, err = p.call(unix.SYS_RT_SIGQUEUEINFO, uintptr(p.pid), sig, scratch)
	}
	if err != nil {
		return fmt.Errorf("queue signal %d: %w", sig, err)
	}
	return nil
}
