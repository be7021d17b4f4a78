package stream

import (
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/pcluster/pcluster/internal/aesgcm"
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
		return aesgcm.New(k)
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

// sealWriter encrypts what is written to it. Close seals the last chunk; it
// does not close the underlying writer.
type sealWriter struct {
	a     cipher.AEAD
	w     io.Writer
	n     nonce
	buf   []byte // plaintext being collected, capacity encChunkSize
	err   error  // sticky
	close bool
	cerr  error // what Close returned
}

func newSealWriter(a cipher.AEAD, w io.Writer) *sealWriter {
	return &sealWriter{a: a, w: w, buf: make([]byte, 0, encChunkSize)}
}

func (s *sealWriter) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.close {
		return 0, errors.New("write after close")
	}
	total := len(p)
	for len(p) > 0 {
		// A full chunk is sealed only once more data arrives, so that the
		// last chunk is never empty unless the whole body is.
		if len(s.buf) == ChunkSize {
			if err := s.flush(s.buf, false); err != nil {
				return total - len(p), err
			}
		}
		if len(s.buf) == 0 && len(p) > ChunkSize {
			// A whole chunk with more after it: seal it straight from p
			// instead of copying it first.
			if err := s.flush(p[:ChunkSize], false); err != nil {
				return total - len(p), err
			}
			p = p[ChunkSize:]
			continue
		}
		n := copy(s.buf[len(s.buf):ChunkSize], p)
		s.buf = s.buf[:len(s.buf)+n]
		p = p[n:]
	}
	return total, nil
}

// flush seals plain (buf itself or a whole chunk of the caller's) into buf
// and writes it.
func (s *sealWriter) flush(plain []byte, last bool) error {
	s.n.setLast(last)
	out := s.a.Seal(s.buf[:0], s.n[:], plain, nil)
	if _, err := s.w.Write(out); err != nil {
		s.err = err
		return err
	}
	s.buf = s.buf[:0]
	if err := s.n.next(); err != nil {
		s.err = err
		return err
	}
	return nil
}

func (s *sealWriter) Close() error {
	if s.close {
		return s.cerr
	}
	s.close = true
	if s.err != nil {
		s.cerr = s.err
		return s.cerr
	}
	s.cerr = s.flush(s.buf, true)
	s.err = errors.New("write after close")
	return s.cerr
}

// openReader decrypts and verifies chunks. Plaintext of a chunk is returned
// only after the whole chunk verified; any failure sticks.
type openReader struct {
	a     cipher.AEAD
	r     io.Reader
	n     nonce
	buf   []byte // encChunkSize+1: a chunk plus one byte of look-ahead
	carry bool   // buf[0] holds the look-ahead byte of the previous read
	plain []byte // verified plaintext not yet returned (aliases buf)
	last  bool   // the last chunk has been verified
	err   error  // sticky
}

func newOpenReader(a cipher.AEAD, r io.Reader) *openReader {
	return &openReader{a: a, r: r, buf: make([]byte, encChunkSize+1)}
}

func (o *openReader) Read(p []byte) (int, error) {
	for len(o.plain) == 0 {
		if o.err != nil {
			return 0, o.err
		}
		if o.last {
			o.err = io.EOF
			return 0, io.EOF
		}
		n, err := o.readChunk(p)
		if err != nil {
			o.err = err
			o.plain = nil
			return 0, err
		}
		if n > 0 {
			return n, nil
		}
	}
	n := copy(p, o.plain)
	o.plain = o.plain[n:]
	return n, nil
}

// readChunk reads one sealed chunk and one byte beyond it: if that byte
// exists the chunk is not the last, else it must be. If p holds the whole
// plaintext it is opened straight into p and its length returned (AEADs
// leave nothing in p when authentication fails); else it is opened in
// place into o.plain.
func (o *openReader) readChunk(p []byte) (int, error) {
	start := 0
	if o.carry {
		// The look-ahead byte still sits past the previous chunk.
		o.buf[0] = o.buf[encChunkSize]
		start = 1
	}
	n, err := io.ReadFull(o.r, o.buf[start:])
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
	}
	o.n.setLast(last)
	dst := o.buf[:0]
	direct := len(p) >= size-tagSize
	if direct {
		dst = p[:0]
	}
	plain, aerr := o.a.Open(dst, o.n[:], o.buf[:size], nil)
	if aerr != nil {
		return 0, fmt.Errorf("chunk %d: %w", o.n.counter(), errChunkAuth)
	}
	if last && len(plain) == 0 && o.n.counter() != 0 {
		// The writer never produces an empty last chunk after data.
		return 0, fmt.Errorf("chunk %d: empty last chunk", o.n.counter())
	}
	o.carry = !last
	o.last = last
	if err := o.n.next(); err != nil {
		return 0, err
	}
	if direct {
		return len(plain), nil
	}
	o.plain = plain
	return 0, nil
}
