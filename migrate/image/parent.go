package image

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
)

// Incremental snapshots (pfreeze -parent) refer to a parent snapshot and
// carry only the pages whose contents differ from the parent's: a Parent
// record, the first of the snapshot, names the parent (by the SHA-256 of
// its bytes as stored, which is its identity, and the path it was read
// from), and ParentPages records stand for runs of pages the parent holds,
// each with the SHA-256 of its contents. A reader given the parent
// (Decoder.ResolveParents) returns them as Pages records whose data it
// read from the parent and checked against those digests; the chain is
// followed as deep as it goes, every parent checked the same way.

// DigestSize is the size of a page digest (SHA-256).
const DigestSize = sha256.Size

// MaxParentPages bounds the pages of one ParentPages record (a reader
// holds their contents at once).
const MaxParentPages = 2048

// Parent names the snapshot an incremental snapshot refers to.
type Parent struct {
	// SHA256 is the digest of the parent's bytes as stored: its identity.
	SHA256 []byte `msgpack:"sha256"`
	Size   uint64 `msgpack:"size"`
	// Path is where the parent was read from when this snapshot was
	// written (absolute): a hint; the digest decides.
	Path string `msgpack:"path"`
}

// ParentPages stands for len(Digests)/DigestSize pages at Addr whose contents
// are the parent's at the same address of the process with the same pid
// (in a tree, members the two share come in the same order);
// Digests holds the SHA-256 of each page.
type ParentPages struct {
	//lint:ignore U1000 read by msgpack: encode as an array
	_msgpack struct{} `msgpack:",as_array"`
	Addr     uint64
	Digests  []byte
}

// Len is the number of bytes the record stands for.
func (r *ParentPages) Len() uint64 { return uint64(len(r.Digests)/DigestSize) * pageSize }

// PageSource serves a parent snapshot's page contents, in increasing
// address order within each member, members in the snapshot's order. A
// source that is a fmt.Stringer is named so in errors.
type PageSource interface {
	// ReadPages fills p with the parent's contents at addr of process pid.
	ReadPages(pid int, addr uint64, p []byte) error
	// Close reads the parent to its end (verifying it whole) and
	// releases it.
	Close() error
}

// ParentResolver opens the parent a Parent record names.
type ParentResolver func(p *Parent) (PageSource, error)

// NewPageSource serves the pages dec reads (a parent snapshot, which may
// itself have a parent: give dec its resolver). closer, if not nil, is
// called by Close.
func NewPageSource(dec *Decoder, closer func() error) PageSource {
	return &chainReader{dec: dec, closer: closer}
}

type chainReader struct {
	dec       *Decoder
	closer    func() error
	pid       int
	addr, end uint64 // unread range of the current Pages record
	done      bool
	scratch   []byte
}

func (c *chainReader) ReadPages(pid int, addr uint64, p []byte) error {
	for len(p) > 0 {
		if c.pid == pid && addr >= c.addr && addr < c.end {
			if err := c.skip(addr - c.addr); err != nil {
				return err
			}
			n := min(uint64(len(p)), c.end-addr)
			if _, err := io.ReadFull(readerFunc(c.dec.ReadData), p[:n]); err != nil {
				return fmt.Errorf("parent: %w", err)
			}
			c.addr = addr + n
			addr += n
			p = p[n:]
			continue
		}
		if c.done || (c.pid == pid && addr < c.addr) {
			return fmt.Errorf("parent holds no page at %#x of pid %d", addr, pid)
		}
		rec, err := c.dec.Next()
		if err != nil {
			return fmt.Errorf("parent: %w", err)
		}
		switch r := rec.(type) {
		case *Process:
			c.pid, c.addr, c.end = r.Pid, 0, 0
		case *Pages:
			c.addr, c.end = r.Addr, r.Addr+r.Len
		case *End:
			c.done = true
		case *Precopy:
			return fmt.Errorf("parent: a pre-copy (pfreeze -live) snapshot cannot be a parent")
		}
	}
	return nil
}

// skip passes over n bytes of the current Pages record.
func (c *chainReader) skip(n uint64) error {
	if c.scratch == nil && n > 0 {
		c.scratch = make([]byte, 64<<10)
	}
	for n > 0 {
		k, err := c.dec.ReadData(c.scratch[:min(n, uint64(len(c.scratch)))])
		if err != nil {
			return fmt.Errorf("parent: %w", err)
		}
		n -= uint64(k)
		c.addr += uint64(k)
	}
	return nil
}

