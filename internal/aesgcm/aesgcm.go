// Package aesgcm is AES-256-GCM for the snapshot stream's chunks. On CPUs
// with VAES and VPCLMULQDQ (AMD Zen 3 and later, Intel Ice Lake and later)
// it encrypts and hashes two blocks per instruction on 256-bit registers,
// which Go's crypto/cipher (as of Go 1.26) does not: about twice its
// throughput (docs/benchmarks.md). Elsewhere New returns crypto/cipher's
// GCM. Both produce the same bytes: the choice is invisible on the wire.
package aesgcm

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/fips140"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"unsafe"
)

const (
	nonceSize = 12
	tagSize   = 16
	// roundKeysSize holds AES-256's 15 round keys, each twice (one per
	// 128-bit lane).
	roundKeysSize = 15 * 32
	// powersSize holds H^16..H^1 premultiplied by x, byte-reversed.
	powersSize = 16 * 16
	// unit is what one loop of the assembly encrypts and hashes.
	unit = 256
	// maxPlaintext is GCM's limit for a 32-bit counter: 2^32-2 blocks.
	maxPlaintext = (1<<32 - 2) * 16
	// piece bounds how much one assembly call handles (it cannot be
	// preempted), in bytes; a multiple of unit.
	piece = 64 << 10
)

var errOpen = errors.New("cipher: message authentication failed")

