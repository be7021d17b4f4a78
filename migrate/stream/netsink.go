package stream

import (
	"context"
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// netSink is the sending end of the wire protocol (see wire.go and
// docs/stream.md). It is used by one goroutine, the sender.

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
	opt   SinkOptions
	conn  *deadlineConn
	buf   []byte // a D frame being filled: header + payload
	state int

	linked bool
	keyed  bool
	hsKey  []byte
	done   bool   // body writer closed every layer
	nonce  []byte // receiver nonce from R
	peer   []byte // receiver nonce from its greeting
	// The receiver's user over loopback or a unix socket, read after its
	// greeting (or why it could not be).
	peerUID int
	peerErr error
	err     error // sticky write error
}

func dialSink(spec, scheme, addr string, opt SinkOptions) (*netSink, error) {
	d := net.Dialer{Timeout: opt.DialTimeout}
	c, err := d.Dial(scheme, addr)
	if err != nil {
		return nil, dialErr(spec, opt.DialTimeout, err)
	}
	return newConnSink(context.Background(), spec, c, opt)
}

// NewConnSink is the sending end of the wire protocol (docs/stream.md) on
// conn, a stream connection the caller opened — between two cluster
// agents, a mutual-TLS connection. It exchanges the greetings, which ctx
// (and SinkOptions.DialTimeout, WriteTimeout, else 30 s) bounds; later
// waits are bounded by WriteTimeout and the timeouts given to AwaitReady,
// and Abort (from any goroutine) ends them. The sink owns conn: Close,
// Abort and a finished Commit close it, and so does a failed NewConnSink.
//
// Without SinkOptions.Authenticated, plaintext goes only where OpenSink
// would send it (a loopback or unix peer running as our user, root or
// OwnerUID; beyond loopback with Insecure).
func NewConnSink(ctx context.Context, conn net.Conn, opt SinkOptions) (Sink, error) {
	return newConnSink(ctx, connSpec(conn), conn, opt)
}

// connSpec names a connection the caller opened: its network and peer.
func connSpec(c net.Conn) string {
	a := c.RemoteAddr()
	if a == nil {
		return "conn"
	}
	return a.Network() + ":" + a.String()
}

func newConnSink(ctx context.Context, spec string, c net.Conn, opt SinkOptions) (*netSink, error) {
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	s, err := greetReceiver(spec, c, opt)
	if !stop() || ctx.Err() != nil {
		if err == nil {
			err = fmt.Errorf("stream: %s: waiting for the receiver's greeting: %w", spec, context.Cause(ctx))
		} else {
			err = fmt.Errorf("%w (%w)", err, context.Cause(ctx))
		}
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return s, nil
}

// greetReceiver sends our greeting on c and reads the receiver's.
func greetReceiver(spec string, c net.Conn, opt SinkOptions) (*netSink, error) {
	s := &netSink{spec: spec, opt: opt, conn: &deadlineConn{Conn: c, wt: opt.WriteTimeout}}
	s.buf = make([]byte, frameHeaderSize, frameHeaderSize+sinkFrameSize)
	if _, err := s.conn.Write([]byte(wireHello)); err != nil {
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
		// Say what was seen: the connection was made, so something
		// listens there; a pthaw greets as soon as it accepts.
		var ne net.Error
		switch {
		case err == nil:
			err = fmt.Errorf("connected to %s, but it answered something other than a pcluster greeting: not a pthaw", c.RemoteAddr())
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			err = fmt.Errorf("connected to %s, but it closed the connection without greeting: a pthaw that already took another sender, or one that dropped this connection to make room among a flood of others (try again)", c.RemoteAddr())
		case errors.As(err, &ne) && ne.Timeout():
			err = fmt.Errorf("connected to %s, but no greeting came back within %v: something listens there that is not a pthaw ready to receive (a pthaw greets at once; plain listeners such as nc never do)", c.RemoteAddr(), greet)
		default:
			err = fmt.Errorf("connected to %s, then waiting for its greeting: %w", c.RemoteAddr(), err)
		}
		return nil, fmt.Errorf("stream: %s: %w", spec, err)
	}
	s.peer = append([]byte{}, hello[len(wireHello):]...)
	if opt.Authenticated {
		return s, nil
	}
	// Who the receiver is, while its socket is surely open: it just
	// greeted us and now waits for our header.
	switch a := c.RemoteAddr().(type) {
	case *net.UnixAddr:
		s.peerUID, s.peerErr = unixPeerUID(c)
	case *net.TCPAddr:
		if a.IP.IsLoopback() {
			s.peerUID, s.peerErr = tcpPeerUID(c)
		}
	}
	return s, nil
}

func (s *netSink) peerNonce() []byte { return s.peer }

// dialErr says what the sender saw when the connection could not be made:
// nothing listening, no answer at all, or another failure.
func dialErr(spec string, timeout time.Duration, err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("stream: dial %s: nothing listens there: %w", spec, err)
	case errors.As(err, &ne) && ne.Timeout():
		return fmt.Errorf("stream: dial %s: no answer to the connection request within %v: %w", spec, timeout, err)
	}
	return fmt.Errorf("stream: dial %s: %w", spec, err)
}

