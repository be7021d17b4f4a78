package stream

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"time"

	"github.com/klauspost/compress/s2"
)

// autoWriter is -compress auto: the snappy framing format (what -compress
// snappy writes, so the header says snappy and any snappy reader decodes
// it), but a block is compressed only when that makes the transfer
// faster. Every write to the layers below (the socket, a pipe to ssh, a
// file) is timed; where the link is the bottleneck a write blocks while it
// drains, and the CPU time spent compressing the next block costs nothing
// as long as writing that block as it is would block for longer. So a
// block is compressed when the measured time per written byte times the
// block's size exceeds the time compressing a block takes, and recent
// blocks shrank by more than an eighth: over a slow link nearly every
// block is compressed, as with snappy; where the link keeps up and the CPU
// is the limit almost none is, as with none. Every 64th block is
// compressed regardless, to keep the estimates current; a block that does
// not shrink by an eighth is sent as it is.
type autoWriter struct {
	w       io.Writer
	buf     []byte // the block being collected
	chunk   []byte // the chunk being written: header, checksum, data
	started bool   // the stream identifier is written
	// Moving averages: time and bytes of the writes below (their ratio is
	// the time a written byte costs), time to compress a block, and the
	// compressed size over the original.
	writeNs, writeBytes float64
	compNs, ratio       float64
	err                 error
	closed              bool

	// time.Now and s2.EncodeSnappy; tests put a clock of their own here.
	now                       func() time.Time
	encode                    func(dst, src []byte) []byte
	blocks, tried, compressed int // for tests
}

const (
	autoBlock      = 64 << 10 // the framing format's largest block
	autoHeaderLen  = 8        // chunk type, 3-byte length, 4-byte checksum
	chunkCompress  = 0x00
	chunkRaw       = 0x01
	autoProbe      = 64 // every autoProbe-th block is compressed regardless
	writeWeight    = 1.0 / 128
	compWeight     = 1.0 / 8
	ratioWeight    = 1.0 / 4 // one probe after random data lets compression resume
	snappyStreamID = "\xff\x06\x00\x00sNaPpY"
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

func newAutoWriter(w io.Writer) *autoWriter {
	return &autoWriter{
		w:      w,
		buf:    make([]byte, 0, autoBlock),
		chunk:  make([]byte, len(snappyStreamID)+autoHeaderLen+s2.MaxEncodedLen(autoBlock)),
		now:    time.Now,
		encode: s2.EncodeSnappy,
	}
}

func (a *autoWriter) Write(p []byte) (int, error) {
	if a.err != nil {
		return 0, a.err
	}
	total := len(p)
	for len(p) > 0 {
		if len(a.buf) == 0 && len(p) >= autoBlock {
			if err := a.emit(p[:autoBlock]); err != nil {
				return total - len(p), err
			}
			p = p[autoBlock:]
			continue
		}
		n := copy(a.buf[len(a.buf):autoBlock], p)
		a.buf = a.buf[:len(a.buf)+n]
		p = p[n:]
		if len(a.buf) == autoBlock {
			if err := a.emit(a.buf); err != nil {
				return total - len(p), err
			}
			a.buf = a.buf[:0]
		}
	}
	return total, nil
}

var errAutoClosed = errors.New("write after close")

// Close writes what is collected. It does not close the writer below.
func (a *autoWriter) Close() error {
	if a.closed {
		if a.err == errAutoClosed {
			return nil
		}
		return a.err
	}
	a.closed = true
	if a.err != nil {
		return a.err
	}
	if len(a.buf) > 0 || !a.started {
		if err := a.emit(a.buf); err != nil {
			return err
		}
		a.buf = a.buf[:0]
	}
	a.err = errAutoClosed
	return nil
}

// emit writes block as one chunk (an empty block writes only the stream
// identifier).
func (a *autoWriter) emit(block []byte) error {
	out := a.chunk[:0]
	if !a.started {
		out = append(out, snappyStreamID...)
		a.started = true
	}
	if len(block) > 0 {
		a.blocks++
		c := crc32.Checksum(block, crc32c)
		masked := (c>>15 | c<<17) + 0xa282ead8
		head := len(out)
		out = append(out, make([]byte, autoHeaderLen)...)
		typ := byte(chunkRaw)
		if a.worthCompressing(len(block)) {
			a.tried++
			t0 := a.now()
			// The room after out is at least MaxEncodedLen: s2 encodes
			// in place.
			enc := a.encode(a.chunk[len(out):cap(a.chunk)], block)
			took := float64(a.now().Sub(t0))
			if a.compNs > 0 {
				// One preempted block must not stop compression for long.
				took = min(took, 4*a.compNs)
			}
			a.compNs = ewma(a.compNs, took, compWeight)
			a.ratio = ewma(a.ratio, float64(len(enc))/float64(len(block)), ratioWeight)
			if len(enc) < len(block)-len(block)/8 {
				typ = chunkCompress
				out = append(out, enc...) // enc already sits there: a no-op copy
				a.compressed++
			}
		}
		if typ == chunkRaw {
			out = append(out, block...)
		}
		n := len(out) - head - 4 // checksum and data
		out[head] = typ
		out[head+1], out[head+2], out[head+3] = byte(n), byte(n>>8), byte(n>>16)
		binary.LittleEndian.PutUint32(out[head+4:], masked)
	}
	t0 := a.now()
	n, err := a.w.Write(out)
	a.writeNs = ewma(a.writeNs, float64(a.now().Sub(t0)), writeWeight)
	a.writeBytes = ewma(a.writeBytes, float64(len(out)), writeWeight)
	if err == nil && n < len(out) {
		err = io.ErrShortWrite
	}
	if err != nil {
		a.err = err
	}
	return err
}

// worthCompressing decides for the next block of n bytes. The time a
// write spends in the layers below is mostly time blocked while the link
// drains; the link drains on while the CPU compresses, so compressing is
// free as long as writing the block would block for longer than
// compressing it takes, and it pays when the block shrinks.
func (a *autoWriter) worthCompressing(n int) bool {
	if a.compNs == 0 || a.writeBytes == 0 || a.blocks%autoProbe == 0 {
		return true
	}
	if a.ratio > 1-1.0/8 {
		return false // recent blocks did not shrink enough to be sent compressed
	}
	return float64(n)*a.writeNs/a.writeBytes > a.compNs
}

// ewma moves avg towards x by weight w; a zero avg starts at x.
func ewma(avg, x, w float64) float64 {
	if avg == 0 {
		return x
	}
	return avg + w*(x-avg)
}
