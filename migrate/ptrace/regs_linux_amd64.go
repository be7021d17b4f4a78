package ptrace

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Regs is struct user_regs_struct.
type Regs unix.PtraceRegs

// NumRegs is the number of 64-bit words in Regs.
const NumRegs = 27

// Slice returns the registers in kernel order (the snapshot's layout).
func (r *Regs) Slice() []uint64 {
	return []uint64{
		r.R15, r.R14, r.R13, r.R12, r.Rbp, r.Rbx, r.R11, r.R10, r.R9, r.R8,
		r.Rax, r.Rcx, r.Rdx, r.Rsi, r.Rdi, r.Orig_rax, r.Rip, r.Cs, r.Eflags,
		r.Rsp, r.Ss, r.Fs_base, r.Gs_base, r.Ds, r.Es, r.Fs, r.Gs,
	}
}

// RegsFromSlice is the inverse of Slice.
func RegsFromSlice(s []uint64) (*Regs, error) {
	if len(s) != NumRegs {
		return nil, fmt.Errorf("registers: got %d words, want %d", len(s), NumRegs)
	}
	return &Regs{
		R15: s[0], R14: s[1], R13: s[2], R12: s[3], Rbp: s[4], Rbx: s[5], R11: s[6], R10: s[7],
		R9: s[8], R8: s[9], Rax: s[10], Rcx: s[11], Rdx: s[12], Rsi: s[13], Rdi: s[14],
		Orig_rax: s[15], Rip: s[16], Cs: s[17], Eflags: s[18], Rsp: s[19], Ss: s[20],
		Fs_base: s[21], Gs_base: s[22], Ds: s[23], Es: s[24], Fs: s[25], Gs: s[26],
	}, nil
}

// RegNames names the words of Slice, for debug output.
var RegNames = [NumRegs]string{
	"r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
	"rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
	"rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
}

// Kernel syscall-restart return values (include/linux/errno.h). A thread
// stopped inside a system call shows one of these in rax; the kernel acts on
// it when the thread resumes.
const (
	ERESTARTSYS           = 512
	ERESTARTNOINTR        = 513
	ERESTARTNOHAND        = 514
	ERESTART_RESTARTBLOCK = 516
)

// InSyscallRestart reports whether r is a thread stopped in a system call
// that the kernel will restart or abort on resume.
func (r *Regs) InSyscallRestart() bool {
	if int64(r.Orig_rax) < 0 {
		return false
	}
	switch -int64(r.Rax) {
	case ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK:
		return true
	}
	return false
}

// setSyscall loads a system call into r: rip at a syscall instruction,
// orig_rax -1 so the kernel applies no restart logic to this resume.
func (r *Regs) setSyscall(site uintptr, nr uintptr, args []uintptr) {
	r.Rip = uint64(site)
	r.Rax = uint64(nr)
	r.Orig_rax = ^uint64(0)
	var a [6]uint64
	for i, v := range args {
		a[i] = uint64(v)
	}
	r.Rdi, r.Rsi, r.Rdx, r.R10, r.R8, r.R9 = a[0], a[1], a[2], a[3], a[4], a[5]
}
