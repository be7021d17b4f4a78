package stream

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"testing/cryptotest"
)

var updateGolden = flag.Bool("update-golden", false, "rewrite testdata/golden-*.snap with the current writer")

// goldenStreams were written by the hand-written AES-GCM assembly
// (internal/aesgcm) before it was replaced by crypto/cipher: they hold the
// wire format still. Regenerating them (-update-golden) makes the test
// compare the writer with itself; do it only for a deliberate format
// change, which also needs a new stream version.
var goldenStreams = []struct {
	file   string
	cipher string
	size   int
}{
	{"golden-aes-gcm-empty.snap", CipherAESGCM, 0},
	{"golden-aes-gcm-1000.snap", CipherAESGCM, 1000},
	{"golden-aes-gcm-2chunks.snap", CipherAESGCM, 2 * ChunkSize},
	{"golden-aes-gcm-4chunks-1000.snap", CipherAESGCM, 4*ChunkSize + 1000},
	{"golden-chacha20-poly1305-2chunks-1000.snap", CipherChaCha20, 2*ChunkSize + 1000},
}

// goldenKey is the key of the golden streams: golden.key in the returned
// directory.
func goldenKey(t *testing.T) (dir string, k Key) {
	t.Helper()
	b := sha256.Sum256([]byte("pcluster golden stream key"))
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "golden.key"), b[:], 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, Key{Name: "golden.key", Bytes: b[:]}
}

// TestGoldenStreams decodes every golden stream to its plaintext, and
// seals that plaintext again under the key and salt of the stream's header
// (written in uneven pieces and in one piece, 1, 2 and 8 chunks at once):
// the bytes must be the golden body, exactly.
func TestGoldenStreams(t *testing.T) {
	dir, k := goldenKey(t)
	for _, g := range goldenStreams {
		path := filepath.Join("testdata", g.file)
		want := testData(g.size, 13)
		if *updateGolden {
			cryptotest.SetGlobalRandom(t, 13)
			b := encode(t, want, Options{Cipher: Cipher(g.cipher), Key: &k})
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		golden, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := decode(golden, ReaderOptions{KeyDir: dir})
		if err != nil {
			t.Fatalf("%s: decode: %v", g.file, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: decoded %d bytes, not the %d bytes written", g.file, len(got), len(want))
		}

		h, err := ReadHeader(bufio.NewReader(bytes.NewReader(golden)), ownKeys...)
		if err != nil {
			t.Fatal(err)
		}
		body := golden[len(h.raw):]
		for _, depth := range []int{1, 2, 8} {
			for _, pieces := range []string{"uneven", "whole"} {
				sealed := resealGolden(t, &k, h, want, depth, pieces == "whole")
				if !bytes.Equal(sealed, body) {
					at := 0
					for at < min(len(sealed), len(body)) && sealed[at] == body[at] {
						at++
					}
					t.Errorf("%s, depth %d, written %s: sealed body of %d bytes differs from the golden one of %d at byte %d", g.file, depth, pieces, len(sealed), len(body), at)
				}
			}
		}
	}
}

// resealGolden seals plain as NewWriter does, depth chunks at once, under
// the payload key that h's salt and line give.
func resealGolden(t *testing.T, k *Key, h *Header, plain []byte, depth int, whole bool) []byte {
	t.Helper()
	mk, err := k.load()
	if err != nil {
		t.Fatal(err)
	}
	salt, err := hex.DecodeString(h.Get(KeySalt, ""))
	if err != nil {
		t.Fatal(err)
	}
	cipherName := h.Get(KeyEncrypt, "")
	payload, _, err := deriveKeys(mk, cipherName, salt, h.raw)
	if err != nil {
		t.Fatal(err)
	}
	a, err := newAEAD(cipherName, payload)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	w := newSealWriter(a, &out, depth)
	if whole {
		if _, err := w.Write(plain); err != nil {
			t.Fatal(err)
		}
	} else {
		for p, i := plain, 0; len(p) > 0; i++ {
			n := min(len(p), 1+(i*7919)%100000)
			if _, err := w.Write(p[:n]); err != nil {
				t.Fatal(err)
			}
			p = p[n:]
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}
