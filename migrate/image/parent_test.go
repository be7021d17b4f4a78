package image

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"strings"
	"testing"
)

// snap encodes a single-process snapshot of one anonymous area at
// 0x10000-0x20000: parent, if not nil, first; then for each page of pages,
// its contents, or, for a page in ref, a ParentPages record with the digest
// of ref's contents.
func snap(t testing.TB, parent *Parent, pages map[uint64][]byte, ref map[uint64][]byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	if parent != nil {
		e.Write(parent)
	}
	e.Write(&Process{Pid: 7, Threads: 1})
	e.Write(&Thread{Tid: 7})
	e.Write(&VMA{Start: 0x10000, End: 0x20000, Kind: VMAAnon, Prot: 3})
	for a := uint64(0x10000); a < 0x20000; a += pageSize {
		if d, ok := pages[a]; ok {
			e.WritePages(a, d)
		}
		if d, ok := ref[a]; ok {
			sum := sha256.Sum256(d)
			e.Write(&ParentPages{Addr: a, Digests: sum[:]})
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func page(b byte) []byte { return bytes.Repeat([]byte{b}, pageSize) }

// resolved decodes child with parent as its parent and returns its pages.
func resolved(child, parent []byte) (map[uint64][]byte, error) {
	dec := NewDecoder(bytes.NewReader(child))
	dec.ResolveParents(func(p *Parent) (PageSource, error) {
		return NewPageSource(NewDecoder(bytes.NewReader(parent)), nil), nil
	})
	got := map[uint64][]byte{}
	for {
		rec, err := dec.Next()
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return nil, err
		}
		if r, ok := rec.(*Pages); ok {
			b, err := io.ReadAll(readerFunc(dec.ReadData))
			if err != nil {
				return nil, err
			}
			for p := uint64(0); p < r.Len; p += pageSize {
				got[r.Addr+p] = b[p : p+pageSize]
			}
		}
	}
}

// TestChainResolves: the pages a child takes from its parent come out of
// the decoder as Pages with the parent's contents, interleaved in address
// order with the child's own; pages the parent has and the child does not
// refer to are not the child's.
func TestChainResolves(t *testing.T) {
	parent := snap(t, nil, map[uint64][]byte{0x10000: page(1), 0x11000: page(2), 0x12000: page(3), 0x15000: page(5)}, nil)
	child := snap(t, &Parent{SHA256: make([]byte, 32)}, map[uint64][]byte{0x11000: page(9), 0x13000: page(4)},
		map[uint64][]byte{0x10000: page(1), 0x12000: page(3)})
	got, err := resolved(child, parent)
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint64][]byte{0x10000: page(1), 0x11000: page(9), 0x12000: page(3), 0x13000: page(4)}
	if len(got) != len(want) {
		t.Fatalf("got %d pages, want %d", len(got), len(want))
	}
	for a, w := range want {
		if !bytes.Equal(got[a], w) {
			t.Errorf("page %#x: got %d, want %d", a, got[a][0], w[0])
		}
	}
	// The digests a grandchild compares with: the child's own and those
	// it refers to, read without the parent.
	d, err := ReadDigests(NewDecoder(bytes.NewReader(child)))
	if err != nil {
		t.Fatal(err)
	}
	for a, w := range want {
		if d.Pages[7][a] != sha256.Sum256(w) {
			t.Errorf("digest of page %#x is not its contents'", a)
		}
	}
	if len(d.Pages[7]) != len(want) || len(d.Order) != 1 || d.Order[0] != 7 {
		t.Errorf("got %d digests of %v, want %d of [7]", len(d.Pages[7]), d.Order, len(want))
	}
}

// TestWrongParentRefused: a parent whose page differs from the digest the
// child recorded, or which lacks the page, is refused.
func TestWrongParentRefused(t *testing.T) {
	child := snap(t, &Parent{SHA256: make([]byte, 32)}, nil, map[uint64][]byte{0x10000: page(1)})
	other := snap(t, nil, map[uint64][]byte{0x10000: page(2)}, nil)
	if _, err := resolved(child, other); !errors.Is(err, ErrWrongParent) {
		t.Errorf("a parent with another page: got %v, want %v", err, ErrWrongParent)
	}
	missing := snap(t, nil, map[uint64][]byte{0x11000: page(1)}, nil)
	if _, err := resolved(child, missing); err == nil || !strings.Contains(err.Error(), "parent holds no page at 0x10000") {
		t.Errorf("a parent without the page: got %v", err)
	}
	truncated := snap(t, nil, map[uint64][]byte{0x10000: page(1)}, nil)
	truncated = truncated[:len(truncated)-3]
	if _, err := resolved(child, truncated); err == nil || !errors.Is(err, ErrCorrupt) {
		t.Errorf("a truncated parent: got %v, want it refused as corrupt", err)
	}
}

// TestParentPagesNeedParent: a parent-pages record in a snapshot without a
// parent record, or a parent record anywhere but first, is corrupt.
func TestParentPagesNeedParent(t *testing.T) {
	noParent := snap(t, nil, nil, map[uint64][]byte{0x10000: page(1)})
	if _, err := decodeAll(noParent); err == nil || !strings.Contains(err.Error(), "without a parent record") {
		t.Errorf("parent pages without a parent: got %v", err)
	}
	var buf bytes.Buffer
	e := NewEncoder(&buf)
	e.Write(&Process{Pid: 7, Threads: 1})
	e.Write(&Parent{SHA256: make([]byte, 32)})
	e.Close()
	if _, err := decodeAll(buf.Bytes()); err == nil || !strings.Contains(err.Error(), "unexpected *image.Parent") {
		t.Errorf("a parent record after the process record: got %v", err)
	}
}

// FuzzChain: no child snapshot makes the decoder that follows its parent
// panic or allocate without bound (the parent is a good one).
func FuzzChain(f *testing.F) {
	parent := snap(f, nil, map[uint64][]byte{0x10000: page(1), 0x11000: page(2)}, nil)
	child := snap(f, &Parent{SHA256: make([]byte, 32)}, map[uint64][]byte{0x12000: page(3)}, map[uint64][]byte{0x10000: page(1), 0x11000: page(2)})
	f.Add(child)
	f.Add(child[:len(child)/2])
	f.Fuzz(func(t *testing.T, data []byte) {
		resolved(data, parent)
	})
}
