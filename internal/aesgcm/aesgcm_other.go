//go:build !amd64 || purego

package aesgcm

const accelerated = false

func expandKey256(key *[32]byte, rk *[roundKeysSize]byte)       { panic("unreachable") }
func ghashBlocks(h *[16]byte, acc *[16]byte, data *byte, n int) { panic("unreachable") }
func gcmCrypt(rk *[roundKeysSize]byte, hp *[powersSize]byte, acc *[16]byte, ctr *[16]byte, dst, src *byte, n int, decrypt bool) {
	panic("unreachable")
}
func encryptBlock(rk *[roundKeysSize]byte, dst, src *[16]byte) { panic("unreachable") }
