package image

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"

	"github.com/vmihailenco/msgpack/v5"
)

// Framing limits. A record header is type (1 byte) + payload length (4
// bytes, little endian). The limits keep a corrupt length from turning into
// a huge allocation or an endless read.
const (
	frameHeaderLen = 5
	// MaxMetaLen bounds every record but Pages. Decoding may expand a
	// record (a byte per element becomes a struct): keep it small.
	MaxMetaLen = 1 << 20
	// MaxFDLen bounds an fd record, which may carry a pipe's buffered
	// bytes or a TCP connection's queues (as msgpack bin, which decodes
	// without growing).
	MaxFDLen = 64 << 20
	// MaxPagesLen bounds the data of one Pages record.
	MaxPagesLen = 64 << 20
	// pagesHeadLen is the msgpack prefix of a Pages payload:
	// fixarray(2), uint64 addr, bin32 length.
	pagesHeadLen = 1 + 9 + 5
)

// maxLen is the largest payload of a record of type t (but Pages).
func maxLen(t Type) int {
	switch t {
	case TypeFD:
		return MaxFDLen
	case TypeParentPages:
		return 16 + MaxParentPages*DigestSize
	}
	if t == TypeNamespaces {
		return MaxNamespacesLen
	}
	return MaxMetaLen
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt wraps every error caused by malformed snapshot bytes.
var ErrCorrupt = errors.New("snapshot corrupt")

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// Encoder writes records to a stream. It is not safe for concurrent use.
type Encoder struct {
	w   *bufio.Writer
	crc uint32 // CRC-32C of the n bytes written so far (while sum is nil)
	n   uint64
	err error
	hdr [frameHeaderLen + pagesHeadLen]byte
	// sum, between BeginPages and EndPages, holds the running checksum
	// instead of crc and n: another goroutine adds the pages to it.
	sum *PageSum
}

// NewEncoder returns an Encoder writing to w. Close must be called to
// write the end record; it does not close w.
func NewEncoder(w io.Writer) *Encoder {
	return &Encoder{w: bufio.NewWriterSize(w, 256<<10)}
}

func (e *Encoder) write(p []byte) {
	if e.err != nil {
		return
	}
	if e.sum != nil {
		e.err = errors.New("image: a record written between BeginPages and EndPages")
		return
	}
	e.crc = crc32.Update(e.crc, castagnoli, p)
	e.n += uint64(len(p))
	_, e.err = e.w.Write(p)
}

// Write encodes one metadata record (*Tree, *Namespaces, *Process, *Thread, *VMA, *File or *FD).
func (e *Encoder) Write(rec any) error {
	var t Type
	switch rec.(type) {
	case *Process:
		t = TypeProcess
	case *Thread:
		t = TypeThread
	case *VMA:
		t = TypeVMA
	case *FD:
		t = TypeFD
	case *Tree:
		t = TypeTree
	case *File:
		t = TypeFile
	case *Namespaces:
		t = TypeNamespaces
	case *Drop:
		t = TypeDrop
	case *Round:
		t = TypeRound
	case *PrecopyArea:
		t = TypePrecopyArea
	case *Parent:
		t = TypeParent
	case *ParentPages:
		t = TypeParentPages
	case *PrecopyMember:
		t = TypePrecopyMember
	case *PrecopyTree:
		t = TypePrecopyTree
	default:
		return fmt.Errorf("image: cannot encode %T", rec)
	}
	b, err := msgpack.Marshal(rec)
	if err != nil {
		return fmt.Errorf("image: encode %v: %w", t, err)
	}
	if len(b) > maxLen(t) {
		return fmt.Errorf("image: %v record of %d bytes exceeds %d", t, len(b), maxLen(t))
	}
	e.hdr[0] = byte(t)
	binary.LittleEndian.PutUint32(e.hdr[1:5], uint32(len(b)))
	e.write(e.hdr[:frameHeaderLen])
	e.write(b)
	return e.err
}

// WritePages writes a run of memory contents starting at addr. Large runs
// cost one header; data is written through without copying when the
// buffer is empty.
func (e *Encoder) WritePages(addr uint64, data []byte) error {
	return e.writeRun(TypePages, addr, data)
}

// WritePrecopy writes a run of memory contents sent before the stop
// (pfreeze -live), in the layout of WritePages.
func (e *Encoder) WritePrecopy(addr uint64, data []byte) error {
	return e.writeRun(TypePrecopy, addr, data)
}

func (e *Encoder) writeRun(t Type, addr uint64, data []byte) error {
	for len(data) > 0 {
		n := min(len(data), MaxPagesLen)
		h := runHeader(&e.hdr, t, addr, n)
		e.write(h)
		e.write(data[:n])
		addr += uint64(n)
		data = data[n:]
	}
	return e.err
}

// runHeader fills hdr with the frame header and msgpack prefix of a
// record of type t carrying n bytes of pages at addr.
func runHeader(hdr *[frameHeaderLen + pagesHeadLen]byte, t Type, addr uint64, n int) []byte {
	h := hdr[:]
	h[0] = byte(t)
	binary.LittleEndian.PutUint32(h[1:5], uint32(pagesHeadLen+n))
	h[5] = 0x92 // fixarray of 2
	h[6] = 0xcf // uint64
	binary.BigEndian.PutUint64(h[7:15], addr)
	h[15] = 0xc6 // bin32
	binary.BigEndian.PutUint32(h[16:20], uint32(n))
	return h
}

// PageSum checksums pages records on one goroutine while the Encoder
// writes them on another: checksumming is a pass over every byte, and
// done where the pages were just read (still in the cache) it overlaps
// the write instead of adding to it. Add must see exactly the runs that
// WriteSummedPages writes, in the same order.
type PageSum struct {
	crc uint32
	n   uint64
	hdr [frameHeaderLen + pagesHeadLen]byte
}

// Add sums the pages records WriteSummedPages(addr, data) writes.
func (s *PageSum) Add(addr uint64, data []byte) {
	for len(data) > 0 {
		n := min(len(data), MaxPagesLen)
		h := runHeader(&s.hdr, TypePages, addr, n)
		s.crc = crc32.Update(s.crc, castagnoli, h)
		s.crc = crc32.Update(s.crc, castagnoli, data[:n])
		s.n += uint64(len(h) + n)
		addr += uint64(n)
		data = data[n:]
	}
}

// BeginPages hands the running checksum to a PageSum: until EndPages,
// pages are written with WriteSummedPages and summed by the PageSum's
// Add, and no other record may be written.
func (e *Encoder) BeginPages() *PageSum {
	s := &PageSum{crc: e.crc, n: e.n}
	if e.sum == nil {
		e.sum = s
	}
	return s
}

// WriteSummedPages writes a run of memory contents as WritePages does,
// leaving the checksum to the PageSum of BeginPages.
func (e *Encoder) WriteSummedPages(addr uint64, data []byte) error {
	if e.err == nil && e.sum == nil {
		e.err = errors.New("image: WriteSummedPages outside BeginPages and EndPages")
	}
	for len(data) > 0 && e.err == nil {
		n := min(len(data), MaxPagesLen)
		h := runHeader(&e.hdr, TypePages, addr, n)
		if _, e.err = e.w.Write(h); e.err == nil {
			_, e.err = e.w.Write(data[:n])
		}
		addr += uint64(n)
		data = data[n:]
	}
	return e.err
}

// EndPages takes the running checksum back from s, which has summed
// every run written since BeginPages. Call it once s's goroutine is done.
func (e *Encoder) EndPages(s *PageSum) {
	if e.sum != s {
		if e.err == nil {
			e.err = errors.New("image: EndPages without its BeginPages")
		}
		return
	}
	e.sum = nil
	e.crc, e.n = s.crc, s.n
}

// Close writes the end record and flushes.
func (e *Encoder) Close() error {
	if e.err != nil {
		return e.err
	}
	if e.sum != nil {
		return errors.New("image: Close between BeginPages and EndPages")
	}
	end := End{CRC: e.crc, Length: e.n}
	b, err := msgpack.Marshal(&end)
	if err != nil {
		return err
	}
	e.hdr[0] = byte(TypeEnd)
	binary.LittleEndian.PutUint32(e.hdr[1:5], uint32(len(b)))
	if _, err := e.w.Write(e.hdr[:frameHeaderLen]); err != nil {
		return err
	}
	if _, err := e.w.Write(b); err != nil {
		return err
	}
	e.err = e.w.Flush()
	return e.err
}

// Decoder reads records from a stream, verifying framing as it goes and
// the checksum at the end. Errors stick: once Next fails, it keeps failing.
type Decoder struct {
	check checker
	r     *bufio.Reader
	// The checksum of the body so far is that of segs (pieces in order,
	// some summed by ReadDataDeferred's caller) joined with crc, the
	// running CRC-32C of the runN bytes read since (crcsum.go).
	crc     hash.Hash32
	runN    uint64
	segs    []segment
	giveUp  <-chan struct{} // closed: stop waiting for deferred sums
	trusted bool            // SkipChecksum: the layer below authenticates
	n       uint64
	err     error
	pending uint64 // unread data bytes of the current Pages record
	done    bool
	buf     []byte
	hdr     [frameHeaderLen + pagesHeadLen]byte

	// An incremental snapshot's parent (parent.go): resolve opens it,
	// parent serves its pages; pdata, when not nil, holds the data of
	// the current Pages record (read from the parent), pid the process
	// whose records are being read.
	resolve ParentResolver
	parent  PageSource
	pdata   []byte
	pbuf    []byte
	pid     int
}

// NewDecoder returns a Decoder reading from r.
func NewDecoder(r io.Reader) *Decoder {
	return &Decoder{r: bufio.NewReaderSize(r, 256<<10), crc: crc32.New(castagnoli)}
}

func (d *Decoder) read(p []byte) error {
	if _, err := io.ReadFull(d.r, p); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return corruptf("truncated after %d bytes", d.n)
		}
		return err
	}
	if !d.trusted {
		d.crc.Write(p)
		d.runN += uint64(len(p))
	}
	d.n += uint64(len(p))
	return nil
}

