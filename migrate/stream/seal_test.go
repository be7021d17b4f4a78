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
	w, err := NewWriter(&enc, Options{Encrypt: encryptOpt(dir, CipherAESGCM, "k1.key")})
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
