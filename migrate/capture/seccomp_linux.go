package capture

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/seccompbpf"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Seccomp filters are read per thread with PTRACE_SECCOMP_GET_FILTER,
// oldest first. Filters every thread has (the same programs, oldest
// first: installed before the threads were made, or with TSYNC) go into
// the process record and are installed once, in the main thread, before
// the threads are made, so that they are shared again; the rest, each
// thread's own, go into its thread record.
//
// One filter is not carried: the one pthaw -virtpid installed, whose
// listener is pthaw's (seccompbpf.VirtPID). A process restored that way
// saw its saved PID and TIDs through it, so those are what the snapshot
// records, read by injected getpid and gettid calls, which the filter
// hands to that pthaw to answer. Any other filter with a listener
// (SECCOMP_RET_USER_NOTIF, a supervisor's) is refused: its supervisor
// cannot follow the process.

// threadSeccomp reads the filters of thread tid of pid. virt reports
// that the chain held pthaw's -virtpid filter, left out of it. A thread
// without filters is not asked (reading them needs CAP_SYS_ADMIN, which
// pfreeze run by an ordinary user does not have). Runs on the tracer
// thread.
func threadSeccomp(pid, tid int) (chain []image.SeccompFilter, virt bool, err error) {
	st, err := procfs.ThreadStatus(pid, tid)
	if err != nil {
		return nil, false, err
	}
	if st["Seccomp"] == "0" || st["Seccomp"] == "" {
		return nil, false, nil
	}
	fs, err := ptrace.SeccompFilters(tid)
	if err != nil {
		return nil, false, err
	}
	own := seccompbpf.VirtPID()
	for i, f := range fs {
		if bytes.Equal(f.Prog, own) {
			virt = true
			continue
		}
		if returnsUserNotif(f.Prog) {
			return nil, false, unsupported("thread %d: seccomp filter %d hands calls to a listener (SECCOMP_RET_USER_NOTIF), whose supervisor cannot follow the process", tid, i)
		}
		chain = append(chain, image.SeccompFilter{Prog: f.Prog, Flags: f.Flags})
	}
	return chain, virt, nil
}

// returnsUserNotif reports whether a classic BPF program has a constant
// return of SECCOMP_RET_USER_NOTIF.
func returnsUserNotif(prog []byte) bool {
	const retK = 0x06 // BPF_RET|BPF_K
	for i := 0; i+8 <= len(prog); i += 8 {
		code := binary.LittleEndian.Uint16(prog[i:])
		k := binary.LittleEndian.Uint32(prog[i+4:])
		if code == retK && k&unix.SECCOMP_RET_ACTION_FULL == unix.SECCOMP_RET_USER_NOTIF {
			return true
		}
	}
	return false
}

// splitSeccomp moves the filters every thread's chain starts with into
// the process record, leaving each thread its own.
func splitSeccomp(p *image.Process, ths []*image.Thread, chains [][]image.SeccompFilter) {
	if len(chains) == 0 {
		return
	}
	common := len(chains[0])
	for _, c := range chains[1:] {
		n := 0
		for n < common && n < len(c) && sameFilter(c[n], chains[0][n]) {
			n++
		}
		common = n
	}
	p.Seccomp = chains[0][:common]
	for i, t := range ths {
		if rest := chains[i][common:]; len(rest) > 0 {
			t.Seccomp = rest
		}
	}
}

func sameFilter(a, b image.SeccompFilter) bool {
	return a.Flags == b.Flags && bytes.Equal(a.Prog, b.Prog)
}

// virtualID asks a process restored with pthaw -virtpid for the id it
// sees (getpid or gettid, nr), which pthaw answers. Runs on the tracer
// thread.
func (f *Frozen) virtualID(th *thread, nr uintptr) (int, error) {
	r, _, err := f.call(th, 0, nr)
	if err != nil {
		return 0, fmt.Errorf("virtual id (pthaw -virtpid serves it): %w", err)
	}
	return int(r), nil
}