// SkipChecksum tells d that the layer below authenticates every byte of
// the body and its end (an AEAD stream, whose last chunk is marked): the
// CRC-32C would add nothing, so it is neither computed nor compared with
// the end record's (the end record's length still is).
func (d *Decoder) SkipChecksum() { d.trusted = true }

// GiveUpSums makes the end check stop waiting for the sums that
// ReadDataDeferred left to its caller once c is closed (and fail): a
// caller that stops consuming page data closes c.
func (d *Decoder) GiveUpSums(c <-chan struct{}) { d.giveUp = c }

// ReadDataDeferred reads like ReadData, but leaves the checksum of the
// bytes read (p[:n]) to the caller: it must Set the returned sum to
// their CRC-32C (CRC), on any goroutine, or close the GiveUpSums
// channel. The end record is verified once every sum has been set. The
// sum is nil when there is nothing to sum (SkipChecksum, or a parent's
// pages).
func (d *Decoder) ReadDataDeferred(p []byte) (int, *DeferredSum, error) {
	if d.trusted || d.pdata != nil || d.err != nil || d.pending == 0 {
		n, err := d.ReadData(p)
		return n, nil, err
	}
	if uint64(len(p)) > d.pending {
		p = p[:d.pending]
	}
	if _, err := io.ReadFull(d.r, p); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = corruptf("truncated after %d bytes", d.n)
		}
		d.err = err
		return 0, nil, err
	}
	n := uint64(len(p))
	d.n += n
	d.pending -= n
	sum := &DeferredSum{n: n, done: make(chan struct{})}
	d.segs = append(d.segs, segment{crc: d.crc.Sum32(), n: d.runN}, segment{n: n, def: sum})
	d.crc.Reset()
	d.runN = 0
	d.foldSums()
	return int(n), sum, nil
}

