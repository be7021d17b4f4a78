package loader

import (
	"encoding/binary"
)

// The stub is the process a snapshot is built in: a static ELF of one
// read-write-execute page, generated at restore time and loaded at an
// address the snapshot leaves free. Its code is never run as a program; it
// only offers a syscall instruction to inject calls at, and a scratch page
// for their arguments.
const (
	stubPages   = 2
	stubSize    = stubPages * pageSize
	stubCodeOff = 0x80 // code follows the ELF and program headers
	// stubScratchOff is the scratch area: the second page.
	stubScratchOff = pageSize
)

// stubCode: syscall; int3; jmp . (the entry point is the jmp).
var stubCode = []byte{0x0f, 0x05, 0xcc, 0xeb, 0xfe}

const stubEntryOff = stubCodeOff + 3

// stubELF returns the stub executable for load address base.
func stubELF(base uint64) []byte {
	b := make([]byte, stubCodeOff+len(stubCode))
	le := binary.LittleEndian
	// ELF header.
	copy(b, []byte{0x7f, 'E', 'L', 'F', 2 /*64-bit*/, 1 /*LE*/, 1 /*version*/, 0 /*SysV*/})
	le.PutUint16(b[16:], 2)    // ET_EXEC
	le.PutUint16(b[18:], 0x3e) // EM_X86_64
	le.PutUint32(b[20:], 1)    // EV_CURRENT
	le.PutUint64(b[24:], base+stubEntryOff)
	le.PutUint64(b[32:], 64) // e_phoff
	le.PutUint64(b[40:], 0)  // e_shoff
	le.PutUint32(b[48:], 0)  // e_flags
	le.PutUint16(b[52:], 64) // e_ehsize
	le.PutUint16(b[54:], 56) // e_phentsize
	le.PutUint16(b[56:], 1)  // e_phnum
	// Program header: one PT_LOAD, RWX, file page + scratch page.
	ph := b[64:]
	le.PutUint32(ph[0:], 1) // PT_LOAD
	le.PutUint32(ph[4:], 7) // PF_R|PF_W|PF_X
	le.PutUint64(ph[8:], 0) // p_offset
	le.PutUint64(ph[16:], base)
	le.PutUint64(ph[24:], base)
	le.PutUint64(ph[32:], uint64(len(b))) // p_filesz
	le.PutUint64(ph[40:], stubSize)       // p_memsz
	le.PutUint64(ph[48:], pageSize)       // p_align
	copy(b[stubCodeOff:], stubCode)
	return b
}
