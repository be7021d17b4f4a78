package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand"
	"strings"
	"sync"
	"testing"
)

func TestCRCJoin(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, 70000)
	rng.Read(data)
	for _, n := range []int{0, 1, 7, 4096, 65537, len(data)} {
		p := data[:n]
		want := crc32.Checksum(p, castagnoli)
		for _, at := range []int{0, 1, n / 3, n / 2, n - 1, n} {
			if at < 0 || at > n {
				continue
			}
			a, b := p[:at], p[at:]
			if got := CRCJoin(CRC(a), CRC(b), uint64(len(b))); got != want {
				t.Errorf("%d bytes split at %d: got %08x, want %08x", n, at, got, want)
			}
		}
	}
}

// pagesSample is a snapshot with several page records of random bytes.
func pagesSample(t *testing.T) []byte {
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	for _, r := range []any{
		&Process{Pid: 42, Threads: 1, Comm: "x", Exe: "/bin/x"},
		&Thread{Tid: 42, Regs: make([]uint64, 27)},
		&VMA{Start: 0x10000, End: 0x40000, Prot: 3, Kind: VMAAnon},
	} {
		if err := enc.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewSource(2))
	for _, run := range [][2]uint64{{0x10000, 0x9000}, {0x20000, 0x1000}, {0x30000, 0x10000}} {
		page := make([]byte, run[1])
		rng.Read(page)
		if err := enc.WritePages(run[0], page); err != nil {
			t.Fatal(err)
		}
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// decodeDeferred reads data as a restore does: page data in pieces by
// ReadDataDeferred, each summed on a goroutine of its own with sum (or
// never, when sum returns false); giveUp is handed to GiveUpSums.
func decodeDeferred(data []byte, skip bool, giveUp chan struct{}, sum func(i int, p []byte) (uint32, bool)) error {
	dec := NewDecoder(bytes.NewReader(data))
	if skip {
		dec.SkipChecksum()
	}
	dec.GiveUpSums(giveUp)
	var wg sync.WaitGroup
	defer wg.Wait()
	buf := make([]byte, 5000) // not a multiple of the page size
	pieces := 0
	for {
		rec, err := dec.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if _, ok := rec.(*Pages); !ok {
			continue
		}
		for {
			n, s, err := dec.ReadDataDeferred(buf)
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
			if (s == nil) != skip {
				return errors.New("a sum where none was due, or none where one was")
			}
			if s == nil {
				continue
			}
			p := append([]byte(nil), buf[:n]...)
			i := pieces
			pieces++
			wg.Add(1)
			go func() {
				defer wg.Done()
				if c, ok := sum(i, p); ok {
					s.Set(c)
				}
			}()
		}
	}
}

// TestDeferredSums: page data summed by the caller, on other goroutines
// and in any order, gives the verdict the decoder's own sum gives: an
// intact snapshot passes, a flipped page byte or a wrong sum fails the
// end check, and a sum never given fails once the caller gives up
// instead of hanging.
func TestDeferredSums(t *testing.T) {
	good := pagesSample(t)
	right := func(_ int, p []byte) (uint32, bool) { return CRC(p), true }
	if err := decodeDeferred(good, false, nil, right); err != nil {
		t.Fatalf("intact snapshot: %v", err)
	}
	flipped := append([]byte(nil), good...)
	flipped[len(good)/2] ^= 0x10 // in the page data
	if _, err := decodeAll(flipped); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("the flipped snapshot read by ReadData: %v, want a checksum mismatch", err)
	}
	err := decodeDeferred(flipped, false, nil, right)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("a flipped page byte: got %v, want a checksum mismatch", err)
	}
	wrong := func(i int, p []byte) (uint32, bool) {
		if i == 3 {
			return CRC(p) ^ 1, true
		}
		return CRC(p), true
	}
	err = decodeDeferred(good, false, nil, wrong)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("a wrong sum: got %v, want a checksum mismatch", err)
	}
	giveUp := make(chan struct{})
	never := func(i int, p []byte) (uint32, bool) {
		if i == 2 {
			close(giveUp)
			return 0, false
		}
		return CRC(p), true
	}
	if err := decodeDeferred(good, false, giveUp, never); !errors.Is(err, errNoSum) {
		t.Errorf("a sum never given: got %v, want %v", err, errNoSum)
	}
}

// TestSkipChecksum: below an authenticating layer the CRC is not
// computed, so only that layer can refuse altered bytes; the end
// record's length is still checked.
func TestSkipChecksum(t *testing.T) {
	good := pagesSample(t)
	right := func(_ int, p []byte) (uint32, bool) { return CRC(p), true }
	flipped := append([]byte(nil), good...)
	flipped[len(good)/2] ^= 0x10
	if err := decodeDeferred(flipped, true, nil, right); err != nil {
		t.Errorf("a flipped page byte under SkipChecksum: %v, want it left to the layer below", err)
	}
	// A whole page record cut out: the records still parse, and the end
	// record's length (of the body it ended) must refuse it.
	var frames [][2]int
	for at := 0; at < len(good); {
		n := frameHeaderLen + int(binary.LittleEndian.Uint32(good[at+1:]))
		frames = append(frames, [2]int{at, at + n})
		at += n
	}
	cut := -1
	for i, f := range frames {
		if Type(good[f[0]]) == TypePages {
			cut = i
		}
	}
	if cut < 0 {
		t.Fatal("no page record in the sample")
	}
	f := frames[cut]
	shorter := append(append([]byte(nil), good[:f[0]]...), good[f[1]:]...)
	if err := decodeDeferred(shorter, true, nil, right); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a page record cut out under SkipChecksum: got %v, want it refused", err)
	}
	if err := decodeDeferred(good[:len(good)-1], true, nil, right); !errors.Is(err, ErrCorrupt) {
		t.Errorf("the last byte cut under SkipChecksum: got %v, want it refused", err)
	}
}