// foldSums joins the leading segments whose sums are known into one.
func (d *Decoder) foldSums() {
	crc, n, i := uint32(0), uint64(0), 0
	for ; i < len(d.segs); i++ {
		s := d.segs[i]
		if s.def != nil {
			if !isDone(s.def) {
				break
			}
			s.crc = s.def.crc
		}
		crc, n = CRCJoin(crc, s.crc, s.n), n+s.n
	}
	if i > 1 {
		d.segs[i-1] = segment{crc: crc, n: n}
		d.segs = append(d.segs[:0], d.segs[i-1:]...)
	}
}

func isDone(s *DeferredSum) bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// bodySum returns the CRC-32C of the body up to the running CRC run
// (runN bytes), waiting for the deferred sums.
func (d *Decoder) bodySum(run uint32, runN uint64) (uint32, error) {
	crc := uint32(0)
	for _, s := range d.segs {
		c := s.crc
		if s.def != nil {
			select {
			case <-s.def.done:
			case <-d.giveUp:
				return 0, errNoSum
			}
			c = s.def.crc
		}
		crc = CRCJoin(crc, c, s.n)
	}
	return CRCJoin(crc, run, runN), nil
}

// Next returns the next record: *Precopy, *Drop, *Round (pre-copy, first),
// *Tree, *Process, *Thread, *VMA, *File, *FD, *Pages or,
// last, *End once the checksum has been verified and the input was found
// to end right after it. After *End, Next
// returns io.EOF. Unread data of a *Pages record is discarded.
//
// Every record is checked against the snapshot's structural rules
// (check.go) before it is returned: the decoder, not each reader, decides
// whether a snapshot is well formed, so a restore and pthaw -debug reach
// the same verdict.
func (d *Decoder) Next() (any, error) {
	if d.err != nil {
		return nil, d.err
	}
	for {
		rec, err := d.next()
		if err == errSkipped {
			continue // a loop, not recursion: any number may be skipped
		}
		if err == nil {
			err = d.check.check(rec)
		}
		if err == nil {
			rec, err = d.chain(rec)
		}
		if err == errSkipped {
			continue
		}
		if err != nil {
			d.err = err
			return nil, err
		}
		return rec, nil
	}
}

