package image

import (
	"errors"
	"hash/crc32"
)

// A restore need not checksum the stream on the goroutine that reads it:
// the CRC-32C of the snapshot (the end record's) is the CRC of the pieces
// joined in order, and the CRC of two pieces joined follows from theirs
// and the second one's length (zlib's crc32_combine). So a reader may
// hand a large piece of page data to whoever consumes it, who checksums
// it there (on another core, while the bytes are still in its cache), and
// the Decoder joins the sums before it compares them with the end record.

// castagnoliRev is the Castagnoli polynomial, bit-reversed (as
// hash/crc32 uses it).
const castagnoliRev = crc32.Castagnoli

// x2n[k] is x^(2^k) modulo the polynomial.
var x2n = func() (t [32]uint32) {
	p := uint32(1) << 30 // x^1
	t[0] = p
	for k := 1; k < 32; k++ {
		p = multModP(p, p)
		t[k] = p
	}
	return t
}()

// multModP returns a(x) * b(x) modulo the polynomial, bits reversed.
func multModP(a, b uint32) uint32 {
	m := uint32(1) << 31
	p := uint32(0)
	for {
		if a&m != 0 {
			p ^= b
			if a&(m-1) == 0 {
				return p
			}
		}
		m >>= 1
		if b&1 != 0 {
			b = b>>1 ^ castagnoliRev
		} else {
			b >>= 1
		}
	}
}

// x8nModP returns x^(8n) modulo the polynomial.
func x8nModP(n uint64) uint32 {
	p := uint32(1) << 31 // x^0
	for k := 3; n != 0; k++ {
		if n&1 != 0 {
			p = multModP(x2n[k&31], p)
		}
		n >>= 1
	}
	return p
}

// CRCJoin returns the CRC-32C of a followed by b, given a's CRC, b's CRC
// and b's length.
func CRCJoin(crcA, crcB uint32, lenB uint64) uint32 {
	return multModP(x8nModP(lenB), crcA) ^ crcB
}

// CRC returns the CRC-32C of p, the sum a DeferredSum is given.
func CRC(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// A DeferredSum is the checksum of page data that ReadDataDeferred left
// to its caller: Set gives it (CRC of exactly those bytes), once.
type DeferredSum struct {
	crc  uint32
	n    uint64
	done chan struct{}
}

// Set records crc as the CRC-32C of the bytes the sum stands for.
func (s *DeferredSum) Set(crc uint32) {
	s.crc = crc
	close(s.done)
}

// segment is a piece of the body in order: its CRC, or the deferred sum
// that will give it, and its length.
type segment struct {
	crc uint32
	n   uint64
	def *DeferredSum
}

// errNoSum is the end check's error when the deferred sums were given up.
var errNoSum = errors.New("checksum: page data was not summed (restore given up)")
