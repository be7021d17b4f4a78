package stream

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
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

// sink states
const (
	sinkOpen      = iota
	sinkEnded     // E sent (no handshake), or the sink aborted
	sinkAwaiting  // E with handshake sent
	sinkReady     // R built received
	sinkCommitted // C sent and K received
)

type netSink struct {
	spec  string
	conn  *deadlineConn
	buf   []byte // a D frame being filled: header + payload
	state int

	linked bool
	keyed  bool
	hsKey  []byte
	done   bool   // body writer closed every layer
	nonce  []byte // receiver nonce from R
	peer   []byte // receiver nonce from its greeting
	err    error  // sticky write error
}

func dialSink(spec, scheme, addr string, opt SinkOptions) (*netSink, error) {
	d := net.Dialer{Timeout: opt.DialTimeout}
	c, err := d.Dial(scheme, addr)
	if err != nil {
		return nil, fmt.Errorf("stream: dial %s: %w", spec, err)
	}
	s := &netSink{spec: spec, conn: &deadlineConn{Conn: c, wt: opt.WriteTimeout}}
	s.buf = make([]byte, frameHeaderSize, frameHeaderSize+sinkFrameSize)
	if _, err := s.conn.Write([]byte(wireHello)); err != nil {
		c.Close()
		return nil, fmt.Errorf("stream: write %s: %w", spec, err)
	}
	// The receiver's greeting carries its nonce; it goes on the header line
	// (peer=) so that a recorded stream cannot be replayed to another
	// connection.
	greet := max(opt.DialTimeout, opt.WriteTimeout)
	if greet == 0 {
		greet = defaultGreetTimeout
	}
	s.conn.rt = greet
	var hello [len(wireHello) + hsNonceSize]byte
	if _, err := io.ReadFull(s.conn, hello[:]); err != nil || string(hello[:len(wireHello)]) != wireHello {
		c.Close()
		var ne net.Error
		switch {
		case err == nil:
			err = errors.New("not a pcluster receiver (bad greeting)")
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			err = errors.New("connection closed by the receiver before its greeting")
		case errors.As(err, &ne) && ne.Timeout():
			err = fmt.Errorf("no greeting from the receiver within %v: is pthaw listening there? (plain listeners such as nc cannot take a snapshot; write a file instead)", greet)
		}
		return nil, fmt.Errorf("stream: %s: %w", spec, err)
	}
	s.peer = append([]byte{}, hello[len(wireHello):]...)
	return s, nil
}

func (s *netSink) peerNonce() []byte { return s.peer }

func (s *netSink) String() string { return s.spec }

func (s *netSink) link(k []byte, encrypted bool) error {
	if s.linked {
		return fmt.Errorf("stream: %s: already carries a stream", s.spec)
	}
	s.linked, s.keyed, s.hsKey = true, encrypted, k
	return nil
}

func (s *netSink) bodyDone() { s.done = true }

func (s *netSink) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.state != sinkOpen {
		return 0, fmt.Errorf("stream: write %s: the body has ended", s.spec)
	}
	total := len(p)
	for len(p) > 0 {
		if len(s.buf) == cap(s.buf) {
			if err := s.flush(); err != nil {
				return total - len(p), err
			}
		}
		if len(s.buf) == frameHeaderSize && len(p) >= directFrame {
			// Large writes (sealed chunks) go out as their own frame
			// without a copy: one writev of header and payload.
			n := min(len(p), maxDataFrame)
			if err := s.writeDirect(p[:n]); err != nil {
				return total - len(p), err
			}
			p = p[n:]
			continue
		}
		n := copy(s.buf[len(s.buf):cap(s.buf)], p)
		s.buf = s.buf[:len(s.buf)+n]
		p = p[n:]
	}
	return total, nil
}

