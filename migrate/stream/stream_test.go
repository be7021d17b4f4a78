package stream

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var (
	compressions = []string{"none", "auto", "gzip", "flate", "snappy", "zstd"}
	ciphers      = []string{"none", CipherAESGCM, CipherChaCha20}
)

// testKeys makes a key directory with two keys, k1.key and k2.key.
func testKeys(t testing.TB) (dir string) {
	t.Helper()
	dir = t.TempDir()
	for _, name := range []string{"k1.key", "k2.key"} {
		k := make([]byte, KeySize)
		rand.Read(k)
		if err := os.WriteFile(filepath.Join(dir, name), k, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// opts parses -compress and -encrypt values as the tools do; the tests
// give it only valid ones.
func opts(compress, encrypt string) Options {
	o, err := ParseOptions(compress, encrypt)
	if err != nil {
		panic(err)
	}
	return o
}

func encryptOpt(dir, cipherName, keyName string) string {
	if cipherName == "none" {
		return "none"
	}
	return cipherName + ":" + filepath.Join(dir, keyName)
}

// testData returns n bytes that compress somewhat: records with repeats.
func testData(n int, seed uint64) []byte {
	r := mrand.New(mrand.NewPCG(seed, 1))
	var b bytes.Buffer
	for b.Len() < n {
		if r.IntN(3) == 0 {
			p := make([]byte, r.IntN(5000))
			for i := range p {
				p[i] = byte(r.Uint32())
			}
			b.Write(p)
		} else {
			fmt.Fprintf(&b, "record %d: %s\n", r.IntN(1000), strings.Repeat("x", r.IntN(300)))
		}
	}
	return b.Bytes()[:n]
}

// encode writes data through NewWriter into a buffer, in uneven pieces.
func encode(t testing.TB, data []byte, opt Options) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := NewWriter(&out, opt)
	if err != nil {
		t.Fatal(err)
	}
	for p, i := data, 0; len(p) > 0; i++ {
		n := min(len(p), 1+(i*7919)%100000)
		if _, err := w.Write(p[:n]); err != nil {
			t.Fatal(err)
		}
		p = p[n:]
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func decode(stream []byte, opt ReaderOptions) ([]byte, *Header, error) {
	r, h, err := NewReader(bytes.NewReader(stream), opt)
	if err != nil {
		return nil, nil, err
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	return got, h, err
}

func TestRoundTripLayers(t *testing.T) {
	dir := testKeys(t)
	sizes := []int{0, 1, ChunkSize - 1, ChunkSize, ChunkSize + 1, 2 * ChunkSize, 3*ChunkSize + 12345}
	for _, c := range compressions {
		for _, e := range ciphers {
			for _, n := range sizes {
				t.Run(fmt.Sprintf("%s/%s/%d", c, e, n), func(t *testing.T) {
					data := testData(n, uint64(n))
					o := opts(c, encryptOpt(dir, e, "k1.key"))
					o.Params = map[string]string{"records": "msgpack1"}
					s := encode(t, data, o)
					got, h, err := decode(s, ReaderOptions{KeyDir: dir, RequireEncryption: e != "none", Known: []string{"records"}})
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, data) {
						t.Fatalf("got %d bytes, want %d (content differs)", len(got), len(data))
					}
					wire := c
					if c == CompressAuto {
						wire = CompressSnappy // the format auto writes
					}
					if h.Get(KeyCompress, "") != wire || h.Get(KeyEncrypt, "") != e || h.Get("records", "") != "msgpack1" {
						t.Errorf("header %q does not describe the layers", h.String())
					}
					if c == "none" && e == "none" && !bytes.Equal(s[len(h.String()):], data) {
						t.Errorf("with no layers the body is not the raw record stream")
					}
				})
			}
		}
	}
}

func TestCompressLevels(t *testing.T) {
	data := testData(300000, 7)
	for _, c := range []string{"gzip:9", "flate:5", "zstd:1", "zstd:3", "zstd:19"} {
		s := encode(t, data, opts(c, ""))
		got, _, err := decode(s, ReaderOptions{})
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("%s: round trip failed: %v", c, err)
		}
		if !strings.HasPrefix(string(s), "PCLUSTER-SNAPSHOT 1 compress="+strings.Split(c, ":")[0]+" ") {
			t.Errorf("%s: header %q", c, strings.SplitN(string(s), "\n", 2)[0])
		}
	}
}

func TestRefusedModes(t *testing.T) {
	dir := testKeys(t)
	short := filepath.Join(dir, "short.key")
	os.WriteFile(short, []byte("0123456789"), 0o600)
	long := filepath.Join(dir, "long.key")
	os.WriteFile(long, make([]byte, 33), 0o600)
	cases := []struct {
		compress, encrypt string
		want              string
	}{
		{"", "AES-CTR:" + dir + "/k1.key", "unauthenticated stream cipher"},
		{"", "AES-CFB:x", "use aes-gcm:KEYFILE"},
		{"", "aes-ofb:x", "refused"},
		{"", "rot13:x", "unknown encryption"},
		{"", "aes-gcm", "needs a key file"},
		{"", "aes-gcm:" + short, "holds 10 bytes, want exactly 32"},
		{"", "aes-gcm:" + long, "longer than 32 bytes"},
		{"", "aes-gcm:/nonexistent/k.key", "stream: open key aes-gcm:/nonexistent/k.key: "},
		{"lz4", "", "unknown compression"},
		{"zstd:99", "", "level must be"},
		{"snappy:3", "", "takes no level"},
	}
	for _, c := range cases {
		_, err := ParseOptions(c.compress, c.encrypt)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseOptions(%q, %q): got %v, want an error containing %q", c.compress, c.encrypt, err, c.want)
			continue
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("error is more than one line: %q", err)
		}
	}
	// The same rules hold for options built by a program.
	good := make([]byte, KeySize)
	typed := []struct {
		opt  Options
		want string
	}{
		{Options{Params: map[string]string{"salt": "x"}}, "reserved"},
		{Options{Codec: Codec{Name: "lz4"}}, "unknown compression"},
		{Options{Codec: Codec{Name: CompressZstd, Level: 99}}, "level must be"},
		{Options{Codec: Codec{Name: CompressSnappy, Level: 3}}, "takes no level"},
		{Options{Cipher: "aes-ctr", Key: &Key{Name: "k", Bytes: good}}, "unknown encryption"},
		{Options{Cipher: CipherAESGCM}, "needs a key"},
		{Options{Key: &Key{Name: "k", Bytes: good}}, "given without encryption"},
		{Options{Cipher: CipherAESGCM, Key: &Key{Name: "k", Bytes: good[:10]}}, "holds 10 bytes, want exactly 32"},
		{Options{Cipher: CipherAESGCM, Key: &Key{Name: "../k", Bytes: good}}, "cannot go on the header line"},
	}
	for _, c := range typed {
		_, err := NewWriter(io.Discard, c.opt)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("NewWriter(%+v): got %v, want an error containing %q", c.opt, err, c.want)
		}
	}
}

// mustFail decodes s and fails the test if that works.
func mustFail(t *testing.T, what string, s []byte, opt ReaderOptions) error {
	t.Helper()
	got, _, err := decode(s, opt)
	if err == nil {
		t.Errorf("%s: accepted (%d bytes), want an error", what, len(got))
	}
	return err
}

func TestTamper(t *testing.T) {
	dir := testKeys(t)
	for _, c := range compressions {
		for _, e := range ciphers[1:] {
			t.Run(c+"/"+e, func(t *testing.T) {
				data := testData(4*ChunkSize+777, 3)
				if c == "none" {
					data = data[:4*ChunkSize+777]
				}
				s := encode(t, data, opts(c, encryptOpt(dir, e, "k1.key")))
				opt := ReaderOptions{KeyDir: dir, RequireEncryption: true}
				hlen := bytes.IndexByte(s, '\n') + 1
				body := s[hlen:]
				nChunks := (len(body) + encChunkSize - 1) / encChunkSize

				// Every byte of the header.
				for i := 0; i < hlen; i++ {
					m := bytes.Clone(s)
					m[i] ^= 0x01
					mustFail(t, fmt.Sprintf("header byte %d flipped", i), m, opt)
				}
				// First, middle and last chunk; first and last byte of each.
				for _, ci := range []int{0, nChunks / 2, nChunks - 1} {
					for _, off := range []int{0, encChunkSize/2 - 1, encChunkSize - 1} {
						i := hlen + ci*encChunkSize + off
						if i >= len(s) {
							i = len(s) - 1
						}
						m := bytes.Clone(s)
						m[i] ^= 0x80
						mustFail(t, fmt.Sprintf("chunk %d byte %d flipped", ci, off), m, opt)
					}
				}
				// Truncation everywhere interesting and at a stride.
				cuts := []int{0, 1, hlen - 1, hlen, hlen + 1, len(s) - 1}
				for ci := 1; ci < nChunks; ci++ {
					cuts = append(cuts, hlen+ci*encChunkSize-1, hlen+ci*encChunkSize, hlen+ci*encChunkSize+1)
				}
				for i := hlen; i < len(s); i += 4099 {
					cuts = append(cuts, i)
				}
				for _, n := range cuts {
					mustFail(t, fmt.Sprintf("truncated to %d of %d", n, len(s)), s[:n], opt)
				}
				if nChunks >= 3 {
					chunk := func(i int) []byte { return body[i*encChunkSize : (i+1)*encChunkSize] }
					// Reorder chunks 0 and 1.
					m := append(append(append([]byte{}, s[:hlen]...), chunk(1)...), chunk(0)...)
					m = append(m, body[2*encChunkSize:]...)
					mustFail(t, "chunks 0 and 1 swapped", m, opt)
					// Duplicate chunk 1 (replay).
					m = append(append([]byte{}, s[:hlen+2*encChunkSize]...), chunk(1)...)
					m = append(m, body[2*encChunkSize:]...)
					mustFail(t, "chunk 1 duplicated", m, opt)
					// Drop a middle chunk.
					m = append(append([]byte{}, s[:hlen+encChunkSize]...), body[2*encChunkSize:]...)
					mustFail(t, "chunk 1 dropped", m, opt)
				}
				// Trailing data.
				mustFail(t, "trailing byte", append(bytes.Clone(s), 0), opt)
				mustFail(t, "stream repeated", append(bytes.Clone(s), s...), opt)
				// Chunks of another stream with the same key.
				s2 := encode(t, data, opts(c, encryptOpt(dir, e, "k1.key")))
				mustFail(t, "header of another stream", append(bytes.Clone(s2[:hlen]), body...), opt)
			})
		}
	}
}

func TestErrorsStick(t *testing.T) {
	dir := testKeys(t)
	data := testData(3*ChunkSize, 1)
	s := encode(t, data, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
	hlen := bytes.IndexByte(s, '\n') + 1
	s[hlen+encChunkSize+5] ^= 1 // chunk 1
	r, _, err := NewReader(bytes.NewReader(s), ReaderOptions{KeyDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	if err == nil || !strings.Contains(err.Error(), "chunk 1") {
		t.Fatalf("got %v, want a chunk 1 authentication error", err)
	}
	if len(got) != ChunkSize {
		t.Errorf("got %d bytes before the error, want exactly the verified chunk 0 (%d)", len(got), ChunkSize)
	}
	for i := 0; i < 3; i++ {
		if _, err2 := r.Read(make([]byte, 10)); err2 == nil || err2.Error() != err.Error() {
			t.Errorf("read after error: got %v, want %v", err2, err)
		}
	}
}

func TestKeyLookup(t *testing.T) {
	dir := testKeys(t)
	data := testData(100000, 2)
	s := encode(t, data, opts("zstd", encryptOpt(dir, CipherChaCha20, "k1.key")))

	// Renamed key: found by ID.
	other := t.TempDir()
	k1, _ := os.ReadFile(filepath.Join(dir, "k1.key"))
	k2, _ := os.ReadFile(filepath.Join(dir, "k2.key"))
	os.WriteFile(filepath.Join(other, "renamed"), k1, 0o600)
	os.WriteFile(filepath.Join(other, "notes.txt"), []byte("hello"), 0o600)
	if got, _, err := decode(s, ReaderOptions{KeyDir: other}); err != nil || !bytes.Equal(got, data) {
		t.Errorf("key renamed: got %v", err)
	}
	// Wrong key under the right name.
	wrong := t.TempDir()
	os.WriteFile(filepath.Join(wrong, "k1.key"), k2, 0o600)
	err := mustFail(t, "wrong key", s, ReaderOptions{KeyDir: wrong})
	if err != nil && !strings.Contains(err.Error(), "wrong key") {
		t.Errorf("wrong key: got %q, want it to say wrong key", err)
	}
	// No key at all.
	err = mustFail(t, "no key in dir", s, ReaderOptions{KeyDir: t.TempDir()})
	if err != nil && !strings.Contains(err.Error(), "no key named k1.key") {
		t.Errorf("missing key: got %q", err)
	}
	err = mustFail(t, "no key dir", s, ReaderOptions{})
	if err != nil && !strings.Contains(err.Error(), "no key directory") {
		t.Errorf("no key dir: got %q", err)
	}
	// Same key ID claimed but different key bytes cannot happen by accident;
	// a forged keyid pointing at another key fails authentication.
	hlen := bytes.IndexByte(s, '\n') + 1
	line := string(s[:hlen])
	forged := strings.Replace(line, "keyid="+KeyID(k1), "keyid="+KeyID(k2), 1)
	forged = strings.Replace(forged, "key=k1.key", "key=k2.key", 1)
	mustFail(t, "header forged to name another key", append([]byte(forged), s[hlen:]...), ReaderOptions{KeyDir: dir})
	// Path traversal in the key name is never followed.
	trav := strings.Replace(line, "key=k1.key", "key=../k1.key", 1)
	mustFail(t, "key name with a path", append([]byte(trav), s[hlen:]...), ReaderOptions{KeyDir: other})
}

func TestPlaintextRefused(t *testing.T) {
	s := encode(t, []byte("hello"), opts("gzip", ""))
	err := mustFail(t, "plaintext", s, ReaderOptions{KeyDir: t.TempDir(), RequireEncryption: true})
	if err != nil && !strings.Contains(err.Error(), "not encrypted") {
		t.Errorf("got %q", err)
	}
	// Downgrade: an encrypted stream relabelled as plaintext.
	dir := testKeys(t)
	s = encode(t, testData(1000, 1), opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
	hlen := bytes.IndexByte(s, '\n') + 1
	m := append([]byte("PCLUSTER-SNAPSHOT 1 compress=none encrypt=none\n"), s[hlen:]...)
	mustFail(t, "encrypted stream relabelled plaintext", m, ReaderOptions{KeyDir: dir, RequireEncryption: true})
}

func TestGarbage(t *testing.T) {
	dir := testKeys(t)
	r := mrand.New(mrand.NewPCG(1, 2))
	for i := 0; i < 200; i++ {
		g := make([]byte, r.IntN(3000))
		for j := range g {
			g[j] = byte(r.Uint32())
		}
		switch i % 3 {
		case 1:
			g = append([]byte("PCLUSTER-SNAPSHOT 1 compress=gzip encrypt=none\n"), g...)
		case 2:
			g = append([]byte("PCLUSTER-SNAPSHOT 1 compress=none encrypt=aes-gcm key=k1.key keyid=0000000000000000 salt=00000000000000000000000000000000\n"), g...)
		}
		mustFail(t, fmt.Sprintf("garbage %d", i), g, ReaderOptions{KeyDir: dir})
	}
	mustFail(t, "empty", nil, ReaderOptions{})
	err := mustFail(t, "not a snapshot", []byte("GET / HTTP/1.1\r\n"), ReaderOptions{})
	if !errors.Is(err, ErrNotSnapshot) {
		t.Errorf("got %v, want ErrNotSnapshot", err)
	}
}
