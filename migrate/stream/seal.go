package stream

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"

	"golang.org/x/crypto/chacha20poly1305"
)

// The encryption layer is a STREAM construction (Hoang, Reyhanitabar, Rogaway,
// Vizár 2015) laid out like age's payload: the body is cut into chunks of
// ChunkSize plaintext bytes, each sealed with an AEAD under a per-stream key;
// the 12-byte nonce is an 11-byte big-endian chunk counter followed by a flag
// byte that is 1 only on the last chunk. Reordering, dropping, duplicating or
// truncating chunks therefore changes some nonce and fails authentication.
// The per-stream key is derived from the key file with HKDF over a random
// salt and the exact header line, so the header is authenticated by every
// chunk and no (key, nonce) pair is ever reused across streams.

// ChunkSize is the plaintext size of every chunk but the last.
const ChunkSize = 64 << 10

// maxWorkers bounds the chunks one stream seals or opens at once, and so
// its buffers: 8 × 64 KiB. Eight cores of AES-GCM (4 GB/s each here)
// outrun any link.
const maxWorkers = 8

// workers is how many chunks a stream seals or opens at once: one per core
// Go may use beyond the first, at most maxWorkers. The first core is the
// caller's: it reads or writes the stream and produces or consumes the
// plaintext, and the kernel's network stack runs beside it. On 2 cores,
// sealing on the second only moved work between two busy cores and cost
// CPU (docs/benchmarks.md, "crypto/cipher instead of internal/aesgcm"), so
// there everything happens in the caller's goroutine.
func workers() int { return max(1, min(runtime.GOMAXPROCS(0)-1, maxWorkers)) }

const (
	tagSize      = 16
	encChunkSize = ChunkSize + tagSize
	nonceSize    = 12
	saltSize     = 16
	lastFlag     = 1
)

// Cipher is an authenticated encryption of the body: CipherNone (or ""),
// CipherAESGCM or CipherChaCha20.
type Cipher string

// Cipher names as they appear in -encrypt and on the header line.
const (
	CipherNone     = "none"
	CipherAESGCM   = "aes-gcm"
	CipherChaCha20 = "chacha20-poly1305"
)

// Labels for HKDF: changing any of them is a format change.
const (
	infoPayload   = "pcluster-stream v1 payload "
	infoHandshake = "pcluster-stream v1 handshake "
)

var errChunkAuth = errors.New("chunk failed authentication: wrong key, or the stream was altered, reordered or truncated")

// deriveKeys returns the payload key and the handshake key for a stream whose
// header line (newline included) is line.
func deriveKeys(master *key, cipherName string, salt []byte, line string) (payload, handshake []byte, err error) {
	payload, err = hkdf.Key(sha256.New, master.bytes[:], salt, infoPayload+cipherName+"\n"+line, KeySize)
	if err != nil {
		return nil, nil, err
	}
	handshake, err = hkdf.Key(sha256.New, master.bytes[:], salt, infoHandshake+cipherName+"\n"+line, KeySize)
	return payload, handshake, err
}

func newAEAD(name string, k []byte) (cipher.AEAD, error) {
	switch name {
	case CipherAESGCM:
		b, err := aes.NewCipher(k)
		if err != nil {
			return nil, err
		}
		return cipher.NewGCM(b)
	case CipherChaCha20:
		return chacha20poly1305.New(k)
	}
	return nil, fmt.Errorf("unknown cipher %q", name)
}

// nonce tracks the STREAM nonce: counter in bytes 0..10, flag in byte 11.
type nonce [nonceSize]byte

func (n *nonce) setLast(last bool) {
	if last {
		n[nonceSize-1] = lastFlag
	} else {
		n[nonceSize-1] = 0
	}
}

// counter returns the low 64 bits of the chunk counter, for messages.
func (n *nonce) counter() uint64 {
	return binary.BigEndian.Uint64(n[nonceSize-9 : nonceSize-1])
}

// next increments the counter; it fails rather than wrap (2^88 chunks).
func (n *nonce) next() error {
	for i := nonceSize - 2; i >= 0; i-- {
		n[i]++
		if n[i] != 0 {
			return nil
		}
	}
	return errors.New("chunk counter overflow")
}

