package stream

import (
	"bytes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
)

// The chunk pipeline (seal.go) against a straightforward sequential
// STREAM written here from the format's description (docs/stream.md):
// same bytes out of the writer at every depth and every write size, same
// plaintext out of the reader at every depth and every read size, and
// errors in stream order.

var testDepths = []int{1, 2, 3, 8}

// referenceSeal seals plain as the format says: chunks of ChunkSize, the
// nonce an 11-byte big-endian counter and a flag byte 1 on the last chunk,
// which is empty only if plain is.
func referenceSeal(a cipher.AEAD, plain []byte) []byte {
	out := make([]byte, 0, len(plain)+(len(plain)/ChunkSize+1)*tagSize)
	for i := uint64(0); ; i++ {
		var nonce [12]byte
		binary.BigEndian.PutUint64(nonce[3:11], i)
		last := len(plain) <= ChunkSize
		if last {
			nonce[11] = 1
		}
		k := min(len(plain), ChunkSize)
		out = a.Seal(out, nonce[:], plain[:k], nil)
		plain = plain[k:]
		if last {
			return out
		}
	}
}

func testAEAD(t testing.TB, cipherName string) cipher.AEAD {
	t.Helper()
	k := sha256.Sum256([]byte("pcluster parallel test key"))
	a, err := newAEAD(cipherName, k[:])
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// sealPieces writes plain through a sealWriter of depth in pieces of ws
// bytes (0: one write).
func sealPieces(t testing.TB, a cipher.AEAD, plain []byte, depth, ws int) []byte {
	t.Helper()
	var out bytes.Buffer
	w := newSealWriter(a, &out, depth)
	if ws == 0 {
		ws = max(len(plain), 1)
	}
	for p := plain; len(p) > 0; {
		n := min(ws, len(p))
		if k, err := w.Write(p[:n]); err != nil || k != n {
			t.Fatalf("write: %d of %d bytes, %v", k, n, err)
		}
		p = p[n:]
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if w.busy != 0 {
		t.Fatalf("%d chunks still sealing after Close", w.busy)
	}
	return out.Bytes()
}

// openPieces reads everything from an openReader of depth in reads of rs
// bytes, returning what it got and the error that ended it (nil at io.EOF).
func openPieces(a cipher.AEAD, sealed []byte, depth, rs int) ([]byte, error) {
	r := newOpenReader(a, bytes.NewReader(sealed), depth)
	var got []byte
	buf := make([]byte, rs)
	for {
		n, err := r.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			if r.busy != 0 {
				return got, fmt.Errorf("%w (and %d chunks still opening)", err, r.busy)
			}
			return got, err
		}
	}
}

func TestPipelineSameAsReference(t *testing.T) {
	for _, c := range []string{CipherAESGCM, CipherChaCha20} {
		a := testAEAD(t, c)
		for _, size := range []int{0, 1, ChunkSize - 1, ChunkSize, ChunkSize + 1, 2 * ChunkSize, 7*ChunkSize + 3, 20 * ChunkSize} {
			plain := testData(size, uint64(size))
			want := referenceSeal(a, plain)
			for _, depth := range testDepths {
				for _, ws := range []int{0, 4096, ChunkSize, ChunkSize + 1, 3*ChunkSize + 7} {
					if got := sealPieces(t, a, plain, depth, ws); !bytes.Equal(got, want) {
						t.Fatalf("%s, %d bytes, depth %d, writes of %d: sealed bytes differ from the reference", c, size, depth, ws)
					}
				}
				for _, rs := range []int{1000, 32 << 10, ChunkSize, 5 * ChunkSize} {
					got, err := openPieces(a, want, depth, rs)
					if err != nil || !bytes.Equal(got, plain) {
						t.Fatalf("%s, %d bytes, depth %d, reads of %d: got %d bytes, %v; want the %d written", c, size, depth, rs, len(got), err, size)
					}
				}
			}
		}
	}
}

// A chunk that fails authentication is reported after every chunk before
// it was returned whole, and under its own number, whatever the depth.
func TestPipelineErrorOrder(t *testing.T) {
	a := testAEAD(t, CipherAESGCM)
	plain := testData(12*ChunkSize+100, 5)
	sealed := referenceSeal(a, plain)
	for _, bad := range []int{0, 1, 5, 11, 12} {
		b := bytes.Clone(sealed)
		b[bad*encChunkSize+100] ^= 1
		for _, depth := range testDepths {
			for _, rs := range []int{1000, ChunkSize, 4 * ChunkSize} {
				got, err := openPieces(a, b, depth, rs)
				want := fmt.Sprintf("chunk %d: ", bad)
				if err == nil || !errors.Is(err, errChunkAuth) || !strings.HasPrefix(err.Error(), want) {
					t.Fatalf("chunk %d altered, depth %d, reads of %d: %v; want %q…", bad, depth, rs, err, want)
				}
				if !bytes.Equal(got, plain[:bad*ChunkSize]) {
					t.Fatalf("chunk %d altered, depth %d, reads of %d: got %d bytes before the error, want the %d before it", bad, depth, rs, len(got), bad*ChunkSize)
				}
			}
		}
	}
}

// failingReader returns its bytes, then err.
type failingReader struct {
	b   []byte
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.b) == 0 {
		return 0, f.err
	}
	n := copy(p, f.b)
	f.b = f.b[n:]
	return n, nil
}

