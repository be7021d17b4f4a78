package ptrace

import (
	"encoding/binary"
	"fmt"
)

// A thread stopped inside an rseq critical section was preempted: the
// kernel aborts the section (rip to its abort handler) the next time the
// thread returns to user mode (kernel/rseq.c rseq_ip_fixup). An injected
// call returns it to user mode first elsewhere (the syscall site, the
// sigreturn sequence), where the kernel finds no section, clears the
// thread's rseq_cs and forgets it; put back into the section afterwards,
// the thread would carry on in it as if never preempted, its per-CPU
// data no longer its own. So a seized injector starts from the registers
// the kernel would have given it: rip at the abort handler.

// rseqAbort moves in.saved's rip to the abort handler of the rseq critical
// section it is inside, as the kernel would; a section the kernel would
// refuse (a bad descriptor or signature: it kills the thread) is left to
// the kernel.
func (in *Injector) rseqAbort() error {
	rs, err := GetRseq(in.Tid)
	if err != nil || rs.Addr == 0 {
		return err
	}
	m := NewMem(in.Tid)
	defer m.Close()
	var b [32]byte
	if err := m.Read(rs.Addr+8, b[:8]); err != nil {
		return fmt.Errorf("thread %d: rseq area %#x: %w", in.Tid, rs.Addr, err)
	}
	csAddr := binary.LittleEndian.Uint64(b[:])
	if csAddr == 0 {
		return nil
	}
	if m.Read(csAddr, b[:]) != nil {
		return nil
	}
	le := binary.LittleEndian
	version, start, postCommit, abort := le.Uint32(b[0:]), le.Uint64(b[8:]), le.Uint64(b[16:]), le.Uint64(b[24:])
	ip := in.saved.Rip
	if version != 0 || start+postCommit < start || ip-start >= postCommit || abort-start < postCommit {
		return nil
	}
	var sig [4]byte
	if m.Read(abort-4, sig[:]) != nil || le.Uint32(sig[:]) != rs.Sig {
		return nil
	}
	in.saved.Rip = abort
	return nil
}