func (s *netSink) flush() error {
	if s.err != nil {
		return s.err
	}
	if len(s.buf) == frameHeaderSize {
		return nil
	}
	s.buf[0] = frameData
	binary.BigEndian.PutUint32(s.buf[1:], uint32(len(s.buf)-frameHeaderSize))
	if _, err := s.conn.Write(s.buf); err != nil {
		s.err = fmt.Errorf("stream: write %s: %w", s.spec, err)
		return s.err
	}
	s.buf = s.buf[:frameHeaderSize]
	return nil
}

// defaultGreetTimeout bounds the wait for the receiver's greeting when the
// caller set no timeout: a listener that is not pthaw never greets.
const defaultGreetTimeout = 30 * time.Second

// directFrame is the write size from which the sink frames the caller's
// buffer directly instead of copying it.
const directFrame = 32 << 10

func (s *netSink) writeDirect(p []byte) error {
	var h [frameHeaderSize]byte
	h[0] = frameData
	binary.BigEndian.PutUint32(h[1:], uint32(len(p)))
	if s.conn.wt > 0 {
		s.conn.SetWriteDeadline(time.Now().Add(s.conn.wt))
	}
	bufs := net.Buffers{h[:], p}
	if _, err := bufs.WriteTo(s.conn.Conn); err != nil {
		s.err = fmt.Errorf("stream: write %s: %w", s.spec, err)
		return s.err
	}
	return nil
}

// end flushes the body and sends E. It refuses when the body writer did not
// finish: the receiver must then see a broken stream, never an end.
func (s *netSink) end(handshake bool) error {
	if s.linked && !s.done {
		return fmt.Errorf("stream: %s: the snapshot body was not completed", s.spec)
	}
	if err := s.flush(); err != nil {
		return err
	}
	flag := []byte{0}
	if handshake {
		flag[0] = 1
	}
	var mac []byte
	if s.keyed {
		mac = wireMAC(s.hsKey, "end", flag)
	}
	if err := writeFrame(s.conn, frameEnd, flag, mac); err != nil {
		s.err = fmt.Errorf("stream: write %s: %w", s.spec, err)
		return s.err
	}
	return nil
}

// AwaitReady ends the body announcing a handshake and waits up to timeout
// (0: no limit) for the receiver's verdict.
func (s *netSink) AwaitReady(timeout time.Duration) error {
	if s.state != sinkOpen {
		return fmt.Errorf("stream: %s: AwaitReady called twice or after Close", s.spec)
	}
	s.state = sinkEnded // whatever happens next, never send another E
	if !s.linked {
		return fmt.Errorf("stream: %s: handshake needs the sink passed to NewWriter", s.spec)
	}
	if err := s.end(true); err != nil {
		return err
	}
	s.state = sinkAwaiting
	s.conn.rt = timeout
	_, _, p, err := readFrame(s.conn, func(t byte) int {
		if t == frameReady {
			return 1 + hsNonceSize + maxReason + macSize
		}
		return -1
	})
	if err != nil {
		return s.netErr("wait for the receiver", err)
	}
	if s.keyed {
		if len(p) < 1+hsNonceSize+macSize {
			return fmt.Errorf("stream: %s: short ready message", s.spec)
		}
		body, mac := p[:len(p)-macSize], p[len(p)-macSize:]
		if !hmac.Equal(mac, wireMAC(s.hsKey, "ready", body)) {
			return fmt.Errorf("stream: %s: ready message failed authentication: not sent by the holder of the key", s.spec)
		}
		p = body
	}
	if len(p) < 1+hsNonceSize {
		return fmt.Errorf("stream: %s: short ready message", s.spec)
	}
	status, nonce, reason := p[0], p[1:1+hsNonceSize], p[1+hsNonceSize:]
	switch status {
	case statusBuilt:
		s.nonce = append([]byte{}, nonce...)
		s.state = sinkReady
		return nil
	case statusFailed:
		return fmt.Errorf("stream: %s: receiver failed: %s", s.spec, printable(reason))
	}
	return fmt.Errorf("stream: %s: protocol error: ready status %d", s.spec, status)
}