// A read that fails while chunks are being opened is reported after them.
func TestPipelineReadErrorOrder(t *testing.T) {
	a := testAEAD(t, CipherChaCha20)
	plain := testData(10*ChunkSize, 6)
	sealed := referenceSeal(a, plain)
	boom := errors.New("connection reset")
	for _, cut := range []int{encChunkSize / 2, 3*encChunkSize + 1, 6 * encChunkSize} {
		for _, depth := range testDepths {
			r := newOpenReader(a, &failingReader{b: sealed[:cut], err: boom}, depth)
			got, err := io.ReadAll(r)
			// The chunk cut exactly at its end is not known to be
			// whole until the byte after it: the read error comes
			// first.
			whole := (cut - 1) / encChunkSize
			if !errors.Is(err, boom) || !bytes.Equal(got, plain[:whole*ChunkSize]) {
				t.Fatalf("cut at %d, depth %d: %d bytes, %v; want %d bytes, then %v", cut, depth, len(got), err, whole*ChunkSize, boom)
			}
			if r.busy != 0 {
				t.Fatalf("cut at %d, depth %d: %d chunks still opening after the error", cut, depth, r.busy)
			}
		}
	}
}

// failingWriter takes ok writes, then fails.
type failingWriter struct {
	ok  int
	err error
}

func (f *failingWriter) Write(p []byte) (int, error) {
	if f.ok == 0 {
		return 0, f.err
	}
	f.ok--
	return len(p), nil
}

// A failed write sticks, and nothing still seals from the caller's buffer
// when Write returns.
func TestPipelineWriteError(t *testing.T) {
	a := testAEAD(t, CipherAESGCM)
	boom := errors.New("broken pipe")
	plain := testData(16*ChunkSize, 7)
	for _, ok := range []int{0, 1, 3, 9} {
		for _, depth := range testDepths {
			for _, ws := range []int{4096, 5 * ChunkSize} {
				w := newSealWriter(a, &failingWriter{ok: ok, err: boom}, depth)
				var err error
				for p := plain; len(p) > 0 && err == nil; {
					n := min(ws, len(p))
					_, err = w.Write(p[:n])
					p = p[n:]
				}
				if err == nil {
					err = w.Close()
				}
				if !errors.Is(err, boom) {
					t.Fatalf("%d writes then failure, depth %d, writes of %d: %v, want %v", ok, depth, ws, err, boom)
				}
				if w.busy != 0 {
					t.Fatalf("%d writes then failure, depth %d: %d chunks still sealing", ok, depth, w.busy)
				}
				if _, err := w.Write([]byte("x")); !errors.Is(err, boom) {
					t.Fatalf("write after the failure: %v, want %v", err, boom)
				}
				if err := w.Close(); !errors.Is(err, boom) {
					t.Fatalf("Close after the failure: %v, want %v", err, boom)
				}
			}
		}
	}
}