// chunk is one chunk on its way through the AEAD. Between start and wait
// its job (n, in, seal) is read by whoever seals or opens it; otherwise it
// belongs to the sealWriter or openReader whose ring holds it.
type chunk struct {
	n    nonce
	buf  []byte // the sealed chunk; plaintext collected here is sealed in place
	in   []byte // what the job seals or opens
	out  []byte // its result (aliases buf)
	err  error  // Open's
	seal bool
	// state is chunkQueued from start until a goroutine or the owner
	// takes the job (chunkTaken); chunkIdle once the owner has the result.
	state    atomic.Int32
	finished bool          // the owner has the result: ran it, or received from done
	done     chan struct{} // one value from the goroutine that took the job
	aead     cipher.AEAD
}

const (
	chunkIdle int32 = iota
	chunkQueued
	chunkTaken
)

func newChunk(a cipher.AEAD, size int) *chunk {
	return &chunk{buf: make([]byte, 0, size), done: make(chan struct{}, 1), aead: a}
}

func (c *chunk) work() {
	if c.seal {
		c.out = c.aead.Seal(c.buf[:0], c.n[:], c.in, nil)
	} else {
		// Open leaves nothing in out when authentication fails.
		c.out, c.err = c.aead.Open(c.buf[:0], c.n[:], c.in, nil)
	}
}

// crew seals or opens the chunks queued to it on up to max goroutines of
// its own, which take the oldest queued chunk first and end as soon as none
// is queued: a stream has no goroutine while it waits for I/O, and none
// survives it.
type crew struct {
	queue   chan *chunk
	running atomic.Int32 // goroutines in loop; only add increments it
	max     int32
	loop    func() // made once: starting it allocates nothing
}

func newCrew(depth int) *crew {
	w := &crew{queue: make(chan *chunk, 2*depth+2), max: int32(depth - 1)}
	w.loop = func() {
		for {
			select {
			case c := <-w.queue:
				// The owner may have taken the job, and even given
				// c a new one since: whoever takes it runs it once.
				if c.state.CompareAndSwap(chunkQueued, chunkTaken) {
					c.work()
					c.done <- struct{}{}
				}
			default:
				w.running.Add(-1)
				return
			}
		}
	}
	return w
}

// start seals or opens c in the caller's goroutine when w is nil (depth
// 1), else queues it to w's goroutines, starting one if fewer than max
// run. A goroutine that stops just as c is queued may leave it to the
// owner, whose wait then does it.
func (w *crew) start(c *chunk) {
	if w == nil {
		c.work()
		c.finished = true
		return
	}
	c.state.Store(chunkQueued)
	select {
	case w.queue <- c:
	default:
		return // full of jobs already taken: the owner does this one
	}
	if w.running.Load() < w.max {
		w.running.Add(1)
		go w.loop()
	}
}

// poll reports without blocking whether c's result is there.
func (c *chunk) poll() bool {
	if !c.finished && c.state.Load() != chunkQueued {
		select {
		case <-c.done:
			c.finished = true
		default:
		}
	}
	return c.finished
}

// wait returns once c's result is there: if no goroutine has taken the
// job yet (the cores are busy elsewhere), the caller does it rather than
// wait for one.
func (c *chunk) wait() {
	if !c.finished {
		if c.state.CompareAndSwap(chunkQueued, chunkTaken) {
			c.work()
		} else {
			<-c.done
		}
	}
	c.finished = false
	c.state.Store(chunkIdle)
}

// drop is wait for a result nobody will use: a job no goroutine has taken
// is not done at all.
func (c *chunk) drop() {
	if !c.finished && !c.state.CompareAndSwap(chunkQueued, chunkTaken) {
		<-c.done
	}
	c.finished = false
	c.state.Store(chunkIdle)
}

// sealWriter encrypts what is written to it, up to depth chunks at once,
// and writes the sealed chunks in order from the caller's goroutine (no
// goroutine but the sealing ones, which end with their chunk). Close seals
// the last chunk; it does not close the underlying writer.
type sealWriter struct {
	a     cipher.AEAD
	w     io.Writer
	n     nonce // of the next chunk to seal
	depth int
	// ring holds the chunks in flight, ring[head] the oldest, and after
	// them the one being filled: depth+1 chunks, made when first needed.
	ring  []*chunk
	head  int
	busy  int   // chunks in flight, at most depth
	crew  *crew // nil when depth is 1
	err   error // sticky
	close bool
	cerr  error // what Close returned
}

func newSealWriter(a cipher.AEAD, w io.Writer, depth int) *sealWriter {
	depth = max(depth, 1)
	s := &sealWriter{a: a, w: w, depth: depth, ring: make([]*chunk, depth+1)}
	if depth > 1 {
		s.crew = newCrew(depth)
	}
	return s
}

