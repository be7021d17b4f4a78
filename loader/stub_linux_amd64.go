package loader

import (
	"encoding/binary"
)

// The stub is the process a snapshot is built in: a static ELF of one
// read-write-execute page, generated at restore time and loaded at an
// address the snapshot leaves free. Its code is never run as a program; it
// offers a syscall instruction to inject calls at, a loop that runs a batch
// of them, and a scratch page for their arguments.
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
	init := stubInit()
	if stubInitOff+len(init) > stubBatchOff {
		panic("stub: the init loop overlaps the batch loop")
	}
	b := make([]byte, stubBatchOff+len(stubBatch))
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
	copy(b[stubParkOff:], stubPark)
	copy(b[stubInitOff:], init)
	copy(b[stubBatchOff:], stubBatch)
	return b
}

// stubBatchOff is a loop that runs a table of system calls with one
// ptrace stop for all of them instead of one each: rbx points to the
// table, r15 holds the number of entries. An entry is eight words: the
// number, six arguments, and the result, written back. The loop stops at
// the first error, rbx at its entry, and ends with int3.
const stubBatchOff = 0x140

// batchEntry is the size of one entry of a batch table.
const batchEntry = 64

var stubBatch = []byte{
	0x48, 0x8b, 0x03, // mov rax, [rbx]
	0x48, 0x8b, 0x7b, 0x08, // mov rdi, [rbx+8]
	0x48, 0x8b, 0x73, 0x10, // mov rsi, [rbx+16]
	0x48, 0x8b, 0x53, 0x18, // mov rdx, [rbx+24]
	0x4c, 0x8b, 0x53, 0x20, // mov r10, [rbx+32]
	0x4c, 0x8b, 0x43, 0x28, // mov r8, [rbx+40]
	0x4c, 0x8b, 0x4b, 0x30, // mov r9, [rbx+48]
	0x0f, 0x05, // syscall
	0x48, 0x89, 0x43, 0x38, // mov [rbx+56], rax
	0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, // cmp rax, -4095
	0x73, 0x09, // jae done (unsigned: rax in -4095..-1)
	0x48, 0x83, 0xc3, 0x40, // add rbx, 64
	0x49, 0xff, 0xcf, // dec r15
	0x75, 0xce, // jnz back to the first mov
	0xcc,       // done: int3
	0xeb, 0xfe, // jmp .
}

// stubParkOff is a loop of pause(2): a stub of a -pidns tree that only
// holds a PID (a process group leader outside the tree) sleeps there,
// with every signal blocked, until it is killed with the namespace.
const stubParkOff = 0x90

// stubPark: mov eax, SYS_pause; syscall; jmp back to the mov.
var stubPark = []byte{0xb8, 34, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7}

// stubInitOff is where the init loop starts: in -pidns mode the stub
// stays behind as the namespace's init. It reaps every child and, when the
// restored process (its pid in r12) ends, exits with its status (128+N
// for death by signal N). r13 holds the address of a 4-byte status word.
// The stand-ins of a tree's outside parent and session leader run the
// same loop for their child on the way to the tree's root, so the root's
// status travels up to init.
const stubInitOff = 0xa0

// stubInit assembles the init loop.
func stubInit() []byte {
	var code []byte
	labels := map[string]int{}
	type fix struct {
		at    int
		label string
	}
	var fixes []fix
	emit := func(b ...byte) { code = append(code, b...) }
	jump := func(op byte, label string) {
		emit(op, 0)
		fixes = append(fixes, fix{len(code) - 1, label})
	}
	label := func(name string) { labels[name] = len(code) }

	label("loop")
	emit(0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff) // mov rdi, -1
	emit(0x4c, 0x89, 0xee)                         // mov rsi, r13
	emit(0x31, 0xd2)                               // xor edx, edx
	emit(0x45, 0x31, 0xd2)                         // xor r10d, r10d
	emit(0xb8, 61, 0, 0, 0)                        // mov eax, SYS_wait4
	emit(0x0f, 0x05)                               // syscall
	emit(0x48, 0x85, 0xc0)                         // test rax, rax
	jump(0x78, "fail")                             // js fail
	emit(0x4c, 0x39, 0xe0)                         // cmp rax, r12
	jump(0x75, "loop")                             // jne loop
	emit(0x41, 0x8b, 0x45, 0x00)                   // mov eax, [r13]
	emit(0x89, 0xc7)                               // mov edi, eax
	emit(0x83, 0xe7, 0x7f)                         // and edi, 0x7f
	jump(0x74, "exited")                           // jz exited
	emit(0x81, 0xc7, 0x80, 0, 0, 0)                // add edi, 128
	jump(0xeb, "exit")                             // jmp exit
	label("exited")
	emit(0xc1, 0xe8, 0x08) // shr eax, 8
	emit(0x0f, 0xb6, 0xf8) // movzx edi, al
	jump(0xeb, "exit")     // jmp exit
	label("fail")
	emit(0xbf, 1, 0, 0, 0) // mov edi, 1
	label("exit")
	emit(0xb8, 231, 0, 0, 0) // mov eax, SYS_exit_group
	emit(0x0f, 0x05)         // syscall
	emit(0xeb, 0xfe)         // jmp .
	for _, f := range fixes {
		code[f.at] = byte(int8(labels[f.label] - (f.at + 1)))
	}
	return code
}
