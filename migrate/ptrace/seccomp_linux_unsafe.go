package ptrace

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SeccompFilter is one seccomp filter of a thread: its classic BPF
// program (8 bytes an instruction) and the flags the kernel reports.
type SeccompFilter struct {
	Prog  []byte
	Flags uint64
}

// SeccompFilters returns the seccomp filters of the stopped thread tid,
// oldest first (as PTRACE_SECCOMP_GET_FILTER counts them). It
// needs CAP_SYS_ADMIN and a tracer not under seccomp itself.
// Runs on the tracer thread.
func SeccompFilters(tid int) ([]SeccompFilter, error) {
	var out []SeccompFilter
	for i := 0; ; i++ {
		n, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(tid), uintptr(i), 0, 0, 0)
		if e == unix.ENOENT {
			break
		}
		if e == unix.EINVAL && i == 0 {
			return nil, nil // no filter (seccomp disabled for the thread)
		}
		if e != 0 {
			return nil, fmt.Errorf("seccomp filter %d of thread %d: %w", i, tid, explainSeccomp(e))
		}
		if n == 0 || n > 4096 {
			return nil, fmt.Errorf("seccomp filter %d of thread %d: %d instructions", i, tid, n)
		}
		prog := make([]byte, 8*n)
		m, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(tid), uintptr(i), uintptr(unsafe.Pointer(&prog[0])), 0, 0)
		if e != 0 {
			return nil, fmt.Errorf("seccomp filter %d of thread %d: %w", i, tid, explainSeccomp(e))
		}
		if m != n {
			return nil, fmt.Errorf("seccomp filter %d of thread %d changed while read", i, tid)
		}
		md := struct{ FilterOff, Flags uint64 }{FilterOff: uint64(i)}
		if _, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_METADATA, uintptr(tid), unsafe.Sizeof(md), uintptr(unsafe.Pointer(&md)), 0, 0); e != 0 {
			return nil, fmt.Errorf("seccomp filter %d of thread %d: metadata: %w", i, tid, explainSeccomp(e))
		}
		out = append(out, SeccompFilter{Prog: prog, Flags: md.Flags})
	}
	return out, nil
}

func explainSeccomp(e unix.Errno) error {
	if errors.Is(e, unix.EPERM) || errors.Is(e, unix.EACCES) {
		return fmt.Errorf("%w (reading seccomp filters needs CAP_SYS_ADMIN)", e)
	}
	return e
}