// Commit tells the receiver to start the clone and waits (up to the write
// timeout) for its acknowledgement. An error after the commit was sent
// means the outcome is unknown: the receiver may or may not start.
func (s *netSink) Commit() error {
	if s.state != sinkReady {
		return fmt.Errorf("stream: %s: commit without a ready receiver", s.spec)
	}
	var mac []byte
	if s.keyed {
		mac = wireMAC(s.hsKey, "commit", s.nonce)
	}
	if err := writeFrame(s.conn, frameCommit, mac); err != nil {
		return s.netErr("send commit (outcome unknown)", err)
	}
	s.conn.rt = s.conn.wt
	_, _, p, err := readFrame(s.conn, func(t byte) int {
		if t == frameAck {
			return macSize
		}
		return -1
	})
	if err != nil {
		return s.netErr("commit sent, acknowledgement lost (outcome unknown)", err)
	}
	if s.keyed && !hmac.Equal(p, wireMAC(s.hsKey, "ack", s.nonce)) {
		return fmt.Errorf("stream: %s: commit acknowledgement failed authentication", s.spec)
	}
	s.state = sinkCommitted
	return s.conn.Close()
}

func (s *netSink) netErr(op string, err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("stream: %s: %s: connection closed by the receiver", s.spec, op)
	}
	return fmt.Errorf("stream: %s: %s: %w", s.spec, op, err)
}

// Close ends the stream without a handshake (when the body is complete and
// no handshake was started) and closes the connection. After a failed or
// unfinished handshake it only closes: the receiver then kills its clone.
func (s *netSink) Close() error {
	var err error
	if s.state == sinkOpen {
		s.state = sinkEnded
		err = s.end(false)
	}
	if cerr := s.conn.Close(); cerr != nil && err == nil && s.state != sinkCommitted && !errors.Is(cerr, net.ErrClosed) {
		err = fmt.Errorf("stream: close %s: %w", s.spec, cerr)
	}
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

// netSource listens for one sender.
type netSource struct {
	spec  string
	rt    time.Duration
	ln    net.Listener
	unix  string // socket path to remove
	needK bool   // plaintext refused (non-loopback listener with -insecure unset)

	mu   sync.Mutex // guards conn and closed against Close from another goroutine
	conn *deadlineConn
	done bool

	br        *bufio.Reader
	remaining uint32 // bytes left in the current D frame
	err       error  // sticky read error

	linked, keyed bool
	hsKey         []byte
	ended         bool // E received
	gotEOF        bool // the body reader reached a clean io.EOF
	handshake     bool // E asked for a handshake
	readySent     bool
	nonce         []byte // sent in R
	peer          []byte // sent in the greeting, expected on the header line
}

func listenSource(spec, scheme, addr string, opt SourceOptions) (*netSource, error) {
	s := &netSource{spec: spec, rt: opt.ReadTimeout}
	if scheme == "unix" {
		if err := removeStaleSocket(addr); err != nil {
			return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
		}
		ln, err := net.Listen("unix", addr)
		if err != nil {
			return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
		}
		s.ln, s.unix = ln, addr
		return s, nil
	}
	if !strings.Contains(addr, ":") {
		addr = ":" + addr
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
	}
	if !isLoopback(host) {
		switch {
		case opt.HaveKeys && !opt.Insecure:
			s.needK = true
		case opt.Insecure:
			w := opt.Warn
			if w == nil {
				w = os.Stderr
			}
			fmt.Fprintf(w, "warning: listening on %s without requiring encryption: anyone who can reach it can read the snapshot or send a process to run here\n", spec)
		default:
			return nil, fmt.Errorf("stream: listen %s: refusing to listen beyond loopback without keys: anyone could send a process to run here; give a key directory (-keydir), listen on 127.0.0.1, or pass -insecure", spec)
		}
	}
	ln, err := net.Listen(scheme, addr)
	if err != nil {
		return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
	}
	s.ln = ln
	return s, nil
}

// isLoopback reports whether every address host names is a loopback one.
// "" (all addresses) is not.
func isLoopback(host string) bool {
	if host == "" {
		return false
	}
	if ip := net.ParseIP(host); ip != nil {
		return ip.IsLoopback()
	}
	ips, err := net.LookupIP(host)
	if err != nil || len(ips) == 0 {
		return false
	}
	for _, ip := range ips {
		if !ip.IsLoopback() {
			return false
		}
	}
	return true
}

// removeStaleSocket removes a socket file nobody listens on any more; any
// other existing file is an error.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another process is listening", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return err
	}
	return os.Remove(path)
}

