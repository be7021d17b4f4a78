package stream

import (
	"bytes"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// fuzzKeyDir holds one key derived from a fixed string, so that seeds and
// crashers reproduce.
func fuzzKeyDir(f *testing.F) string {
	dir := f.TempDir()
	k := sha256.Sum256([]byte("pcluster fuzz key"))
	if err := os.WriteFile(filepath.Join(dir, "fuzz.key"), k[:], 0o600); err != nil {
		f.Fatal(err)
	}
	return dir
}

// FuzzReader feeds arbitrary bytes to NewReader: it must return an error or
// data, never panic, hang or allocate without bound.
//
//	go test -run '^$' -fuzz FuzzReader -fuzztime 30s -fuzzminimizetime 1s ./migrate/stream
func FuzzReader(f *testing.F) {
	dir := fuzzKeyDir(f)
	for _, c := range compressions {
		for _, e := range ciphers {
			f.Add(encode(f, testData(3000, 1), opts(c, encryptOpt(dir, e, "fuzz.key"))))
		}
	}
	f.Add(encode(f, testData(ChunkSize+10, 2), opts("", encryptOpt(dir, CipherAESGCM, "fuzz.key"))))
	f.Add([]byte("PCLUSTER-SNAPSHOT 1 compress=none encrypt=none\n"))
	f.Add([]byte("PCLUSTER-SNAPSHOT 2\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, _, err := NewReader(bytes.NewReader(data), ReaderOptions{KeyDir: dir, Known: []string{"records"}})
		if err != nil {
			return
		}
		defer r.Close()
		// A small input may not expand beyond reason (zstd window limit).
		n, _ := io.Copy(io.Discard, io.LimitReader(r, 256<<20))
		if n == 256<<20 {
			t.Errorf("%d input bytes decode to more than 256 MiB", len(data))
		}
	})
}
