package stream

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/klauspost/compress/s2"
)

// clock is a fake time that moves only when told to.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// costlyWriter takes perWrite + perByte × len(p) of the fake clock's time.
type costlyWriter struct {
	w                 io.Writer
	c                 *clock
	perWrite, perByte time.Duration
}

func (s costlyWriter) Write(p []byte) (int, error) {
	s.c.t = s.c.t.Add(s.perWrite + time.Duration(len(p))*s.perByte)
	return s.w.Write(p)
}

// auto compresses the blocks when what it writes to is slower than the
// compressor, sends them as they are when it keeps up, never compresses
// what does not shrink, and any snappy reader decodes what it wrote. The
// clock is fake, so that a loaded machine does not change the decisions.
func TestAutoAdapts(t *testing.T) {
	const size = 4 << 20 // 64 blocks
	page := pageLikeData(size)
	random := randomData(size)
	for _, c := range []struct {
		name              string
		data              []byte
		perWrite, perByte time.Duration // what the writer takes
		compress          time.Duration // what compressing a block takes
		min, max          float64       // share of blocks compressed
	}{
		// A write blocks 1 ms, compressing takes 30 µs: compress.
		{"compressible, slow writer", page, time.Millisecond, 0, 30 * time.Microsecond, 1, 1},
		// Writing a block takes 66 µs (1 GB/s), compressing it 300 µs:
		// send it as it is (the first block and the probes excepted).
		{"compressible, fast writer", page, 0, 1, 300 * time.Microsecond, 0, 0.05},
		// Nothing shrinks: only the first block and the probes are tried.
		{"random, slow writer", random, time.Millisecond, 0, 30 * time.Microsecond, 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			clk := &clock{t: time.Unix(0, 0)}
			a := newAutoWriter(costlyWriter{&out, clk, c.perWrite, c.perByte})
			a.now = clk.now
			a.encode = func(dst, src []byte) []byte {
				clk.t = clk.t.Add(c.compress)
				return s2.EncodeSnappy(dst, src)
			}
			// Writes of every size, as the record encoder's are not aligned.
			for p, i := c.data, 0; len(p) > 0; i++ {
				n := min(len(p), []int{100, autoBlock, 3 * autoBlock, 5000}[i%4])
				if _, err := a.Write(p[:n]); err != nil {
					t.Fatal(err)
				}
				p = p[n:]
			}
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}
			share := float64(a.compressed) / float64(a.blocks)
			t.Logf("%d of %d blocks compressed (%d tried), %d bytes written for %d", a.compressed, a.blocks, a.tried, out.Len(), len(c.data))
			if share < c.min || share > c.max {
				t.Errorf("%.2f of the blocks compressed, want %.2f..%.2f", share, c.min, c.max)
			}
			if a.tried > a.compressed && a.tried-a.compressed > a.blocks/autoProbe+2 {
				t.Errorf("tried %d blocks that did not shrink: no back-off", a.tried-a.compressed)
			}
			got, err := io.ReadAll(s2.NewReader(&out, s2.ReaderMaxBlockSize(64<<10)))
			if err != nil || !bytes.Equal(got, c.data) {
				t.Fatalf("snappy reader: %d bytes, %v; want the %d written", len(got), err, len(c.data))
			}
		})
	}
}

// One compression that takes 100 ms (a preempted thread) instead of 30 µs
// does not make auto stop compressing for long over a writer that blocks
// 200 µs a write.
func TestAutoOutlier(t *testing.T) {
	var out bytes.Buffer
	clk := &clock{t: time.Unix(0, 0)}
	a := newAutoWriter(costlyWriter{&out, clk, 200 * time.Microsecond, 0})
	a.now = clk.now
	calls := 0
	a.encode = func(dst, src []byte) []byte {
		calls++
		if calls == 10 {
			clk.t = clk.t.Add(100 * time.Millisecond)
		} else {
			clk.t = clk.t.Add(30 * time.Microsecond)
		}
		return s2.EncodeSnappy(dst, src)
	}
	if _, err := a.Write(pageLikeData(8 << 20)); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if a.compressed < a.blocks-8 {
		t.Errorf("%d of %d blocks compressed after one slow compression, want all but a few", a.compressed, a.blocks)
	}
}

// An empty body is a stream identifier alone, which readers take as empty.
func TestAutoEmpty(t *testing.T) {
	var out bytes.Buffer
	a := newAutoWriter(&out)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if out.String() != snappyStreamID {
		t.Fatalf("wrote %q, want the stream identifier", out.String())
	}
	if got, err := io.ReadAll(s2.NewReader(&out)); err != nil || len(got) != 0 {
		t.Fatalf("read %d bytes, %v", len(got), err)
	}
	if _, err := a.Write([]byte("x")); err == nil {
		t.Fatal("write after close accepted")
	}
}

// linkWriter models a socket: a buffer of cap bytes draining at rate B/s,
// on the fake clock c (a write that overfills the buffer takes the time
// the excess needs to drain).
type linkWriter struct {
	c      *clock
	cap    float64
	rate   float64
	queued float64
	last   time.Time
}

func (l *linkWriter) Write(p []byte) (int, error) {
	l.drain()
	l.queued += float64(len(p))
	if over := l.queued - l.cap; over > 0 {
		l.c.t = l.c.t.Add(time.Duration(over / l.rate * 1e9))
		l.drain()
	}
	return len(p), nil
}

func (l *linkWriter) drain() {
	now := l.c.now()
	if !l.last.IsZero() {
		l.queued = max(0, l.queued-now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
}

// netLike buffers small writes up to 256 KiB like netSink.
type netLike struct {
	l   *linkWriter
	buf []byte
}

func (n *netLike) Write(p []byte) (int, error) {
	if len(p) >= 32<<10 {
		if len(n.buf) > 0 {
			n.l.Write(n.buf)
			n.buf = n.buf[:0]
		}
		return n.l.Write(p)
	}
	if len(n.buf)+len(p) > 256<<10 {
		n.l.Write(n.buf)
		n.buf = n.buf[:0]
	}
	n.buf = append(n.buf, p...)
	return len(p), nil
}

// Over a modelled slow link (a 1 MiB socket buffer draining at 30 MB/s)
// behind netSink's 256 KiB frame buffer, where writes block in bursts,
// auto compresses nearly every block once the socket buffer has filled.
// Time is the fake clock's: compressing costs 1 ns a byte (s2 on one
// core does better), so the machine's load cannot change the verdict (it
// did: 261 of 512 once, on a loaded machine, with the real clock).
func TestAutoOverSlowLink(t *testing.T) {
	data := pageLikeData(32 << 20)
	clk := &clock{t: time.Unix(0, 0)}
	l := &linkWriter{c: clk, cap: 1 << 20, rate: 30e6}
	a := newAutoWriter(&netLike{l: l})
	a.now = clk.now
	a.encode = func(dst, src []byte) []byte {
		clk.t = clk.t.Add(time.Duration(len(src)))
		return s2.EncodeSnappy(dst, src)
	}
	for p := data; len(p) > 0; {
		n := min(len(p), 256<<10)
		if _, err := a.Write(p[:n]); err != nil {
			t.Fatal(err)
		}
		p = p[n:]
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	t.Logf("%d of %d blocks compressed", a.compressed, a.blocks)
	if a.compressed < a.blocks*85/100 {
		t.Errorf("%d of %d blocks compressed, want 85 %%", a.compressed, a.blocks)
	}
}
