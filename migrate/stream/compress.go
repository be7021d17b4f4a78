package stream

import (
	"fmt"
	"io"
	"runtime"
	"strconv"
	"strings"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// Compression names as they appear in -compress and on the header line.
const (
	CompressNone   = "none"
	CompressGzip   = "gzip"
	CompressFlate  = "flate"
	CompressSnappy = "snappy"
	CompressZstd   = "zstd"
	// CompressAuto writes the snappy format (the header says snappy),
	// compressing only the blocks that cost the transfer no time.
	CompressAuto = "auto"
)

// maxZstdWindow bounds the memory a (possibly hostile) zstd body can make
// the reader allocate. Our writer never uses windows above 8 MiB.
const maxZstdWindow = 64 << 20

// Codec is a body compression: Name is one of the Compress* names ("" is
// none); Level, for gzip and flate 1..9 and for zstd 1..22, 0 meaning the
// codec's fastest level, the default: a migration is waiting on it.
type Codec struct {
	Name  string
	Level int
}

// ParseCodec parses a -compress value: none (or empty), auto, gzip,
// flate, snappy or zstd, the last three levelled ones optionally followed
// by :LEVEL.
func ParseCodec(s string) (Codec, error) {
	name, lvl, hasLevel := strings.Cut(s, ":")
	c := Codec{Name: strings.ToLower(name)}
	if c.Name == "" {
		c.Name = CompressNone
	}
	if err := c.checkName(s); err != nil {
		return c, err
	}
	if !hasLevel {
		return c, nil
	}
	lo, hi := c.levels()
	if hi == 0 {
		return c, fmt.Errorf("compression %q takes no level", c.Name)
	}
	n, err := strconv.Atoi(lvl)
	if err != nil || n < lo || n > hi {
		return c, fmt.Errorf("compression %q: level must be %d..%d", s, lo, hi)
	}
	c.Level = n
	return c, nil
}

// String returns c as ParseCodec reads it.
func (c Codec) String() string {
	if c.Level != 0 {
		return c.Name + ":" + strconv.Itoa(c.Level)
	}
	return c.name()
}

func (c Codec) name() string {
	if c.Name == "" {
		return CompressNone
	}
	return c.Name
}

// levels returns the range of levels of c's codec; hi is 0 for a codec
// without levels.
func (c Codec) levels() (lo, hi int) {
	switch c.name() {
	case CompressGzip, CompressFlate:
		return 1, 9
	case CompressZstd:
		return 1, 22
	}
	return 0, 0
}

func (c Codec) checkName(spec string) error {
	switch c.name() {
	case CompressNone, CompressSnappy, CompressAuto, CompressGzip, CompressFlate, CompressZstd:
		return nil
	}
	return fmt.Errorf("unknown compression %q (want none, auto, gzip, flate, snappy or zstd, optionally gzip:LEVEL, flate:LEVEL, zstd:LEVEL)", spec)
}

// check validates a Codec built by a caller rather than ParseCodec.
func (c Codec) check() error {
	if err := c.checkName(c.Name); err != nil {
		return err
	}
	lo, hi := c.levels()
	switch {
	case c.Level != 0 && hi == 0:
		return fmt.Errorf("compression %q takes no level", c.name())
	case c.Level != 0 && (c.Level < lo || c.Level > hi):
		return fmt.Errorf("compression %q: level must be %d..%d", c.String(), lo, hi)
	}
	return nil
}

// newCompressor wraps w. Closing the result flushes the codec but not w.
func (c Codec) newCompressor(w io.Writer) (io.WriteCloser, error) {
	switch c.name() {
	case CompressNone:
		return nopWriteCloser{w}, nil
	case CompressGzip:
		return gzip.NewWriterLevel(w, c.levelOr(gzip.BestSpeed))
	case CompressFlate:
		return flate.NewWriter(w, c.levelOr(flate.BestSpeed))
	case CompressSnappy:
		return s2.NewWriter(w, s2.WriterSnappyCompat(), s2.WriterConcurrency(codecConcurrency())), nil
	case CompressAuto:
		return newAutoWriter(w), nil
	case CompressZstd:
		lvl := zstd.SpeedFastest
		if c.Level != 0 {
			lvl = zstd.EncoderLevelFromZstd(c.Level)
		}
		return zstd.NewWriter(w, zstd.WithEncoderLevel(lvl), zstd.WithEncoderConcurrency(codecConcurrency()))
	}
	return nil, fmt.Errorf("unknown compression %q", c.Name)
}

// codecConcurrency is how many goroutines a codec may compress or
// decompress with: every core but one, which the rest of the pipeline
// keeps busy (pfreeze reads the process's memory and writes the socket,
// pthaw places pages). On 2 cores that is 1: letting s2 and zstd use both
// made a migration at 10 Gbit/s 7-10 % slower on random data, their
// goroutines taking turns with the pipeline instead of running beside it
// (docs/benchmarks.md).
func codecConcurrency() int {
	return max(1, runtime.GOMAXPROCS(0)-1)
}

// wireName is the compression the header names: the format a reader
// decodes.
func (c Codec) wireName() string {
	if c.Name == CompressAuto {
		return CompressSnappy
	}
	return c.name()
}

func (c Codec) levelOr(def int) int {
	if c.Level == 0 {
		return def
	}
	return c.Level
}

// newDecompressor wraps r, which must be a *bufio.Reader-like io.ByteReader
// so that the codecs that stop at their own end marker (flate, gzip) consume
// nothing past it and the caller can check what follows.
func newDecompressor(name string, r io.Reader) (io.ReadCloser, error) {
	switch name {
	case CompressGzip:
		z, err := gzip.NewReader(r)
		if err != nil {
			return nil, err
		}
		z.Multistream(false)
		return z, nil
	case CompressFlate:
		return flate.NewReader(r), nil
	case CompressSnappy:
		// Snappy framing blocks hold at most 64 KiB: do not allocate for
		// (or accept) the 4 MiB blocks of native s2. Each block's CRC-32C
		// is not checked: the snapshot below carries its own CRC-32C over
		// every byte, checked before anything runs (and an encrypted
		// stream is authenticated), so it would only cost a pass over
		// the data.
		return io.NopCloser(s2.NewReader(r, s2.ReaderMaxBlockSize(64<<10), s2.ReaderIgnoreCRC())), nil
	case CompressZstd:
		d, err := zstd.NewReader(r, zstd.WithDecoderMaxWindow(maxZstdWindow), zstd.WithDecoderConcurrency(codecConcurrency()))
		if err != nil {
			return nil, err
		}
		return zstdCloser{d}, nil
	}
	return nil, fmt.Errorf("unknown compression %q", name)
}

type zstdCloser struct{ d *zstd.Decoder }

func (z zstdCloser) Read(p []byte) (int, error) { return z.d.Read(p) }
func (z zstdCloser) Close() error               { z.d.Close(); return nil }

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }
