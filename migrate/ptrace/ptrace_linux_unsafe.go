package ptrace

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxXState bounds the NT_X86_XSTATE buffer: large enough for AVX-512 and
// AMX tile state.
const maxXState = 16 << 10

// GetXState reads the whole XSAVE area (FPU, SSE, AVX, ...).
// Runs on the tracer thread.
func GetXState(tid int) ([]byte, error) {
	buf := make([]byte, maxXState)
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(len(buf))
	if err := ptrace(unix.PTRACE_GETREGSET, tid, unix.NT_X86_XSTATE, uintptr(unsafe.Pointer(&iov))); err != nil {
		return nil, fmt.Errorf("getregset xstate %d: %w", tid, err)
	}
	return buf[:iov.Len], nil
}

// SetXState writes an XSAVE area read by GetXState.
// Runs on the tracer thread.
func SetXState(tid int, xs []byte) error {
	if len(xs) == 0 {
		return nil
	}
	iov := unix.Iovec{Base: &xs[0]}
	iov.SetLen(len(xs))
	if err := ptrace(unix.PTRACE_SETREGSET, tid, unix.NT_X86_XSTATE, uintptr(unsafe.Pointer(&iov))); err != nil {
		return fmt.Errorf("setregset xstate %d: %w", tid, err)
	}
	return nil
}

// GetSigmask reads the blocked-signal mask. Runs on the tracer thread.
func GetSigmask(tid int) (uint64, error) {
	var m uint64
	if err := ptrace(unix.PTRACE_GETSIGMASK, tid, 8, uintptr(unsafe.Pointer(&m))); err != nil {
		return 0, fmt.Errorf("getsigmask %d: %w", tid, err)
	}
	return m, nil
}

// SetSigmask writes the blocked-signal mask. Runs on the tracer thread.
func SetSigmask(tid int, m uint64) error {
	if err := ptrace(unix.PTRACE_SETSIGMASK, tid, 8, uintptr(unsafe.Pointer(&m))); err != nil {
		return fmt.Errorf("setsigmask %d: %w", tid, err)
	}
	return nil
}

// SiginfoSize is sizeof(siginfo_t).
const SiginfoSize = 128

// PeekSiginfo returns the pending signals of tid (shared: the process-wide
// queue) without dequeuing them, each as a raw siginfo_t.
// Runs on the tracer thread.
func PeekSiginfo(tid int, shared bool) ([][]byte, error) {
	type args struct {
		off   uint64
		flags uint32
		nr    int32
	}
	var out [][]byte
	buf := make([]byte, 32*SiginfoSize)
	for {
		a := args{off: uint64(len(out)), nr: 32}
		if shared {
			a.flags = 1 // PTRACE_PEEKSIGINFO_SHARED
		}
		r, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_PEEKSIGINFO, uintptr(tid),
			uintptr(unsafe.Pointer(&a)), uintptr(unsafe.Pointer(&buf[0])), 0, 0)
		if e != 0 {
			return nil, fmt.Errorf("peeksiginfo %d: %w", tid, e)
		}
		if r == 0 {
			return out, nil
		}
		for i := 0; i < int(r); i++ {
			out = append(out, append([]byte(nil), buf[i*SiginfoSize:(i+1)*SiginfoSize]...))
		}
	}
}

// RseqConfig is struct ptrace_rseq_configuration.
type RseqConfig struct {
	Addr  uint64
	Len   uint32
	Flags uint32
	Sig   uint32
	_     uint32
}

// GetRseq reads the thread's rseq registration. Runs on the tracer thread.
func GetRseq(tid int) (RseqConfig, error) {
	var c struct {
		Addr  uint64
		Len   uint32
		Sig   uint32
		Flags uint32
		Pad   uint32
	}
	if err := ptrace(unix.PTRACE_GET_RSEQ_CONFIGURATION, tid, unsafe.Sizeof(c), uintptr(unsafe.Pointer(&c))); err != nil {
		return RseqConfig{}, fmt.Errorf("get rseq configuration %d: %w", tid, err)
	}
	return RseqConfig{Addr: c.Addr, Len: c.Len, Flags: c.Flags, Sig: c.Sig}, nil
}

// GetRobustList returns the robust futex list head of tid. It is an
// ordinary system call; any thread with ptrace access may make it.
func GetRobustList(tid int) (head, length uint64, err error) {
	var h, l uint64
	_, _, e := unix.Syscall(unix.SYS_GET_ROBUST_LIST, uintptr(tid), uintptr(unsafe.Pointer(&h)), uintptr(unsafe.Pointer(&l)))
	if e != 0 {
		return 0, 0, fmt.Errorf("get_robust_list %d: %w", tid, e)
	}
	return h, l, nil
}

// GetSiginfo returns the siginfo of the signal tid is stopped for. At a
// group-stop it fails with EINVAL, which is how a tracer that did not
// seize tells a group-stop from a signal-delivery-stop.
// Runs on the tracer thread.
func GetSiginfo(tid int) ([]byte, error) {
	buf := make([]byte, SiginfoSize)
	if err := ptrace(unix.PTRACE_GETSIGINFO, tid, 0, uintptr(unsafe.Pointer(&buf[0]))); err != nil {
		return nil, err
	}
	return buf, nil
}

// SetSiginfo replaces the siginfo of the signal tid is stopped for.
// Runs on the tracer thread.
func SetSiginfo(tid int, si []byte) error {
	if len(si) != SiginfoSize {
		return fmt.Errorf("setsiginfo %d: %d bytes", tid, len(si))
	}
	return ptrace(unix.PTRACE_SETSIGINFO, tid, 0, uintptr(unsafe.Pointer(&si[0])))
}
