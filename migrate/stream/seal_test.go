package stream

import (
	"bytes"
	"io"
	"testing"
)

// The encryption layer reuses its chunk buffer: no allocation per chunk on
// either side. testing.AllocsPerRun counts every allocation of the process,
// so a goroutine another test left behind (a deadline firing, a listener
// closing) can add one to a measurement; each side is measured up to three
// times and must allocate nothing in one of them. An allocation per chunk
// would show in all three (16 or 8 per run).
func TestNoPerChunkAllocs(t *testing.T) {
	const attempts = 3
	dir := testKeys(t)
	data := make([]byte, 16*ChunkSize)
	var enc bytes.Buffer
	// Each attempt writes data twice (AllocsPerRun's warm-up and its run),
	// and the reads need one write more: room for all of them and the
	// tags, so the buffer never grows while measured.
	enc.Grow((2*attempts + 2) * len(data) * 9 / 8)
	w, err := NewWriter(&enc, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
	if err != nil {
		t.Fatal(err)
	}
	var a float64
	writes := 0
	for i := 0; i < attempts; i++ {
		a = testing.AllocsPerRun(1, func() { w.Write(data) })
		writes += 2
		if a == 0 {
			break
		}
	}
	if a > 0 {
		t.Errorf("writing 16 chunks: %v allocations in each of %d measurements, want 0", a, attempts)
	}
	// Enough stream for every read attempt (each reads data twice), and
	// one more, so that no measured read reaches the last chunk.
	for ; writes <= 2*attempts; writes++ {
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	r, _, err := NewReader(bytes.NewReader(enc.Bytes()), ReaderOptions{KeyDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32<<10)
	var rerr error
	for i := 0; i < attempts; i++ {
		if a = testing.AllocsPerRun(1, func() {
			for i := 0; i < 16 && rerr == nil; i++ {
				_, rerr = io.ReadFull(r, buf)
			}
		}); a == 0 || rerr != nil {
			break
		}
	}
	if rerr != nil {
		t.Fatalf("reading: %v", rerr)
	}
	if a > 0 {
		t.Errorf("reading 8 chunks: %v allocations in each of %d measurements, want 0", a, attempts)
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