// filling returns the chunk that collects plaintext.
func (s *sealWriter) filling() *chunk {
	i := (s.head + s.busy) % len(s.ring)
	if s.ring[i] == nil {
		s.ring[i] = newChunk(s.a, encChunkSize)
	}
	return s.ring[i]
}

func (s *sealWriter) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.close {
		return 0, errors.New("write after close")
	}
	total := len(p)
	direct := false
	for len(p) > 0 {
		f := s.filling()
		// A full chunk is sealed only once more data arrives, so that the
		// last chunk is never empty unless the whole body is.
		if len(f.buf) == ChunkSize {
			if err := s.submit(f, f.buf, false); err != nil {
				return s.fail(total - len(p))
			}
			continue
		}
		if len(f.buf) == 0 && len(p) > ChunkSize {
			// A whole chunk with more after it: seal it straight from p
			// instead of copying it first.
			if err := s.submit(f, p[:ChunkSize], false); err != nil {
				return s.fail(total - len(p))
			}
			direct = true
			p = p[ChunkSize:]
			continue
		}
		n := copy(f.buf[len(f.buf):ChunkSize], p)
		f.buf = f.buf[:len(f.buf)+n]
		p = p[n:]
	}
	// Chunks sealed from p must be written before p goes back to the
	// caller; others only if they are ready.
	for s.busy > 0 {
		ok, err := s.retire(direct)
		if err != nil {
			return s.fail(total)
		}
		if !ok {
			break
		}
	}
	return total, nil
}

// submit starts sealing c's plaintext in, once a chunk is free to collect
// the next.
func (s *sealWriter) submit(c *chunk, in []byte, last bool) error {
	if s.busy == s.depth {
		if _, err := s.retire(true); err != nil {
			return err
		}
	}
	c.in, c.seal, c.n = in, true, s.n
	c.n.setLast(last)
	if err := s.n.next(); err != nil {
		s.err = err
		return err
	}
	s.busy++
	s.crew.start(c)
	return nil
}

// retire writes the oldest chunk in flight once it is sealed; without
// wait only if it already is (ok says whether it was).
func (s *sealWriter) retire(wait bool) (ok bool, err error) {
	c := s.ring[s.head]
	if !wait && !c.poll() {
		return false, nil
	}
	c.wait()
	s.head = (s.head + 1) % len(s.ring)
	s.busy--
	out := c.out
	c.buf, c.in, c.out = c.buf[:0], nil, nil
	if _, err := s.w.Write(out); err != nil {
		s.err = err
		return true, err
	}
	return true, nil
}

// fail waits for every chunk still being sealed (they may read the
// caller's buffer) and returns the sticky error with n.
func (s *sealWriter) fail(n int) (int, error) {
	for ; s.busy > 0; s.busy-- {
		c := s.ring[s.head]
		c.drop()
		c.buf, c.in, c.out = c.buf[:0], nil, nil
		s.head = (s.head + 1) % len(s.ring)
	}
	return n, s.err
}

func (s *sealWriter) Close() error {
	if s.close {
		return s.cerr
	}
	s.close = true
	if s.err == nil {
		f := s.filling()
		if err := s.submit(f, f.buf, true); err == nil {
			for s.busy > 0 {
				if _, err := s.retire(true); err != nil {
					break
				}
			}
		}
	}
	if s.err != nil {
		s.fail(0)
		s.cerr = s.err
		return s.cerr
	}
	s.err = errors.New("write after close")
	return nil
}

// openReader decrypts and verifies chunks. Plaintext of a chunk is returned
// only after the whole chunk verified; any failure sticks. It reads ahead
// and opens up to depth chunks at once, all I/O in the caller's goroutine;
// errors come in stream order: a chunk that fails, or a read that does,
// is reported after the chunks before it have been returned.
type openReader struct {
	a     cipher.AEAD
	r     io.Reader
	n     nonce // of the next chunk to read
	depth int
	// ring holds the chunks read and being opened, ring[head] the oldest.
	ring  []*chunk
	head  int
	busy  int
	crew  *crew  // nil when depth is 1
	carry bool   // look holds the look-ahead byte of the previous read
	look  byte   // the first byte of the next chunk
	ended bool   // the last chunk has been read
	rerr  error  // a read failed: reported once the chunks before it are
	plain []byte // verified plaintext not yet returned (aliases a chunk's buf)
	last  bool   // the last chunk has been verified
	err   error  // sticky
}

func newOpenReader(a cipher.AEAD, r io.Reader, depth int) *openReader {
	depth = max(depth, 1)
	o := &openReader{a: a, r: r, depth: depth, ring: make([]*chunk, depth)}
	if depth > 1 {
		o.crew = newCrew(depth)
	}
	return o
}

