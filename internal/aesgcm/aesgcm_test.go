package aesgcm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/fips140"
	"crypto/rand"
	"encoding/binary"
	mrand "math/rand/v2"
	"testing"
)

func needWide(t testing.TB) {
	if !accelerated {
		t.Skip("this CPU has no VAES/VPCLMULQDQ: New uses crypto/cipher")
	}
}

func pair(t testing.TB, key []byte) (got, want cipher.AEAD) {
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	want, err = cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return newWide(key), want
}

func random(r *mrand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// The key schedule: one block through our round keys against crypto/aes.
func TestKeySchedule(t *testing.T) {
	needWide(t)
	r := mrand.New(mrand.NewPCG(9, 10))
	for range 100 {
		key := random(r, 32)
		b, _ := aes.NewCipher(key)
		g := newWide(key)
		var in, got, want [16]byte
		copy(in[:], random(r, 16))
		encryptBlock(&g.rk, &got, &in)
		b.Encrypt(want[:], in[:])
		if got != want {
			t.Fatalf("key %x: block %x, want %x", key, got, want)
		}
		for i := range 15 {
			if [16]byte(g.rk[32*i:]) != [16]byte(g.rk[32*i+16:]) {
				t.Fatalf("round key %d differs between lanes", i)
			}
		}
	}
}

// Every length up to a few units, every alignment of the tail, with and
// without additional data: the same bytes as crypto/cipher, and Open
// returns the plaintext.
func TestSameAsCryptoCipher(t *testing.T) {
	needWide(t)
	r := mrand.New(mrand.NewPCG(1, 2))
	lengths := []int{}
	for n := 0; n <= 1100; n++ {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, 4096, piece-1, piece, piece+1, piece+255, piece+256, 3*piece+77, 1<<20+5)
	for i, n := range lengths {
		key := random(r, 32)
		got, want := pair(t, key)
		nonce := random(r, 12)
		aad := random(r, []int{0, 0, 1, 13, 16, 17, 40, 300}[i%8])
		pt := random(r, n)
		g := got.Seal(nil, nonce, pt, aad)
		w := want.Seal(nil, nonce, pt, aad)
		if !bytes.Equal(g, w) {
			t.Fatalf("len %d aad %d: Seal differs from crypto/cipher", n, len(aad))
		}
		back, err := got.Open(nil, nonce, g, aad)
		if err != nil || !bytes.Equal(back, pt) {
			t.Fatalf("len %d: Open = %v", n, err)
		}
	}
}

// Seal and Open in place and appending to a prefix, as the stream does.
func TestInPlaceAndAppend(t *testing.T) {
	needWide(t)
	r := mrand.New(mrand.NewPCG(3, 4))
	key := random(r, 32)
	got, want := pair(t, key)
	nonce := random(r, 12)
	for _, n := range []int{0, 5, 128, 1000, piece} {
		pt := random(r, n)
		buf := make([]byte, n, n+tagSize)
		copy(buf, pt)
		sealed := got.Seal(buf[:0], nonce, buf, nil)
		if !bytes.Equal(sealed, want.Seal(nil, nonce, pt, nil)) {
			t.Fatalf("len %d: in-place Seal differs", n)
		}
		opened, err := got.Open(sealed[:0], nonce, sealed, nil)
		if err != nil || !bytes.Equal(opened, pt) {
			t.Fatalf("len %d: in-place Open = %v", n, err)
		}
		prefix := []byte("prefix")
		out := got.Seal(append([]byte{}, prefix...), nonce, pt, prefix)
		if !bytes.HasPrefix(out, prefix) || !bytes.Equal(out[len(prefix):], want.Seal(nil, nonce, pt, prefix)) {
			t.Fatalf("len %d: appending Seal differs", n)
		}
	}
}

// A nonce inside the output, as crypto/cipher allows, gives the same
// bytes; output overlapping the input other than in place, or the
// additional data, panics as it does there.
func TestOverlaps(t *testing.T) {
	needWide(t)
	r := mrand.New(mrand.NewPCG(11, 12))
	got, want := pair(t, random(r, 32))
	pt := random(r, 700)
	buf := random(r, 800)
	nonce := append([]byte{}, buf[:12]...)
	w := want.Seal(nil, nonce, pt, nil)
	if g := got.Seal(buf[:0], buf[:12], pt, nil); !bytes.Equal(g, w) {
		t.Fatal("nonce inside the output: Seal differs from crypto/cipher")
	}
	sealed := append(make([]byte, 0, 800), w...)
	copy(sealed[:12], nonce)
	scratch := append(make([]byte, 0, 800), w...)
	copy(buf, nonce)
	back, err := got.Open(buf[:0], buf[:12], scratch, nil)
	if err != nil || !bytes.Equal(back, pt) {
		t.Fatalf("nonce inside the output: Open = %v", err)
	}
	mustPanic := func(name string, f func()) {
		t.Helper()
		defer func() {
			if recover() == nil {
				t.Errorf("%s: no panic", name)
			}
		}()
		f()
	}
	c := want.Seal(make([]byte, 0, 2000), nonce, pt, nil)
	mustPanic("Open into the tag", func() { got.Open(c[len(c)-tagSize:len(c)-tagSize], nonce, c, nil) })
	mustPanic("Open shifted by one", func() { got.Open(c[1:1], nonce, c, nil) })
	p := append(make([]byte, 0, 2000), pt...)
	mustPanic("Seal shifted by one", func() { got.Seal(p[1:1], nonce, p, nil) })
	aad := make([]byte, 100, 1000)
	mustPanic("Seal over the additional data", func() { got.Seal(aad[:0], nonce, pt, aad) })
}

// Any flipped bit, in the text, the tag or the additional data, and a
// wrong nonce fail, and Open leaves no plaintext behind.
func TestTamper(t *testing.T) {
	needWide(t)
	r := mrand.New(mrand.NewPCG(5, 6))
	got, _ := pair(t, random(r, 32))
	nonce := random(r, 12)
	pt := random(r, 1000)
	aad := []byte("header")
	sealed := got.Seal(nil, nonce, pt, aad)
	for _, bit := range []int{0, 7, 8 * 500, 8*999 + 3, 8 * 1000, 8*len(sealed) - 1} {
		c := append([]byte{}, sealed...)
		c[bit/8] ^= 1 << (bit % 8)
		dst := make([]byte, 0, len(c))
		if _, err := got.Open(dst, nonce, c, aad); err == nil {
			t.Fatalf("bit %d flipped: Open succeeded", bit)
		}
		if !bytes.Equal(dst[:cap(dst)-tagSize], make([]byte, cap(dst)-tagSize)) {
			t.Fatalf("bit %d flipped: plaintext left in dst", bit)
		}
	}
	if _, err := got.Open(nil, nonce, sealed, []byte("headeR")); err == nil {
		t.Fatal("other additional data: Open succeeded")
	}
	other := append([]byte{}, nonce...)
	other[11] ^= 1
	if _, err := got.Open(nil, other, sealed, aad); err == nil {
		t.Fatal("other nonce: Open succeeded")
	}
	if _, err := got.Open(nil, nonce, sealed[:tagSize-1], aad); err == nil {
		t.Fatal("short input: Open succeeded")
	}
}

// The 32-bit counter wraps as inc32 does, leaving the nonce alone, inside
// the assembly's units and across its tail.
func TestCounterWraps(t *testing.T) {
	needWide(t)
	r := mrand.New(mrand.NewPCG(7, 8))
	key := random(r, 32)
	b, _ := aes.NewCipher(key)
	g := newWide(key)
	for _, start := range []uint32{0xfffffffa, 0xffffffff, 0xfffffff0, 0xfffffff9} {
		var ctr [16]byte
		copy(ctr[:], random(r, 12))
		binary.BigEndian.PutUint32(ctr[12:], start)
		want := make([]byte, 3*unit+48)
		c := ctr
		for off := 0; off < len(want); off += 16 {
			b.Encrypt(want[off:off+16], c[:])
			binary.BigEndian.PutUint32(c[12:], binary.BigEndian.Uint32(c[12:])+1)
		}
		want = want[:3*unit+40]
		got := make([]byte, len(want))
		var acc [16]byte
		g.crypt(&acc, &ctr, got, make([]byte, len(want)), false)
		if !bytes.Equal(got, want) {
			t.Fatalf("counter from %#x: key stream differs", start)
		}
		if ctr != c {
			t.Fatalf("counter from %#x: ends at %x, want %x", start, ctr, c)
		}
	}
}

func TestNewFallsBack(t *testing.T) {
	a, err := New(make([]byte, 16))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := a.(*wide); ok {
		t.Fatal("AES-128 key: got the AES-256 implementation")
	}
	if _, err := New(make([]byte, 31)); err == nil {
		t.Fatal("31-byte key accepted")
	}
	a, err = New(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := a.(*wide); ok != (accelerated && !fips140.Enabled()) {
		t.Fatalf("32-byte key: wide %v, accelerated %v, FIPS 140-3 mode %v", ok, accelerated, fips140.Enabled())
	}
	t.Logf("implementation: %s", Implementation())
}

func FuzzSameAsCryptoCipher(f *testing.F) {
	if !accelerated {
		f.Skip("no VAES/VPCLMULQDQ")
	}
	f.Add(uint64(0), uint64(0), []byte("hello"), uint16(0), uint8(0))
	f.Add(uint64(1), uint64(2), make([]byte, 300), uint16(17), uint8(40))
	f.Fuzz(func(t *testing.T, keySeed, nonceSeed uint64, data []byte, aadLen uint16, repeat uint8) {
		r := mrand.New(mrand.NewPCG(keySeed, nonceSeed))
		key, nonce := random(r, 32), random(r, 12)
		n := min(int(aadLen), len(data))
		// Repeated, the text reaches the assembly's 256-byte units.
		aad, pt := data[:n], bytes.Repeat(data[n:], 1+int(repeat))
		got, want := pair(t, key)
		g := got.Seal(nil, nonce, pt, aad)
		if !bytes.Equal(g, want.Seal(nil, nonce, pt, aad)) {
			t.Fatal("Seal differs")
		}
		if back, err := got.Open(nil, nonce, g, aad); err != nil || !bytes.Equal(back, pt) {
			t.Fatal("Open failed")
		}
		if len(g) > 0 {
			g[int(keySeed%uint64(len(g)))] ^= 1
			if _, err := got.Open(nil, nonce, g, aad); err == nil {
				t.Fatal("Open accepted a flipped bit")
			}
		}
	})
}

func benchmark(b *testing.B, a cipher.AEAD, open bool) {
	buf := make([]byte, 64<<10, 64<<10+tagSize)
	rand.Read(buf)
	nonce := make([]byte, 12)
	sealed := a.Seal(nil, nonce, buf, nil)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if open {
			if _, err := a.Open(buf[:0], nonce, sealed, nil); err != nil {
				b.Fatal(err)
			}
		} else {
			a.Seal(buf[:0], nonce, buf, nil)
		}
	}
}

// go test -bench . ./internal/aesgcm: 64 KiB chunks as the stream seals
// them, this package against crypto/cipher in the same run.
func BenchmarkAES256GCM(b *testing.B) {
	key := make([]byte, 32)
	got, want := pair(b, key)
	for _, c := range []struct {
		name string
		a    cipher.AEAD
	}{{"crypto-cipher", want}, {"vaes-avx2", got}} {
		if c.name == "vaes-avx2" && !accelerated {
			continue
		}
		b.Run(c.name+"/seal", func(b *testing.B) { benchmark(b, c.a, false) })
		b.Run(c.name+"/open", func(b *testing.B) { benchmark(b, c.a, true) })
	}
}