func (c *chainReader) Close() error {
	var err error
	for !c.done {
		var rec any
		if rec, err = c.dec.Next(); err != nil {
			err = fmt.Errorf("parent: %w", err)
			break
		}
		_, c.done = rec.(*End)
	}
	if c.closer != nil {
		if cerr := c.closer(); err == nil {
			err = cerr
		}
	}
	return err
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// fromParent reads the pages r stands for from the parent, checks each
// against its digest, and makes them the data of the Pages record it
// returns.
func (d *Decoder) fromParent(r *ParentPages) (*Pages, error) {
	n := int(r.Len())
	if cap(d.pbuf) < n {
		d.pbuf = make([]byte, n)
	}
	b := d.pbuf[:n]
	if err := d.parent.ReadPages(d.pid, r.Addr, b); err != nil {
		return nil, err
	}
	for p := 0; p < n; p += pageSize {
		sum := sha256.Sum256(b[p : p+pageSize])
		if !bytes.Equal(sum[:], r.Digests[p/pageSize*DigestSize:][:DigestSize]) {
			name := "parent"
			if s, ok := d.parent.(fmt.Stringer); ok {
				name = s.String()
			}
			return nil, fmt.Errorf("%s: %w: page %#x differs from the one this snapshot was made against (a different or modified parent)",
				name, ErrWrongParent, r.Addr+uint64(p))
		}
	}
	d.pdata, d.pending = b, uint64(n)
	return &Pages{Addr: r.Addr, Len: uint64(n)}, nil
}

// ErrWrongParent is the cause when a parent is not the one a snapshot
// was made against.
var ErrWrongParent = errors.New("wrong parent snapshot")

// ResolveParents makes the decoder follow an incremental snapshot's
// parent: f opens it, and ParentPages records come out of Next as Pages
// records carrying the parent's contents (checked against their digests).
// Without it, Next returns the Parent and ParentPages records as they are.
func (d *Decoder) ResolveParents(f ParentResolver) { d.resolve = f }

// PageDigests are the SHA-256 digests of every page a snapshot holds, its
// own and (through ParentPages records) its parent's, member by member: what
// a child snapshot compares the process's pages with.
type PageDigests struct {
	// Order lists the processes (pids) in the snapshot's order: a child
	// refers to them in the same order (a parent is read front to back).
	Order []int
	Pages map[int]map[uint64][DigestSize]byte
}

// ReadDigests reads a whole snapshot from dec (without resolving its
// parent: the digests of the pages it refers to are in its ParentPages
// records) and returns the digest of every page it holds.
func ReadDigests(dec *Decoder) (*PageDigests, error) {
	d := &PageDigests{Pages: map[int]map[uint64][DigestSize]byte{}}
	var m map[uint64][DigestSize]byte
	buf := make([]byte, 1<<20)
	for {
		rec, err := dec.Next()
		if err == io.EOF {
			return d, nil
		}
		if err != nil {
			return nil, err
		}
		switch r := rec.(type) {
		case *Precopy:
			return nil, fmt.Errorf("a pre-copy (pfreeze -live) snapshot cannot be a parent")
		case *Process:
			m = map[uint64][DigestSize]byte{}
			d.Order = append(d.Order, r.Pid)
			d.Pages[r.Pid] = m
		case *ParentPages:
			for i := 0; i*DigestSize < len(r.Digests); i++ {
				m[r.Addr+uint64(i)*pageSize] = [DigestSize]byte(r.Digests[i*DigestSize:][:DigestSize])
			}
		case *Pages:
			if r.Addr%pageSize != 0 || r.Len%pageSize != 0 {
				return nil, corruptf("pages %#x+%#x not page aligned: cannot be a parent", r.Addr, r.Len)
			}
			for off := uint64(0); off < r.Len; {
				n := min(r.Len-off, uint64(len(buf)))
				if _, err := io.ReadFull(readerFunc(dec.ReadData), buf[:n]); err != nil {
					return nil, err
				}
				for p := uint64(0); p < n; p += pageSize {
					m[r.Addr+off+p] = sha256.Sum256(buf[p : p+pageSize])
				}
				off += n
			}
		}
	}
}