func (o *openReader) Read(p []byte) (int, error) {
	for len(o.plain) == 0 {
		switch {
		case o.err != nil:
			return 0, o.err
		case o.busy > 0 && (o.ended || o.rerr != nil || o.busy == o.depth || o.ready()):
			if err := o.collect(); err != nil {
				return 0, o.fail(err)
			}
		case o.rerr != nil:
			return 0, o.fail(o.rerr)
		case o.last:
			o.err = io.EOF
			return 0, io.EOF
		default:
			n, err := o.readChunk(p)
			if err != nil {
				o.rerr = err
				continue
			}
			if n > 0 {
				return n, nil
			}
		}
	}
	n := copy(p, o.plain)
	o.plain = o.plain[n:]
	return n, nil
}

// ready reports whether the oldest chunk in flight has been opened.
func (o *openReader) ready() bool { return o.ring[o.head].poll() }

// collect waits for the oldest chunk in flight and makes its plaintext
// the next to return.
func (o *openReader) collect() error {
	c := o.ring[o.head]
	c.wait()
	o.head = (o.head + 1) % len(o.ring)
	o.busy--
	plain, err := c.out, c.err
	c.in, c.out, c.err = nil, nil, nil
	if err := o.verified(&c.n, plain, err); err != nil {
		return err
	}
	o.plain = plain
	return nil
}

// verified checks the result of opening the chunk of nonce n.
func (o *openReader) verified(n *nonce, plain []byte, err error) error {
	if err != nil {
		return fmt.Errorf("chunk %d: %w", n.counter(), errChunkAuth)
	}
	last := n[nonceSize-1] == lastFlag
	if last && len(plain) == 0 && n.counter() != 0 {
		// The writer never produces an empty last chunk after data.
		return fmt.Errorf("chunk %d: empty last chunk", n.counter())
	}
	o.last = last
	return nil
}

// fail makes err stick once every chunk still being opened is done.
func (o *openReader) fail(err error) error {
	for ; o.busy > 0; o.busy-- {
		c := o.ring[o.head]
		c.drop()
		c.in, c.out, c.err = nil, nil, nil
		o.head = (o.head + 1) % len(o.ring)
	}
	o.plain = nil
	o.err = err
	return err
}

// readChunk reads one sealed chunk and one byte beyond it: if that byte
// exists the chunk is not the last, else it must be. The first chunk, and
// every chunk when depth is 1, is opened at once in the caller's goroutine
// (a listener vetting a sender reads only the first): straight into p when
// p holds the whole plaintext, whose length is then returned (AEADs leave
// nothing in p when authentication fails), else in place. Other chunks
// start opening in place in a goroutine of their own.
func (o *openReader) readChunk(p []byte) (int, error) {
	i := (o.head + o.busy) % len(o.ring)
	if o.ring[i] == nil {
		o.ring[i] = newChunk(o.a, encChunkSize+1)
	}
	c := o.ring[i]
	buf := c.buf[:encChunkSize+1]
	start := 0
	if o.carry {
		buf[0] = o.look
		start = 1
	}
	n, err := io.ReadFull(o.r, buf[start:])
	n += start
	last := false
	switch {
	case err == nil:
		// A full chunk plus one byte: not the last.
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		last = true
		if n < tagSize {
			if n == 0 && o.n.counter() != 0 {
				return 0, fmt.Errorf("chunk %d: %w", o.n.counter(), io.ErrUnexpectedEOF)
			}
			return 0, fmt.Errorf("chunk %d: truncated (%d bytes): %w", o.n.counter(), n, io.ErrUnexpectedEOF)
		}
	default:
		return 0, err
	}
	size := n
	if !last {
		size = encChunkSize
		o.look = buf[encChunkSize]
	}
	o.carry, o.ended = !last, last
	c.n = o.n
	c.n.setLast(last)
	if err := o.n.next(); err != nil {
		return 0, err
	}
	c.in, c.seal = buf[:size], false
	if o.depth > 1 && c.n.counter() != 0 {
		o.busy++
		o.crew.start(c)
		return 0, nil
	}
	dst := buf[:0]
	direct := len(p) >= size-tagSize
	if direct {
		dst = p[:0]
	}
	plain, aerr := o.a.Open(dst, c.n[:], c.in, nil)
	c.in = nil
	if err := o.verified(&c.n, plain, aerr); err != nil {
		return 0, err
	}
	if direct {
		return len(plain), nil
	}
	o.plain = plain
	return 0, nil
}
