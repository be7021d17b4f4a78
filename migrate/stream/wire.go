package stream

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// The wire protocol carries a snapshot over a stream socket (tcp, unix) and
// then runs the migration handshake on the same connection. It is specified
// byte for byte in docs/stream.md; in short:
//
//	sender → receiver  "PCLUSTER-WIRE 1\n"
//	receiver → sender  "PCLUSTER-WIRE 1\n" + 16-byte nonce (goes on the header line as peer=)
//	sender → receiver  D frames (the snapshot: header line and body)
//	sender → receiver  E frame  (end of body; says whether a handshake follows)
//	receiver → sender  R frame  (built | failed: reason; receiver nonce)
//	sender → receiver  C frame  (commit: the original is gone, start the clone)
//	receiver → sender  K frame  (commit received)
//
// A frame is one type byte, a big-endian uint32 length and the payload.
// When the snapshot is encrypted, E, R, C and K end with an HMAC-SHA-256
// under a key derived (HKDF) from the stream key, the salt and the header
// line, so nobody without the key can forge "built" and make the sender
// kill the original, or forge "commit" and start a clone. R carries a fresh
// random nonce that C and K must echo, so an old commit cannot be replayed.

const wireHello = "PCLUSTER-WIRE 1\n"

var errProtocol = errors.New("protocol error")

const (
	frameData   = 'D'
	frameEnd    = 'E'
	frameReady  = 'R'
	frameCommit = 'C'
	frameAck    = 'K'

	frameHeaderSize = 5
	maxDataFrame    = 1 << 20
	sinkFrameSize   = 256 << 10
	macSize         = sha256.Size
	hsNonceSize     = 16
	maxReason       = 1024

	statusBuilt  = 0
	statusFailed = 1
)

// wireMAC authenticates one handshake message.
func wireMAC(k []byte, label string, fields ...[]byte) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte("pcluster-wire v1 " + label + "\x00"))
	for _, f := range fields {
		m.Write(f)
	}
	return m.Sum(nil)
}

// deadlineConn sets a deadline before every read and write, so a timeout
// bounds the wait for progress, not the whole transfer.
type deadlineConn struct {
	net.Conn
	rt, wt time.Duration
}

func (c *deadlineConn) Read(p []byte) (int, error) {
	if c.rt > 0 {
		c.Conn.SetReadDeadline(time.Now().Add(c.rt))
	} else {
		c.Conn.SetReadDeadline(time.Time{})
	}
	return c.Conn.Read(p)
}

func (c *deadlineConn) Write(p []byte) (int, error) {
	if c.wt > 0 {
		c.Conn.SetWriteDeadline(time.Now().Add(c.wt))
	}
	return c.Conn.Write(p)
}

// readFrame reads one frame of the given maximum payload sizes.
// A D frame's payload is left unread: its length is returned for the
// caller to stream it.
func readFrame(r io.Reader, max func(typ byte) int) (typ byte, n uint32, payload []byte, err error) {
	var h [frameHeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, 0, nil, err
	}
	typ = h[0]
	n = binary.BigEndian.Uint32(h[1:])
	m := max(typ)
	if m < 0 {
		return 0, 0, nil, fmt.Errorf("%w: unexpected frame type 0x%02x", errProtocol, typ)
	}
	if int64(n) > int64(m) || (typ == frameData && n == 0) {
		return 0, 0, nil, fmt.Errorf("%w: %c frame of %d bytes (at most %d)", errProtocol, typ, n, m)
	}
	if typ == frameData {
		return typ, n, nil, nil
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, 0, nil, io.ErrUnexpectedEOF
	}
	return typ, n, payload, nil
}

func writeFrame(w io.Writer, typ byte, payload ...[]byte) error {
	var b []byte
	b = append(b, typ, 0, 0, 0, 0)
	for _, p := range payload {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint32(b[1:], uint32(len(b)-frameHeaderSize))
	_, err := w.Write(b)
	return err
}

func printable(b []byte) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return '?'
		}
		return r
	}, string(b))
}
