package capture

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// seccompAllows runs the seccomp filters of thread tid of pid on system
// call nr with args made at ip, as the kernel would (golang.org/x/net/bpf
// runs classic BPF), and reports whether every one allows it
// (SECCOMP_RET_ALLOW or SECCOMP_RET_LOG). A thread without filters
// allows everything. Runs on the tracer thread.
func seccompAllows(pid, tid int, ip uintptr, nr uintptr, args ...uint64) (bool, error) {
	fs, err := threadFilters(pid, tid)
	if err != nil {
		return false, err
	}
	data := seccompData(nr, uint64(ip), args)
	for _, f := range fs {
		ret, err := runFilter(f.Prog, data)
		if err != nil {
			return false, err
		}
		switch ret & unix.SECCOMP_RET_ACTION_FULL {
		case unix.SECCOMP_RET_ALLOW, unix.SECCOMP_RET_LOG:
		default:
			return false, nil
		}
	}
	return true, nil
}

// seccompCheck returns a check for thread tid's injector (ptrace.Injector
// Check) that refuses a call its seccomp filters would not let through as
// it is: refused, trapped, or killed for, which would take the process
// with it. A call they hand to a supervisor (SECCOMP_RET_USER_NOTIF) is
// made, but for rt_sigreturn, which a sigreturn frame needs to run. nil for a thread without filters. The filters are read once:
// only the thread itself can add one, and it is stopped. Runs on the
// tracer thread.
func seccompCheck(pid, tid int) (func(nr uintptr, ip uint64, args []uintptr) error, error) {
	fs, err := threadFilters(pid, tid)
	if err != nil || fs == nil {
		return nil, err
	}
	return func(nr uintptr, ip uint64, args []uintptr) error {
		a := make([]uint64, len(args))
		for i, v := range args {
			a[i] = uint64(v)
		}
		data := seccompData(nr, ip, a)
		for i, f := range fs {
			ret, err := runFilter(f.Prog, data)
			if err != nil {
				return fmt.Errorf("thread %d: seccomp filter %d: %w", tid, i, err)
			}
			switch ret & unix.SECCOMP_RET_ACTION_FULL {
			case unix.SECCOMP_RET_ALLOW, unix.SECCOMP_RET_LOG:
			case unix.SECCOMP_RET_USER_NOTIF:
				// Its supervisor answers it (pthaw -virtpid answers
				// the pid calls of what it restored so): the call is
				// made, nothing happens to the process. Not so for
				// the frame's rt_sigreturn, which must run itself.
				if nr != unix.SYS_RT_SIGRETURN {
					continue
				}
				return fmt.Errorf("thread %d: its seccomp filter %d hands rt_sigreturn to a supervisor (action %#x)", tid, i, ret)
			default:
				// Trapped (SIGSYS) or killed for, which would take
				// the process with it, or made to fail: not made,
				// and the reason said.
				return fmt.Errorf("thread %d: its seccomp filter %d does not allow system call %d (action %#x): not injected", tid, i, nr, ret)
			}
		}
		return nil
	}, nil
}

// threadFilters returns the seccomp filters of thread tid of pid, nil for
// a thread that runs none. Runs on the tracer thread.
func threadFilters(pid, tid int) ([]ptrace.SeccompFilter, error) {
	st, err := procfs.ThreadStatus(pid, tid)
	if err != nil {
		return nil, err
	}
	if st["Seccomp"] == "0" || st["Seccomp"] == "" {
		return nil, nil
	}
	fs, err := ptrace.SeccompFilters(tid)
	if err != nil {
		return nil, fmt.Errorf("thread %d: seccomp filters: %w", tid, err)
	}
	return fs, nil
}

// seccompData lays out struct seccomp_data for x86-64. Classic BPF loads
// 32-bit words, which x/net/bpf reads big-endian (network order) and the
// kernel in the CPU's order: each word is stored big-endian so that both
// see the same values.
func seccompData(nr uintptr, ip uint64, args []uint64) []byte {
	words := make([]uint32, 16)
	words[0], words[1] = uint32(nr), unix.AUDIT_ARCH_X86_64
	words[2], words[3] = uint32(ip), uint32(ip>>32)
	for i, a := range args {
		words[4+2*i], words[5+2*i] = uint32(a), uint32(a>>32)
	}
	b := make([]byte, 64)
	for i, w := range words {
		binary.BigEndian.PutUint32(b[4*i:], w)
	}
	return b
}

// runFilter runs one classic BPF program (struct sock_filter, 8 bytes an
// instruction) on data and returns its result.
func runFilter(prog []byte, data []byte) (uint32, error) {
	raw := make([]bpf.RawInstruction, len(prog)/8)
	for i := range raw {
		b := prog[8*i:]
		raw[i] = bpf.RawInstruction{Op: binary.LittleEndian.Uint16(b), Jt: b[2], Jf: b[3], K: binary.LittleEndian.Uint32(b[4:])}
	}
	insts, ok := bpf.Disassemble(raw)
	if !ok {
		return 0, errors.New("an instruction the evaluator does not know")
	}
	vm, err := bpf.NewVM(insts)
	if err != nil {
		return 0, err
	}
	ret, err := vm.Run(data)
	return uint32(ret), err
}
