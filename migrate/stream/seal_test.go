package stream

import (
	"bytes"
	"io"
	"testing"
)

// The encryption layer reuses its chunk buffer: no allocation per chunk on
// either side.
func TestNoPerChunkAllocs(t *testing.T) {
	dir := testKeys(t)
	data := make([]byte, 16*ChunkSize)
	var enc bytes.Buffer
	enc.Grow(2 * len(data))
	w, err := NewWriter(&enc, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
	if err != nil {
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(1, func() { w.Write(data) }); a > 0 {
		t.Errorf("writing 16 chunks: %v allocations, want 0", a)
	}
	w.Close()
	r, _, err := NewReader(bytes.NewReader(enc.Bytes()), ReaderOptions{KeyDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32<<10)
	if a := testing.AllocsPerRun(1, func() {
		for i := 0; i < 16; i++ {
			io.ReadFull(r, buf)
		}
	}); a > 0 {
		t.Errorf("reading 8 chunks: %v allocations, want 0", a)
	}
}

// Whole chunks are sealed straight from the caller's buffer and opened
// straight into it when it is large enough; every mix of write and read
// sizes gives back the same bytes.
func TestDirectChunks(t *testing.T) {
	dir := testKeys(t)
	for _, size := range []int{0, 1, ChunkSize - 1, ChunkSize, ChunkSize + 1, 3*ChunkSize + 5, 4 * ChunkSize} {
		data := make([]byte, size)
		for i := range data {
			data[i] = byte(i*7 + i>>16)
		}
		for _, ws := range []int{1000, ChunkSize, ChunkSize + 1, 5 * ChunkSize} {
			var enc bytes.Buffer
			w, err := NewWriter(&enc, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
			if err != nil {
				t.Fatal(err)
			}
			for p := data; len(p) > 0; {
				n := min(ws, len(p))
				if _, err := w.Write(p[:n]); err != nil {
					t.Fatal(err)
				}
				p = p[n:]
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			for _, rs := range []int{1, 32 << 10, ChunkSize, 3 * ChunkSize} {
				if rs == 1 && size > 2*ChunkSize {
					continue
				}
				r, _, err := NewReader(bytes.NewReader(enc.Bytes()), ReaderOptions{KeyDir: dir})
				if err != nil {
					t.Fatal(err)
				}
				var got []byte
				buf := make([]byte, rs)
				for {
					n, err := r.Read(buf)
					got = append(got, buf[:n]...)
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatalf("size %d, writes of %d, reads of %d: %v", size, ws, rs, err)
					}
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("size %d, writes of %d, reads of %d: bytes differ", size, ws, rs)
				}
			}
		}
	}
}

// A chunk that fails authentication while being opened straight into the
// caller's buffer leaves none of its plaintext there.
func TestDirectOpenTamperedLeavesNothing(t *testing.T) {
	dir := testKeys(t)
	for _, c := range []string{CipherAESGCM, CipherChaCha20} {
		t.Run(c, func(t *testing.T) { directOpenTampered(t, dir, c) })
	}
}

func directOpenTampered(t *testing.T, dir, cipherName string) {
	data := bytes.Repeat([]byte("secret page "), 3*ChunkSize/12)
	var enc bytes.Buffer
	w, err := NewWriter(&enc, opts("", encryptOpt(dir, cipherName, "k1.key")))
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	w.Close()
	b := enc.Bytes()
	b[len(b)-encChunkSize-encChunkSize/2] ^= 1 // inside the second of three chunks
	r, _, err := NewReader(bytes.NewReader(b), ReaderOptions{KeyDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2*ChunkSize)
	n, err := r.Read(buf)
	if err != nil || n != ChunkSize {
		t.Fatalf("first chunk: %d bytes, %v", n, err)
	}
	clear(buf)
	n, err = r.Read(buf)
	if err == nil || n != 0 {
		t.Fatalf("tampered chunk: %d bytes, %v; want an error", n, err)
	}
	if bytes.Contains(buf, []byte("secret")) {
		t.Fatal("tampered chunk: plaintext left in the caller's buffer")
	}
}
