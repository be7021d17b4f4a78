//go:build amd64 && !purego

package aesgcm

import "golang.org/x/sys/cpu"

// accelerated: AES-NI, PCLMULQDQ, AVX2 with the OS saving YMM state
// (cpu.X86.HasAVX2 checks XGETBV), and VAES and VPCLMULQDQ (CPUID leaf 7,
// ECX bits 9 and 10; x/sys/cpu reports these only with AVX-512).
var accelerated = func() bool {
	if !cpu.X86.HasAES || !cpu.X86.HasPCLMULQDQ || !cpu.X86.HasAVX2 {
		return false
	}
	if maxLeaf, _, _, _ := cpuid(0, 0); maxLeaf < 7 {
		return false
	}
	_, _, ecx, _ := cpuid(7, 0)
	return ecx&(1<<9) != 0 && ecx&(1<<10) != 0
}()

func cpuid(leaf, sub uint32) (a, b, c, d uint32)

//go:noescape
func expandKey256(key *[32]byte, rk *[roundKeysSize]byte)

//go:noescape
func ghashBlocks(h *[16]byte, acc *[16]byte, data *byte, n int)

//go:noescape
func gcmCrypt(rk *[roundKeysSize]byte, hp *[powersSize]byte, acc *[16]byte, ctr *[16]byte, dst, src *byte, n int, decrypt bool)

//go:noescape
func encryptBlock(rk *[roundKeysSize]byte, dst, src *[16]byte)