// FuzzSealOpen checks the pipeline against referenceSeal for arbitrary
// plaintext, write and read sizes and depths, and that a stream with one
// byte altered yields the plaintext of the chunks before that byte and
// then an error.
//
//	go test -run '^$' -fuzz FuzzSealOpen -fuzztime 30s ./migrate/stream
func FuzzSealOpen(f *testing.F) {
	f.Add([]byte("hello"), uint32(0), uint16(3), uint16(7), uint8(2), uint32(1))
	f.Add(bytes.Repeat([]byte{0xa5}, 3*ChunkSize+5), uint32(1<<31), uint16(0), uint16(0), uint8(4), uint32(ChunkSize+20))
	f.Fuzz(func(t *testing.T, seed []byte, stretch uint32, ws, rs uint16, depth uint8, flip uint32) {
		// Short inputs cover the first chunk; stretch reaches several.
		plain := seed
		if n := int(stretch % (6 * ChunkSize)); n > len(seed) && len(seed) > 0 {
			plain = bytes.Repeat(seed, n/len(seed)+1)[:n]
		}
		cipherName := CipherAESGCM
		if depth&0x80 != 0 {
			cipherName = CipherChaCha20
		}
		d := int(depth&0x7f)%maxWorkers + 1
		a := testAEAD(t, cipherName)
		want := referenceSeal(a, plain)
		w := int(ws) * 16 // 0: one write
		if got := sealPieces(t, a, plain, d, w); !bytes.Equal(got, want) {
			t.Fatalf("%s, %d bytes, depth %d, writes of %d: sealed bytes differ from the reference", cipherName, len(plain), d, w)
		}
		r := int(rs)*16 + 1
		got, err := openPieces(a, want, d, r)
		if err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("%s, %d bytes, depth %d, reads of %d: %d bytes, %v", cipherName, len(plain), d, r, len(got), err)
		}
		at := int(flip % uint32(len(want)))
		b := bytes.Clone(want)
		b[at] ^= 1
		got, err = openPieces(a, b, d, r)
		bad := at / encChunkSize
		if err == nil || !bytes.Equal(got, plain[:bad*ChunkSize]) {
			t.Fatalf("%s, byte %d of %d altered, depth %d, reads of %d: %d bytes, %v; want the %d bytes before chunk %d, then an error", cipherName, at, len(want), d, r, len(got), err, bad*ChunkSize, bad)
		}
	})
}

// Write may not return while a chunk is still being sealed from the
// caller's buffer: the caller reuses it at once, as bufio.Writer does.
func TestPipelineWriteReusesBuffer(t *testing.T) {
	a := testAEAD(t, CipherAESGCM)
	plain := testData(40*ChunkSize+9, 8)
	want := referenceSeal(a, plain)
	for _, depth := range testDepths {
		var out bytes.Buffer
		w := newSealWriter(a, &out, depth)
		buf := make([]byte, 4*ChunkSize+3)
		for p := plain; len(p) > 0; {
			n := copy(buf, p)
			if _, err := w.Write(buf[:n]); err != nil {
				t.Fatal(err)
			}
			for i := range buf {
				buf[i] = 0xff
			}
			p = p[n:]
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), want) {
			t.Fatalf("depth %d: sealed bytes differ from the reference", depth)
		}
	}
}

// At any depth the pipeline allocates nothing per chunk once its ring is
// made (TestNoPerChunkAllocs covers the depth this host picks): starting a
// crew goroutine reuses a made closure. As there, a stray goroutine of
// another test can add an allocation: the best of three counts.
func TestPipelineNoPerChunkAllocs(t *testing.T) {
	a := testAEAD(t, CipherAESGCM)
	data := testData(16*ChunkSize, 9)
	sealed := referenceSeal(a, data)
	buf := make([]byte, 32<<10)
	for _, depth := range []int{2, 4} {
		w := newSealWriter(a, io.Discard, depth)
		best := -1.0
		for i := 0; i < 3 && best != 0; i++ {
			n := testing.AllocsPerRun(2, func() {
				if _, err := w.Write(data); err != nil {
					t.Fatal(err)
				}
			})
			if best < 0 || n < best {
				best = n
			}
		}
		if best != 0 {
			t.Errorf("depth %d: writing 16 chunks: %v allocations, want 0", depth, best)
		}
		best = -1
		for i := 0; i < 3 && best != 0; i++ {
			r := newOpenReader(a, bytes.NewReader(sealed), depth)
			io.ReadFull(r, buf) // the ring is made as chunks arrive
			n := testing.AllocsPerRun(1, func() {
				for k := 0; k < 8; k++ {
					if _, err := io.ReadFull(r, buf); err != nil {
						t.Fatal(err)
					}
				}
			})
			if best < 0 || n < best {
				best = n
			}
		}
		if best != 0 {
			t.Errorf("depth %d: reading 8 chunks: %v allocations, want 0", depth, best)
		}
	}
}