// chain follows the parent of an incremental snapshot, when the decoder
// was told how (ResolveParents): the Parent record opens it and is not
// returned (errSkipped), ParentPages records become Pages.
func (d *Decoder) chain(rec any) (any, error) {
	switch r := rec.(type) {
	case *Process:
		d.pid = r.Pid
	case *Parent:
		if d.resolve == nil {
			return rec, nil
		}
		src, err := d.resolve(r)
		if err != nil {
			return nil, err
		}
		d.parent = src
		return nil, errSkipped
	case *ParentPages:
		if d.parent == nil {
			return rec, nil
		}
		return d.fromParent(r)
	case *End:
		if d.parent != nil {
			src := d.parent
			d.parent = nil
			if err := src.Close(); err != nil {
				return nil, err
			}
		}
	}
	return rec, nil
}

// CheckRegisters makes the decoder refuse a thread record without exactly
// n registers (the architecture's count, which this package does not know).
func (d *Decoder) CheckRegisters(n int) { d.check.regs = n }

// errSkipped is next's answer for a skippable record it passed over.
var errSkipped = errors.New("skipped")

func (d *Decoder) next() (any, error) {
	if d.done {
		return nil, io.EOF
	}
	for d.pending > 0 {
		if err := d.discard(); err != nil {
			return nil, err
		}
	}
	d.pdata = nil
	runBefore, runNBefore, nBefore := d.crc.Sum32(), d.runN, d.n
	if err := d.read(d.hdr[:frameHeaderLen]); err != nil {
		return nil, err
	}
	t := Type(d.hdr[0])
	size := binary.LittleEndian.Uint32(d.hdr[1:5])
	switch t {
	case TypePages, TypePrecopy:
		if size < pagesHeadLen || size-pagesHeadLen > MaxPagesLen {
			return nil, corruptf("%v record of %d bytes at offset %d", t, size, nBefore)
		}
		h := d.hdr[frameHeaderLen:]
		if err := d.read(h); err != nil {
			return nil, err
		}
		n := binary.BigEndian.Uint32(h[11:15])
		if h[0] != 0x92 || h[1] != 0xcf || h[10] != 0xc6 || n != size-pagesHeadLen {
			return nil, corruptf("malformed %v record at offset %d", t, nBefore)
		}
		addr := binary.BigEndian.Uint64(h[2:10])
		d.pending = uint64(n)
		if t == TypePrecopy {
			return &Precopy{Addr: addr, Len: uint64(n)}, nil
		}
		return &Pages{Addr: addr, Len: uint64(n)}, nil
	case TypeEnd:
		if size > 64 {
			return nil, corruptf("end record of %d bytes", size)
		}
		var eb [64]byte
		b := eb[:size]
		if _, err := io.ReadFull(d.r, b); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, corruptf("truncated end record")
			}
			return nil, err // the source's own failure (a timeout): not the snapshot's
		}
		var end End
		if err := msgpack.Unmarshal(b, &end); err != nil {
			return nil, corruptf("end record: %v", err)
		}
		crcBefore, err := d.bodySum(runBefore, runNBefore)
		if err != nil {
			return nil, err
		}
		if end.Length != nBefore || (end.CRC != crcBefore && !d.trusted) {
			return nil, corruptf("checksum mismatch (crc32c %08x over %d bytes, snapshot says %08x over %d)",
				crcBefore, nBefore, end.CRC, end.Length)
		}
		// The end record is the end of the input: the verdict that the
		// snapshot is whole belongs here, not to each caller (pthaw -debug
		// once accepted trailing bytes that a restore refused). Reading to
		// io.EOF also lets the layers below verify their own ends (the
		// last encrypted chunk, the compressed stream's end, the end frame).
		if err := d.atEOF(nBefore + frameHeaderLen + uint64(size)); err != nil {
			return nil, err
		}
		d.done = true
		return &end, nil
	}
	if int(size) > maxLen(t) {
		return nil, corruptf("%v record of %d bytes at offset %d", t, size, nBefore)
	}
	if cap(d.buf) < int(size) {
		d.buf = make([]byte, size)
	}
	b := d.buf[:size]
	if err := d.read(b); err != nil {
		return nil, err
	}
	var rec any
	switch t {
	case TypeProcess:
		rec = new(Process)
	case TypeThread:
		rec = new(Thread)
	case TypeVMA:
		rec = new(VMA)
	case TypeFD:
		rec = new(FD)
	case TypeTree:
		rec = new(Tree)
	case TypeFile:
		rec = new(File)
	case TypeNamespaces:
		rec = new(Namespaces)
	case TypeDrop:
		rec = new(Drop)
	case TypeRound:
		rec = new(Round)
	case TypePrecopyArea:
		rec = new(PrecopyArea)
	case TypeParent:
		rec = new(Parent)
	case TypeParentPages:
		rec = new(ParentPages)
	case TypePrecopyMember:
		rec = new(PrecopyMember)
	case TypePrecopyTree:
		rec = new(PrecopyTree)
	default:
		if t&Skippable != 0 {
			return nil, errSkipped
		}
		return nil, corruptf("unknown record type %d at offset %d", t, nBefore)
	}
	if err := msgpack.Unmarshal(b, rec); err != nil {
		return nil, corruptf("%v record at offset %d: %v", t, nBefore, err)
	}
	return rec, nil
}