// New returns an AEAD for key with a 12-byte nonce and a 16-byte tag. In
// FIPS 140-3 mode (GODEBUG=fips140=on) it is always crypto/cipher's, the
// validated module's.
func New(key []byte) (cipher.AEAD, error) {
	if len(key) == 32 && accelerated && !fips140.Enabled() {
		return newWide(key), nil
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// Implementation names what New uses for AES-256 here: "vaes-avx2" or
// "crypto/cipher".
func Implementation() string {
	if accelerated && !fips140.Enabled() {
		return "vaes-avx2"
	}
	return "crypto/cipher"
}

// wide is AES-256-GCM on 256-bit registers.
type wide struct {
	rk [roundKeysSize]byte
	hp [powersSize]byte
}

func newWide(key []byte) *wide {
	g := new(wide)
	expandKey256((*[32]byte)(key), &g.rk)

	// H = E(K, 0), byte-reversed and multiplied by x modulo the GCM
	// polynomial in the reflected representation (see the assembly).
	var h [16]byte
	encryptBlock(&g.rk, &h, &h)
	lo := binary.BigEndian.Uint64(h[8:])
	hi := binary.BigEndian.Uint64(h[:8])
	carry := hi >> 63
	hi = hi<<1 | lo>>63
	lo <<= 1
	mask := -carry // all ones if the top bit was set: constant time
	hi ^= mask & 0xc200000000000000
	lo ^= mask & 1
	var h1 [16]byte
	binary.LittleEndian.PutUint64(h1[:8], lo)
	binary.LittleEndian.PutUint64(h1[8:], hi)

	// H^k = H^(k-1) * H; the multiply byte-reverses its data argument.
	pow := h1
	copy(g.hp[15*16:], pow[:])
	for k := 2; k <= 16; k++ {
		var rev, acc [16]byte
		for i := range rev {
			rev[i] = pow[15-i]
		}
		ghashBlocks(&h1, &acc, &rev[0], 1)
		pow = acc
		copy(g.hp[(16-k)*16:], pow[:])
	}
	clear(h[:])
	return g
}

func (g *wide) NonceSize() int { return nonceSize }
func (g *wide) Overhead() int  { return tagSize }

func (g *wide) h1() *[16]byte { return (*[16]byte)(g.hp[15*16:]) }

func (g *wide) Seal(dst, nonce, plaintext, additionalData []byte) []byte {
	if len(nonce) != nonceSize {
		panic("aesgcm: incorrect nonce length given to GCM")
	}
	if uint64(len(plaintext)) > maxPlaintext {
		panic("aesgcm: message too large for GCM")
	}
	ret, out := sliceForAppend(dst, len(plaintext)+tagSize)
	if inexactOverlap(out, plaintext) || anyOverlap(out, additionalData) {
		panic("aesgcm: invalid buffer overlap")
	}
	// Everything taken from nonce before out, where it may lie, is written.
	var acc, ctr, mask [16]byte
	g.start(&ctr, &mask, nonce)
	g.hash(&acc, additionalData)
	g.crypt(&acc, &ctr, out[:len(plaintext)], plaintext, false)
	g.tag(out[len(plaintext):], &acc, &mask, len(additionalData), len(plaintext))
	return ret
}

func (g *wide) Open(dst, nonce, ciphertext, additionalData []byte) ([]byte, error) {
	if len(nonce) != nonceSize {
		panic("aesgcm: incorrect nonce length given to GCM")
	}
	if len(ciphertext) < tagSize || uint64(len(ciphertext)) > maxPlaintext+tagSize {
		return nil, errOpen
	}
	tag := ciphertext[len(ciphertext)-tagSize:]
	ret, out := sliceForAppend(dst, len(ciphertext)-tagSize)
	if inexactOverlap(out, ciphertext) || anyOverlap(out, additionalData) {
		panic("aesgcm: invalid buffer overlap")
	}
	ciphertext = ciphertext[:len(ciphertext)-tagSize]
	var acc, ctr, mask [16]byte
	g.start(&ctr, &mask, nonce)
	g.hash(&acc, additionalData)
	g.crypt(&acc, &ctr, out, ciphertext, true)
	var want [tagSize]byte
	g.tag(want[:], &acc, &mask, len(additionalData), len(ciphertext))
	if subtle.ConstantTimeCompare(want[:], tag) != 1 {
		clear(out)
		return nil, errOpen
	}
	return ret, nil
}

// hash adds data, zero-padded to whole blocks, to acc.
func (g *wide) hash(acc *[16]byte, data []byte) {
	for len(data) >= 16 {
		n := min(len(data), piece) &^ 15
		ghashBlocks(g.h1(), acc, &data[0], n/16)
		data = data[n:]
	}
	if len(data) > 0 {
		var b [16]byte
		copy(b[:], data)
		ghashBlocks(g.h1(), acc, &b[0], 1)
	}
}

// crypt XORs src with the key stream from ctr into dst and hashes the
// ciphertext (src when decrypting) into acc.
func (g *wide) crypt(acc, ctr *[16]byte, dst, src []byte, decrypt bool) {
	for len(src) >= unit {
		n := min(len(src), piece) &^ (unit - 1)
		gcmCrypt(&g.rk, &g.hp, acc, ctr, &dst[0], &src[0], n/unit, decrypt)
		dst, src = dst[n:], src[n:]
	}
	if len(src) == 0 {
		return
	}
	var ks [unit]byte
	for off := 0; off < len(src); off += 16 {
		encryptBlock(&g.rk, (*[16]byte)(ks[off:]), ctr)
		binary.BigEndian.PutUint32(ctr[12:], binary.BigEndian.Uint32(ctr[12:])+1)
	}
	if decrypt {
		g.hash(acc, src) // before dst, which may be src, is written
	}
	subtle.XORBytes(dst, src, ks[:len(src)])
	if !decrypt {
		g.hash(acc, dst)
	}
	clear(ks[:])
}

// start sets the first counter block, nonce || 2, and the tag mask
// E(K, J0), J0 = nonce || 1.
func (g *wide) start(ctr, mask *[16]byte, nonce []byte) {
	copy(ctr[:], nonce)
	ctr[15] = 1
	encryptBlock(&g.rk, mask, ctr)
	ctr[15] = 2
}

// tag finishes GHASH with the lengths block and masks it.
func (g *wide) tag(out []byte, acc, mask *[16]byte, aadLen, textLen int) {
	var lens [16]byte
	binary.BigEndian.PutUint64(lens[:8], uint64(aadLen)*8)
	binary.BigEndian.PutUint64(lens[8:], uint64(textLen)*8)
	ghashBlocks(g.h1(), acc, &lens[0], 1)
	for i := range tagSize {
		out[i] = acc[15-i] ^ mask[i]
	}
}

// sliceForAppend extends in by n bytes: head is the whole result, tail the
// n new bytes.
func sliceForAppend(in []byte, n int) (head, tail []byte) {
	if total := len(in) + n; cap(in) >= total {
		head = in[:total]
	} else {
		head = make([]byte, total)
		copy(head, in)
	}
	tail = head[len(in):]
	return
}

// anyOverlap reports whether x and y share memory.
func anyOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 {
		return false
	}
	x0, x1 := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&x[len(x)-1]))
	y0, y1 := uintptr(unsafe.Pointer(&y[0])), uintptr(unsafe.Pointer(&y[len(y)-1]))
	return x0 <= y1 && y0 <= x1
}

// inexactOverlap reports whether x and y share memory other than at the
// same starting address (in-place use is allowed, any other overlap is
// not).
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	return anyOverlap(x, y)
}
