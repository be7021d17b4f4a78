// Package seccompbpf builds the classic BPF programs of the seccomp
// filters pthaw installs (-virtpid). pfreeze needs the same programs to
// recognise pthaw's own filter in a process it restored, which a
// snapshot must not carry: its listener is pthaw's.
package seccompbpf

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// VirtPIDCalls are the system calls the filter of pthaw -virtpid traps
// in a single process.
var VirtPIDCalls = []uint32{unix.SYS_GETPID, unix.SYS_GETTID, unix.SYS_KILL, unix.SYS_TKILL, unix.SYS_TGKILL}

// Rule sends the calls to action.
type Rule struct {
	Calls  []uint32
	Action uint32
}

// Program returns the classic BPF program: x86-64 calls of each rule
// get its action (the listener, or for a tree the tracer), everything
// else is allowed.
func Program(rules ...Rule) []byte {
	type insn struct {
		code   uint16
		jt, jf uint8
		k      uint32
	}
	const (
		ldAbs = 0x20 // BPF_LD|BPF_W|BPF_ABS
		jeqK  = 0x15 // BPF_JMP|BPF_JEQ|BPF_K
		retK  = 0x06 // BPF_RET|BPF_K
	)
	n := 0
	for _, r := range rules {
		n += len(r.Calls)
	}
	// 0 arch, 1 check, 2 nr, 3.. one jump per call, then ALLOW and one
	// return per rule.
	allow := 3 + n
	prog := []insn{
		{ldAbs, 0, 0, 4}, // arch
		{jeqK, 0, uint8(allow - 2), unix.AUDIT_ARCH_X86_64},
		{ldAbs, 0, 0, 0}, // nr
	}
	for g, r := range rules {
		for _, nr := range r.Calls {
			prog = append(prog, insn{jeqK, uint8(allow + 1 + g - len(prog) - 1), 0, nr})
		}
	}
	prog = append(prog, insn{retK, 0, 0, unix.SECCOMP_RET_ALLOW})
	for _, r := range rules {
		prog = append(prog, insn{retK, 0, 0, r.Action})
	}
	b := make([]byte, 8*len(prog))
	for i, in := range prog {
		binary.LittleEndian.PutUint16(b[8*i:], in.code)
		b[8*i+2], b[8*i+3] = in.jt, in.jf
		binary.LittleEndian.PutUint32(b[8*i+4:], in.k)
	}
	return b
}

// VirtPID is the filter pthaw -virtpid installs in a single process: the
// VirtPIDCalls go to its listener (SECCOMP_RET_USER_NOTIF).
func VirtPID() []byte {
	return Program(Rule{Calls: VirtPIDCalls, Action: unix.SECCOMP_RET_USER_NOTIF})
}