func (s *netSink) String() string { return s.spec }

// BuildsFirst says that a -halt sender's AwaitReady returns only once the
// receiver has built the process: the original is still held (frozen, on
// its host) while the receiver builds the copy, which a file sink does
// not promise.
func (s *netSink) BuildsFirst() bool { return true }

func (s *netSink) link(k []byte, encrypted bool) error {
	if s.linked {
		return fmt.Errorf("stream: %s: already carries a stream", s.spec)
	}
	if !encrypted {
		if err := s.checkPlaintextPeer(); err != nil {
			return fmt.Errorf("stream: %s: %w", s.spec, err)
		}
	}
	s.linked, s.keyed, s.hsKey = true, encrypted, k
	return nil
}

// checkPlaintextPeer decides whether an unencrypted stream may go to this
// receiver. Nothing but encryption authenticates a receiver's "built"
// message: an impostor listening first on the address could read the
// process's memory and, with -halt, have the original killed. So without
// encryption a snapshot goes only to a receiver the kernel vouches for —
// over loopback or a unix socket, one running as our own user, root or the
// owner of the process (SinkOptions.OwnerUID) — or beyond loopback when
// the user said -insecure. The receiver's user was read after its
// greeting, which it sends once it has accepted the connection: its socket
// then belongs to it in /proc/net/tcp.
func (s *netSink) checkPlaintextPeer() error {
	if s.opt.Authenticated {
		return nil // the caller vouches for the connection (mutual TLS)
	}
	uid, err := s.peerUID, s.peerErr
	switch a := s.conn.RemoteAddr().(type) {
	case *net.UnixAddr:
	case *net.TCPAddr:
		if !a.IP.IsLoopback() {
			if !s.opt.Insecure {
				return &refusal{fmt.Sprintf("refusing to send an unencrypted snapshot beyond loopback (to %s): anyone on the path could read the process's memory, and a receiver cannot prove it is yours", a), ErrPlaintextBeyondLoopback}
			}
			w := s.opt.Warn
			if w == nil {
				w = os.Stderr
			}
			fmt.Fprintf(w, "warning: sending an unencrypted snapshot to %s: anyone on the path can read the process's memory\n", a)
			return nil
		}
	default:
		return fmt.Errorf("receiver %s: unknown address type", s.conn.RemoteAddr())
	}
	if err != nil {
		return fmt.Errorf("receiver %s: %w", s.conn.RemoteAddr(), err)
	}
	if uid != os.Geteuid() && uid != 0 && uid != s.opt.OwnerUID {
		return &refusal{fmt.Sprintf("receiver %s runs as uid %d, neither ours (%d), root nor the process's owner: an unencrypted snapshot goes only to them", s.conn.RemoteAddr(), uid, os.Geteuid()), ErrPlaintextToStranger}
	}
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
		return s.netErr(fmt.Sprintf("sent the whole snapshot to %s, then waited for the receiver's verdict", s.conn.RemoteAddr()), err)
	}
	if s.keyed {
		authentic := len(p) >= 1+hsNonceSize+macSize &&
			hmac.Equal(p[len(p)-macSize:], wireMAC(s.hsKey, "ready", p[:len(p)-macSize]))
		if !authentic && len(p) >= 1+hsNonceSize && p[0] == statusFailed {
			// A receiver that does not hold our key cannot sign its
			// refusal. Believing an unsigned failure is safe: it only
			// makes us resume the original.
			return fmt.Errorf("stream: %s: receiver failed (an unsigned reply: it does not hold this stream's key): %s", s.spec, printable(p[1+hsNonceSize:]))
		}
		if !authentic {
			return fmt.Errorf("stream: %s: ready message failed authentication: not sent by the holder of the key", s.spec)
		}
		p = p[:len(p)-macSize]
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
// timeout, 30 s when there is none) for its acknowledgement. An error after the commit was sent
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
	if s.conn.rt == 0 {
		s.conn.rt = defaultGreetTimeout
	}
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
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && s.conn.rt > 0 {
		return fmt.Errorf("stream: %s: %s: no answer within %v: %w", s.spec, op, s.conn.rt, err)
	}
	return fmt.Errorf("stream: %s: %s: %w", s.spec, op, err)
}

// Abort closes the connection under the sender's feet: whatever it is
// writing or waiting for fails at once, and the receiver, which sees no
// end record (or no commit), builds or starts nothing. Closing a net.Conn
// is safe from any goroutine.
func (s *netSink) Abort() { s.conn.Conn.Close() }

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