// ReadData reads the data of the current Pages or Precopy record into p, returning
// the number of bytes read; it returns io.EOF when the record is consumed.
func (d *Decoder) ReadData(p []byte) (int, error) {
	if d.err != nil {
		return 0, d.err
	}
	if d.pending == 0 {
		return 0, io.EOF
	}
	if uint64(len(p)) > d.pending {
		p = p[:d.pending]
	}
	if d.pdata != nil {
		n := copy(p, d.pdata[uint64(len(d.pdata))-d.pending:])
		d.pending -= uint64(n)
		return n, nil
	}
	if err := d.read(p); err != nil {
		d.err = err
		return 0, err
	}
	d.pending -= uint64(len(p))
	return len(p), nil
}

func (d *Decoder) discard() error {
	var scratch [32 << 10]byte
	_, err := d.ReadData(scratch[:])
	return err
}

// Offset is the number of body bytes consumed so far.
func (d *Decoder) Offset() uint64 { return d.n }

// atEOF checks that the input ends at offset off (just after the end
// record).
func (d *Decoder) atEOF(off uint64) error {
	_, err := d.r.ReadByte()
	switch {
	case err == io.EOF:
		return nil
	case err == nil:
		return corruptf("data after the end record (at offset %d)", off)
	}
	return err
}

// ExpectEOF reports whether the end record was read. Next verifies, when it
// returns the end record, that nothing follows it.
func (d *Decoder) ExpectEOF() error {
	if d.err != nil {
		return d.err
	}
	if !d.done {
		return fmt.Errorf("%w: no end record", ErrCorrupt)
	}
	return nil
}
