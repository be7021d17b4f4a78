package loader

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Seccomp filters are restored as CRIU restores them: installed while
// the process is built, before its credentials (loading a filter without
// no_new_privs needs CAP_SYS_ADMIN, which a uid-1000 process no longer
// has), with PTRACE_O_SUSPEND_SECCOMP set on every thread so that no
// filter judges the calls injected after it (a filter that forbids
// setresuid would otherwise forbid restoring the credentials).
// Detaching, or the tracer loop's options (resumeTraced), clears the
// suspension before the process runs. The filters every thread shares
// (image.Process.Seccomp) go into the main thread before the threads are
// made, so they are shared again (TSYNC works as before); each thread's
// own (image.Thread.Seccomp) into it afterwards.

// buildTraceOpts are the ptrace options of a process being built.
const buildTraceOpts = unix.PTRACE_O_EXITKILL | unix.PTRACE_O_TRACECLONE | unix.PTRACE_O_TRACEFORK

// hasSeccomp reports whether the snapshot holds any seccomp filter.
func (p *Process) hasSeccomp() bool {
	if len(p.proc.Seccomp) > 0 {
		return true
	}
	for _, t := range p.threads {
		if len(t.Seccomp) > 0 {
			return true
		}
	}
	return false
}

// suspendSeccomp stops seccomp filters from judging tid's calls until
// its options are set again or it is detached. Runs on the tracer thread.
func suspendSeccomp(tid int) error {
	if err := ptrace.SetOptions(tid, buildTraceOpts|unix.PTRACE_O_SUSPEND_SECCOMP); err != nil {
		if errors.Is(err, unix.EPERM) {
			err = fmt.Errorf("%w (needs CAP_SYS_ADMIN)", err)
		}
		return fmt.Errorf("suspend seccomp while building (PTRACE_O_SUSPEND_SECCOMP) on %d: %w", tid, err)
	}
	return nil
}

// installSeccomp loads filters, oldest first, into the thread of in,
// passing each program through an area it maps for the purpose. Runs on
// the tracer thread.
func (p *Process) installSeccomp(in *ptrace.Injector, filters []image.SeccompFilter) error {
	for i, f := range filters {
		if len(f.Prog) == 0 || len(f.Prog)%8 != 0 || len(f.Prog)/8 > image.MaxSeccompInsns {
			return fmt.Errorf("%w: seccomp filter %d of %d bytes", image.ErrCorrupt, i, len(f.Prog))
		}
		size := uintptr((16 + len(f.Prog) + pageSize - 1) &^ (pageSize - 1))
		area, err := in.Syscall(unix.SYS_MMAP, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uintptr(0), 0)
		if err != nil {
			return fmt.Errorf("seccomp filter %d: map its program: %w", i, err)
		}
		fprog := make([]byte, 16, 16+len(f.Prog)) // struct sock_fprog: u16 len, pad, u64 filter
		binary.LittleEndian.PutUint16(fprog, uint16(len(f.Prog)/8))
		binary.LittleEndian.PutUint64(fprog[8:], uint64(area)+16)
		err = p.mem.Write(uint64(area), append(fprog, f.Prog...))
		if err == nil {
			_, err = in.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, uintptr(f.Flags), area)
			if errors.Is(err, unix.EACCES) {
				err = fmt.Errorf("%w (without no_new_privs loading a filter needs CAP_SYS_ADMIN)", err)
			}
		}
		if _, uerr := in.Syscall(unix.SYS_MUNMAP, area, size); err == nil && uerr != nil {
			err = uerr
		}
		if err != nil {
			return fmt.Errorf("seccomp filter %d (flags %#x): %w", i, f.Flags, err)
		}
	}
	return nil
}