func (s *netSource) String() string { return s.spec }
func (s *netSource) Addr() string   { return s.ln.Addr().String() }

// accept takes the one sender and stops listening.
func (s *netSource) accept() error {
	if s.br != nil {
		return nil
	}
	c, err := s.ln.Accept()
	s.ln.Close()
	if err != nil {
		return fmt.Errorf("stream: accept %s: %w", s.spec, err)
	}
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		c.Close()
		return fmt.Errorf("stream: accept %s: %w", s.spec, net.ErrClosed)
	}
	s.conn = &deadlineConn{Conn: c, rt: s.rt}
	s.mu.Unlock()
	s.br = bufio.NewReaderSize(s.conn, 256<<10)
	s.peer = make([]byte, hsNonceSize)
	if _, err := rand.Read(s.peer); err != nil {
		return fmt.Errorf("stream: %s: nonce: %w", s.spec, err)
	}
	s.conn.wt = s.rt
	if _, err := s.conn.Write(append([]byte(wireHello), s.peer...)); err != nil {
		return fmt.Errorf("stream: %s: greet %s: %w", s.spec, c.RemoteAddr(), err)
	}
	var hello [len(wireHello)]byte
	if _, err := io.ReadFull(s.br, hello[:]); err != nil || string(hello[:]) != wireHello {
		if err == nil {
			err = errors.New("not a pcluster sender (bad greeting)")
		}
		return fmt.Errorf("stream: %s: from %s: %w", s.spec, c.RemoteAddr(), err)
	}
	return nil
}

func (s *netSource) peerNonce() []byte { return s.peer }

func (s *netSource) link(k []byte, encrypted bool) error {
	if s.linked {
		return errors.New("source already carries a stream")
	}
	if s.needK && !encrypted {
		return errors.New("snapshot is not encrypted and this listener is not on loopback: refusing plaintext")
	}
	s.linked, s.keyed, s.hsKey = true, encrypted, k
	return nil
}

func (s *netSource) bodyEOF() { s.gotEOF = s.ended }

func (s *netSource) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if err := s.accept(); err != nil {
		s.err = err
		return 0, err
	}
	for s.remaining == 0 {
		if s.ended {
			return 0, io.EOF
		}
		if err := s.nextFrame(); err != nil {
			s.err = err
			return 0, err
		}
	}
	if uint32(len(p)) > s.remaining {
		p = p[:s.remaining]
	}
	n, err := s.br.Read(p)
	s.remaining -= uint32(n)
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		s.err = s.readErr(err)
		return n, s.err
	}
	return n, nil
}

