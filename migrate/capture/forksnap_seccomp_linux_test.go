package capture

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/seccompbpf"
)

// TestRunFilter: the evaluator sees the call number and the arguments as
// the kernel lays them out.
func TestRunFilter(t *testing.T) {
	kill := seccompbpf.Program(seccompbpf.Rule{Calls: []uint32{unix.SYS_CLONE}, Action: unix.SECCOMP_RET_KILL_PROCESS})
	for _, tc := range []struct {
		nr   uintptr
		want uint32
	}{{unix.SYS_CLONE, unix.SECCOMP_RET_KILL_PROCESS}, {unix.SYS_GETPID, unix.SECCOMP_RET_ALLOW}} {
		if got, err := runFilter(kill, seccompData(tc.nr, 0x7fff0000, nil)); err != nil || got != tc.want {
			t.Errorf("call %d: got %#x (%v), want %#x", tc.nr, got, err, tc.want)
		}
	}
	// args[0] == cloneSnapshotFlags (its low word at offset 16, high at
	// 20): ERRNO(1), else ALLOW.
	ins := [][4]uint32{
		{0x20, 0, 0, 20}, // ld args[0] high
		{0x15, 0, 3, 0},  // jeq 0
		{0x20, 0, 0, 16}, // ld args[0] low
		{0x15, 0, 1, cloneSnapshotFlags},
		{0x06, 0, 0, unix.SECCOMP_RET_ERRNO | 1},
		{0x06, 0, 0, unix.SECCOMP_RET_ALLOW},
	}
	prog := make([]byte, 8*len(ins))
	for i, in := range ins {
		binary.LittleEndian.PutUint16(prog[8*i:], uint16(in[0]))
		prog[8*i+2], prog[8*i+3] = byte(in[1]), byte(in[2])
		binary.LittleEndian.PutUint32(prog[8*i+4:], in[3])
	}
	for _, tc := range []struct {
		arg  uint64
		want uint32
	}{{cloneSnapshotFlags, unix.SECCOMP_RET_ERRNO | 1}, {cloneSnapshotFlags | 1<<32, unix.SECCOMP_RET_ALLOW}, {0, unix.SECCOMP_RET_ALLOW}} {
		if got, err := runFilter(prog, seccompData(unix.SYS_CLONE, 0, []uint64{tc.arg})); err != nil || got != tc.want {
			t.Errorf("args[0] %#x: got %#x (%v), want %#x", tc.arg, got, err, tc.want)
		}
	}
}
