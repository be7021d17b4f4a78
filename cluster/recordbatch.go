package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"
)

// A source agent sends a migration's snapshot on mutual TLS, and
// crypto/tls writes every record it seals (16 KiB of payload at most)
// with a write(2) of its own: 65,536 system calls for a GiB, where pfreeze
// writes 1 MiB chunks (docs/benchmarks.md, "A 1 GiB migration through the
// cluster"). batchedTLS gathers the records of each Write under the
// tls.Conn and sends them with one write when that Write ends. Nothing
// changes on the wire: the same records, in the same order, sealed the
// same way.
//
// A Write of at most holdMax bytes is held a little longer: the stream
// frames each 64 KiB block with a 5-byte header written on its own
// (net.Buffers, which a tls.Conn cannot send as one writev), and sent
// alone it would cost a system call and a packet of its own, 16,384 a
// GiB. It leaves with the next Write, before any Read (the stream's
// handshake writes, then waits for the receiver's answer: that answer
// cannot depend on bytes still held), at Close, or after holdFor.

// holdMax is the longest Write that is held; holdFor the longest it is.
const (
	holdMax = 64
	holdFor = 2 * time.Millisecond
)

// batchMax is the most recordBatch holds before it writes during a Write:
// the stream's largest frame (1 MiB) and its records' overhead.
const batchMax = 1<<20 + 64<<10

// recordBatch is the TCP connection under the tls.Conn. Between start and
// end its writes (crypto/tls's records) go into buf; outside them, and for
// the writes of another goroutine (tls.Conn.Close's close_notify), they go
// straight out, after what buf holds.
type recordBatch struct {
	net.Conn

	mu  sync.Mutex // guards the fields below and orders writes to Conn
	on  bool       // a batchedTLS.Write is under way
	buf []byte
	err error // the first failed write: every later one fails with it
}

func (b *recordBatch) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if !b.on {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
		n, err := b.Conn.Write(p)
		if err != nil {
			b.err = err
		}
		return n, err
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) >= batchMax {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// flushLocked writes what buf holds. A failure sticks: the records after
// it would reach the peer with a gap, which it must never see as a stream.
func (b *recordBatch) flushLocked() error {
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.Conn.Write(b.buf)
	b.buf = b.buf[:0]
	if err != nil {
		b.err = err
	}
	return err
}

func (b *recordBatch) start() {
	b.mu.Lock()
	b.on = true
	b.mu.Unlock()
}

// hold stops gathering and keeps what was gathered for the next write or
// end.
func (b *recordBatch) hold() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.on = false
	return b.err
}

// flush writes what is held, whether or not a Write is under way.
func (b *recordBatch) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return b.err
	}
	return b.flushLocked()
}

// flushIdle writes what is held unless a Write is under way, whose end
// will. A failure sticks, for the next Write or Read to report.
func (b *recordBatch) flushIdle() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.on && b.err == nil {
		_ = b.flushLocked()
	}
}

// end stops gathering and writes what was gathered.
func (b *recordBatch) end() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.on = false
	if b.err != nil {
		return b.err
	}
	return b.flushLocked()
}

// batchedTLS is a tls.Conn whose writes leave in one write(2) each (up to
// batchMax).
type batchedTLS struct {
	*tls.Conn
	batch *recordBatch
	wmu   sync.Mutex    // one Write at a time: start and end bracket its records
	timer *time.Timer   // sends what a short Write left held
	wait  time.Duration // holdFor; tests make it longer
}

// dialBatchedTLS runs the client side of the handshake (cfg) on raw and
// returns the connection; ctx bounds the handshake.
func dialBatchedTLS(ctx context.Context, raw net.Conn, cfg *tls.Config) (*batchedTLS, error) {
	b := &recordBatch{Conn: raw}
	tc := tls.Client(b, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", raw.RemoteAddr(), err)
	}
	c := &batchedTLS{Conn: tc, batch: b, wait: holdFor}
	c.timer = time.AfterFunc(time.Hour, b.flushIdle)
	c.timer.Stop()
	return c, nil
}

func (c *batchedTLS) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.batch.start()
	n, err := c.Conn.Write(p)
	if err == nil && len(p) <= holdMax {
		if ferr := c.batch.hold(); ferr != nil {
			return 0, ferr
		}
		c.timer.Reset(c.wait)
		return n, nil
	}
	if ferr := c.batch.end(); ferr != nil && err == nil {
		// Sealed but not sent: none of it may count as written.
		return 0, ferr
	}
	return n, err
}

// Read first sends what a short Write left held.
func (c *batchedTLS) Read(p []byte) (int, error) {
	if err := c.batch.flush(); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

// Close closes; what is held leaves first, with the close_notify
// (recordBatch.Write), under the deadline crypto/tls sets for it. It
// does not wait for a Write under way (it is what ends a blocked one).
func (c *batchedTLS) Close() error {
	c.timer.Stop()
	return c.Conn.Close()
}