func (s *netSource) readErr(err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("stream: %s: connection closed before the end of the stream: %w", s.spec, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("stream: read %s: %w", s.spec, err)
}

func (s *netSource) nextFrame() error {
	typ, n, p, err := readFrame(s.br, func(t byte) int {
		switch t {
		case frameData:
			return maxDataFrame
		case frameEnd:
			return 1 + macSize
		}
		return -1
	})
	if err != nil {
		if errors.Is(err, errProtocol) {
			return fmt.Errorf("stream: %s: %w", s.spec, err)
		}
		return s.readErr(err)
	}
	if typ == frameData {
		s.remaining = n
		return nil
	}
	// End of body.
	if !s.linked {
		return fmt.Errorf("stream: %s: end of stream before a snapshot header was read (pass the Source to NewReader)", s.spec)
	}
	if s.keyed {
		if len(p) != 1+macSize || !hmac.Equal(p[1:], wireMAC(s.hsKey, "end", p[:1])) {
			return fmt.Errorf("stream: %s: end-of-stream message failed authentication", s.spec)
		}
	} else if len(p) != 1 {
		return fmt.Errorf("stream: %s: protocol error: end frame of %d bytes", s.spec, len(p))
	}
	if p[0] > 1 {
		return fmt.Errorf("stream: %s: protocol error: end flag %d", s.spec, p[0])
	}
	s.ended, s.handshake = true, p[0] == 1
	return nil
}

// Ready reports the receiver's verdict to a sender waiting in AwaitReady:
// nil means the whole stream was received and verified and the process is
// built; an error is sent as the reason of a failure (and the connection is
// closed). Without a handshake it does nothing.
func (s *netSource) Ready(buildErr error) error {
	if s.conn == nil {
		if buildErr != nil {
			return nil
		}
		return fmt.Errorf("stream: %s: ready before a sender connected", s.spec)
	}
	if buildErr == nil && (!s.ended || !s.gotEOF || s.err != nil) {
		return fmt.Errorf("stream: %s: ready before the whole stream was received and verified (read the body to io.EOF first)", s.spec)
	}
	if s.ended && !s.handshake {
		return nil
	}
	if s.readySent {
		return fmt.Errorf("stream: %s: Ready called twice", s.spec)
	}
	s.readySent = true
	status := []byte{statusBuilt}
	var reason []byte
	if buildErr != nil {
		status[0] = statusFailed
		reason = []byte(buildErr.Error())
		if len(reason) > maxReason {
			reason = reason[:maxReason]
		}
	}
	s.nonce = make([]byte, hsNonceSize)
	if _, err := rand.Read(s.nonce); err != nil {
		return fmt.Errorf("stream: %s: nonce: %w", s.spec, err)
	}
	body := append(append(status, s.nonce...), reason...)
	var mac []byte
	if s.keyed {
		mac = wireMAC(s.hsKey, "ready", body)
	}
	s.conn.wt = s.rt
	err := writeFrame(s.conn, frameReady, body, mac)
	if buildErr != nil {
		s.closeConn()
	}
	if err != nil {
		return fmt.Errorf("stream: %s: send ready: %w", s.spec, err)
	}
	return nil
}

// AwaitCommit waits up to timeout (0: no limit) for the sender's commit and
// acknowledges it. nil means start the clone: the original is gone. Any
// error means the sender did not commit: kill the half-built process.
func (s *netSource) AwaitCommit(timeout time.Duration) error {
	if s.conn == nil || !s.ended {
		return fmt.Errorf("stream: %s: no complete stream to commit", s.spec)
	}
	if !s.handshake {
		return nil
	}
	if !s.readySent || s.nonce == nil {
		return fmt.Errorf("stream: %s: AwaitCommit before Ready", s.spec)
	}
	defer s.closeConn()
	s.conn.rt = timeout
	_, _, p, err := readFrame(s.br, func(t byte) int {
		if t == frameCommit {
			return macSize
		}
		return -1
	})
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("stream: %s: sender closed the connection without committing", s.spec)
		}
		return fmt.Errorf("stream: %s: wait for commit: %w", s.spec, err)
	}
	var mac []byte
	if s.keyed {
		if !hmac.Equal(p, wireMAC(s.hsKey, "commit", s.nonce)) {
			return fmt.Errorf("stream: %s: commit message failed authentication", s.spec)
		}
		mac = wireMAC(s.hsKey, "ack", s.nonce)
	} else if len(p) != 0 {
		return fmt.Errorf("stream: %s: protocol error: commit frame of %d bytes", s.spec, len(p))
	}
	s.nonce = nil // a commit is taken once
	if err := writeFrame(s.conn, frameAck, mac); err != nil {
		// The sender has committed; start anyway.
		return nil
	}
	return nil
}

func (s *netSource) closeConn() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.conn.Close()
	}
}

// Close stops listening (unblocking a pending accept) and closes the
// connection. It may be called from another goroutine.
func (s *netSource) Close() error {
	s.mu.Lock()
	s.done = true
	s.mu.Unlock()
	s.ln.Close()
	s.closeConn()
	return nil
}
