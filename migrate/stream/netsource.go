package stream

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pcluster/pcluster/internal/admit"
)

// netSource is the receiving end of the wire protocol: it listens, greets
// connections concurrently (acceptFirst), takes the first allowed sender
// and stops listening. One goroutine reads and runs the handshake; Close
// may come from any goroutine.
type netSource struct {
	spec  string
	rt    time.Duration
	ln    net.Listener
	needK bool // plaintext refused (non-loopback listener with -insecure unset)
	// haveKeys: the reader requires encryption (pthaw -keydir); a sender
	// that did not key its stream gets no details of why it was refused.
	haveKeys bool
	keyDir   string    // "": the first greeting wins; else the first authenticated stream (vet)
	warn     io.Writer // dropped connections are reported here
	warnMu   sync.Mutex
	// sameUser: a loopback or unix listener that may receive plaintext
	// accepts only a sender running as our own user or root (the socket
	// file's mode alone is set after listen, and follows no umask).
	sameUser bool

	mu   sync.Mutex // guards conn and done against Close from another goroutine
	conn *deadlineConn
	done bool // Close was called

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
	s := &netSource{spec: spec, rt: opt.ReadTimeout, haveKeys: opt.HaveKeys, warn: opt.Warn}
	if opt.HaveKeys {
		s.keyDir = opt.KeyDir
	}
	if s.warn == nil {
		s.warn = os.Stderr
	}
	if scheme == "unix" {
		if err := removeStaleSocket(addr); err != nil {
			return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
		}
		ln, err := net.Listen("unix", addr)
		if err != nil {
			return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
		}
		// Whoever can connect can send a process to be built here: only
		// our own user, whatever the umask.
		if err := os.Chmod(addr, 0o600); err != nil {
			ln.Close()
			return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
		}
		s.ln = ln
		s.sameUser = !opt.HaveKeys
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
			return nil, &refusal{fmt.Sprintf("stream: listen %s: refusing to listen beyond loopback without keys: anyone could send a process to run here", spec), ErrListenBeyondLoopback}
		}
	}
	ln, err := net.Listen(scheme, addr)
	if err != nil {
		return nil, fmt.Errorf("stream: listen %s: %w", spec, err)
	}
	s.ln = ln
	s.sameUser = isLoopback(host) && !opt.HaveKeys && !opt.Insecure
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

// Addr returns the address listened on, or for a connection the caller
// gave (NewConnSource) its local address.
func (s *netSource) Addr() string {
	if s.ln == nil {
		return s.conn.LocalAddr().String()
	}
	return s.ln.Addr().String()
}

// helloTimeout bounds how long an accepted connection may take to greet
// before the listener drops it.
const helloTimeout = 10 * time.Second

// maxGreeting bounds the connections a listener holds before they
// authenticate (greet, and on a keyed listener send a first chunk that
// verifies): a flood of connections costs at most this many goroutines and
// descriptors. Beyond it a new connection is still taken and one pending
// connection is dropped instead: the oldest of the source (address and,
// on loopback or a unix socket, user) holding the most (see package
// admit), so that strangers holding the table full cannot turn the real
// sender away.
const maxGreeting = 64

// maxRefusing bounds the refused senders being read to their end to be
// told they were refused (refuse); beyond it the oldest of the largest
// source is closed untold.
const maxRefusing = 16

// greeted is an accepted connection that passed greet.
type greeted struct {
	c      net.Conn
	dc     *deadlineConn
	peer   []byte // our nonce, sent in the greeting
	replay []byte // what vet read after the greeting, to be read again
}

func (g *greeted) peerNonce() []byte { return g.peer }

// accept takes the one sender and stops listening.
func (s *netSource) accept() error {
	if s.br != nil {
		return nil
	}
	g, err := s.acceptFirst()
	if err != nil {
		return err
	}
	return s.adopt(g)
}

// adopt makes g, a greeted connection, the one s reads from.
func (s *netSource) adopt(g *greeted) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		g.c.Close()
		return fmt.Errorf("stream: accept %s: %w", s.spec, net.ErrClosed)
	}
	s.conn = g.dc
	s.mu.Unlock()
	s.peer = g.peer
	var r io.Reader = g.dc
	if len(g.replay) > 0 {
		r = io.MultiReader(bytes.NewReader(g.replay), g.dc)
	}
	s.br = bufio.NewReaderSize(r, 256<<10)
	return nil
}

// NewConnSource is the receiving end of the wire protocol (docs/stream.md)
// on conn, a stream connection the caller accepted — between two cluster
// agents, a mutual-TLS connection. It exchanges the greetings, which ctx
// (and SourceOptions.ReadTimeout, else 10 s) bounds; later reads are
// bounded by ReadTimeout and the timeout given to AwaitCommit, and Close
// (from any goroutine) ends them. The source owns conn: Close closes it,
// and so does a failed NewConnSource.
//
// Without SourceOptions.Authenticated the rules of a listener hold: from
// a loopback or unix peer without HaveKeys, only our own user or root;
// from another address, plaintext only with Insecure (with HaveKeys, the
// caller's NewReader must require encryption).
func NewConnSource(ctx context.Context, conn net.Conn, opt SourceOptions) (Source, error) {
	s := &netSource{spec: connSpec(conn), rt: opt.ReadTimeout, haveKeys: opt.HaveKeys, warn: opt.Warn}
	if s.warn == nil {
		s.warn = os.Stderr
	}
	if !opt.Authenticated {
		local := false
		switch a := conn.RemoteAddr().(type) {
		case *net.UnixAddr:
			local = true
		case *net.TCPAddr:
			local = a.IP.IsLoopback()
		}
		s.sameUser = local && !opt.HaveKeys && !opt.Insecure
		s.needK = !local && !opt.Insecure
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	g, err := s.greet(conn, nil)
	if !stop() || ctx.Err() != nil {
		if err == nil {
			err = context.Cause(ctx)
		} else {
			err = fmt.Errorf("%w (%w)", err, context.Cause(ctx))
		}
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("stream: %s: %w", s.spec, err)
	}
	conn.SetDeadline(time.Time{})
	if err := s.adopt(g); err != nil {
		return nil, err
	}
	return s, nil
}

// acceptFirst accepts connections and greets each in a goroutine of its
// own; the first connection that completes the greeting and is allowed
// here (greet: for a keyless loopback or unix listener, a sender running
// as our user or root; vet: for a keyed listener, a first chunk that
// verifies under one of our keys) is the sender. Then the listener is
// closed, and with it every connection still pending. A connection that
// does not greet in time, greets wrongly or is not allowed is dropped with
// a warning line, and so is one evicted from the table of pending
// connections (at most maxGreeting) to make room for a newer one. So
// whoever can reach the port can neither delay the sender nor make the
// migration fail by connecting and saying nothing, however many times:
// only by being an allowed sender first, or by connecting, from as many
// sources as the table has places, in the milliseconds between the
// sender's connection and its first chunk. acceptFirst returns once its
// accept loop and every greeting goroutine have ended.
func (s *netSource) acceptFirst() (*greeted, error) {
	var (
		mu     sync.Mutex // guards winner
		winner *greeted
		wg     sync.WaitGroup
	)
	greeting := admit.New(maxGreeting) // accepted, not yet authenticated
	refusing := admit.New(maxRefusing) // refused, being told so
	won := make(chan *greeted, 1)
	acceptErr := make(chan error, 1)
	greetOne := func(c net.Conn, k *admit.Ticket) {
		defer wg.Done()
		g, err := s.greet(c, k)
		var refuse func()
		if err == nil && s.keyDir != "" {
			refuse, err = s.vet(g)
		}
		// The place is given back before anything slow (the refusal).
		if !k.Release() {
			// The table closed c: the sender was taken, or a newer
			// connection took its place.
			if k.Evicted() {
				s.warnf("dropped a connection from %s: %d connections are already pending, and a newer one took the place of the oldest of its source; still listening", c.RemoteAddr(), maxGreeting)
			}
			return
		}
		mu.Lock()
		first := err == nil && winner == nil
		if first {
			winner = g
		}
		lost := winner != nil && !first
		mu.Unlock()
		if first {
			won <- g
			return
		}
		if lost {
			c.Close()
			return
		}
		if err != nil {
			s.warnf("dropped a connection from %s: %v; still listening", c.RemoteAddr(), err)
		}
		if refuse != nil {
			if r := refusing.Admit(c, k.Source()); r != nil {
				refuse()
				r.Release()
			}
		}
		c.Close()
	}
	wg.Add(1)
	go func() { // the accept loop: ends when the listener is closed
		defer wg.Done()
		for {
			c, err := s.ln.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			k := greeting.Admit(c, admit.Source(c.RemoteAddr()))
			if k == nil {
				continue // the sender was taken: c is closed
			}
			wg.Add(1)
			go greetOne(c, k)
		}
	}()
	var g *greeted
	var err error
	select {
	case g = <-won:
	case err = <-acceptErr:
	}
	s.ln.Close()
	others := greeting.Close()
	refusing.Close()
	wg.Wait()
	if err != nil {
		select {
		case g := <-won: // greeted as the listener was closed
			g.c.Close()
		default:
		}
		return nil, fmt.Errorf("stream: accept %s: %w", s.spec, err)
	}
	if others > 0 {
		did := "greeted"
		if s.keyDir != "" {
			did = "authenticated"
		}
		s.warnf("took the sender from %s; closed %d other connection(s) that had not %s", g.c.RemoteAddr(), others, did)
	}
	return g, nil
}

// vetTimeout bounds how long a keyed listener waits, after the greeting,
// for a connection's header and first chunk (pfreeze connects before it
// stops the process) when the read timeout is shorter or unset.
const vetTimeout = 30 * time.Second

// vet reads, on a greeted connection of a keyed listener, the snapshot
// header and the first chunk of the body and verifies that chunk under
// the key the header names, from s.keyDir: only the holder of one of our
// keys gets past it. What it read is kept for the winner's reader. On
// failure it returns, besides the error, what tells the sender it was
// refused (refuse), to be run once the connection has left the table of
// pending ones.
func (s *netSource) vet(g *greeted) (refuse func(), err error) {
	rec := &recorder{r: g.c}
	fr := &frameReader{r: rec}
	g.c.SetReadDeadline(time.Now().Add(max(s.rt, vetTimeout)))
	in := bufio.NewReaderSize(fr, 64<<10)
	_, body, _, err := openHeader(in, g, ReaderOptions{KeyDir: s.keyDir, RequireEncryption: true}, "")
	for err == nil {
		var n int
		if n, err = body.Read(make([]byte, 1)); n > 0 || err == io.EOF {
			err = nil // the first chunk verified (or the last, when there is one)
			break
		}
	}
	if err != nil {
		return func() { s.refuse(g, fr, rec) }, err
	}
	g.replay = rec.buf
	return nil, nil
}

// refuseDrain bounds how long a refused sender may take to finish its
// stream before it is told it was refused.
const refuseDrain = time.Minute

// refuse reads the rest of a refused sender's stream and, if it awaits
// the handshake, tells it it was refused without saying why (the reason
// names our key directory and which keys it holds): so that a sender
// that forgot its key learns that, instead of seeing a reset connection.
func (s *netSource) refuse(g *greeted, fr *frameReader, rec *recorder) {
	rec.buf, rec.off = nil, true
	g.c.SetReadDeadline(time.Now().Add(refuseDrain))
	if _, err := io.Copy(io.Discard, fr); err != nil || !fr.handshake {
		return
	}
	nonce := make([]byte, hsNonceSize)
	rand.Read(nonce)
	body := append(append([]byte{statusFailed}, nonce...), refusedReason...)
	g.c.SetWriteDeadline(time.Now().Add(helloTimeout))
	writeFrame(g.c, frameReady, body)
}

// refusedReason is all a sender that did not prove it holds one of our
// keys learns of why it was refused.
const refusedReason = "refused: the stream is not encrypted with a key this receiver holds"

// recorder keeps what is read through it until off.
type recorder struct {
	r   io.Reader
	buf []byte
	off bool
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if !r.off {
		r.buf = append(r.buf, p[:n]...)
	}
	return n, err
}

// frameReader reads the payload of D frames as one stream, up to the E
// frame (io.EOF), remembering whether E asked for the handshake.
type frameReader struct {
	r         io.Reader
	remaining uint32
	ended     bool
	handshake bool
}

func (f *frameReader) Read(p []byte) (int, error) {
	for f.remaining == 0 {
		if f.ended {
			return 0, io.EOF
		}
		typ, n, payload, err := readFrame(f.r, func(t byte) int {
			switch t {
			case frameData:
				return maxDataFrame
			case frameEnd:
				return 1 + macSize
			}
			return -1
		})
		if err != nil {
			return 0, err
		}
		if typ == frameEnd {
			f.ended, f.handshake = true, len(payload) > 0 && payload[0] == 1
			return 0, io.EOF
		}
		f.remaining = n
	}
	if uint32(len(p)) > f.remaining {
		p = p[:f.remaining]
	}
	n, err := f.r.Read(p)
	f.remaining -= uint32(n)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// warnf writes one warning line; greeting goroutines call it concurrently.
func (s *netSource) warnf(format string, args ...any) {
	s.warnMu.Lock()
	defer s.warnMu.Unlock()
	fmt.Fprintf(s.warn, "warning: %s: %s\n", s.spec, fmt.Sprintf(format, args...))
}

// greet checks who connected and exchanges greetings. It runs on the
// connection's own goroutine and touches nothing of s but what listenSource
// set. On a loopback or unix connection, k's source becomes the user at
// the other end: a local stranger's connections then count as theirs,
// not as the sender's. k is nil for a connection the caller gave
// (NewConnSource).
func (s *netSource) greet(c net.Conn, k *admit.Ticket) (*greeted, error) {
	peerUID := tcpPeerUID
	local := false
	if _, ok := c.(*net.UnixConn); ok {
		local, peerUID = true, unixPeerUID
	} else if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		local = a.IP.IsLoopback()
	}
	if local && (k != nil || s.sameUser) {
		uid, err := peerUID(c)
		if err == nil && k != nil {
			k.SetSource(admit.WithUser(k.Source(), uid))
		} else if err != nil && s.sameUser {
			return nil, err
		}
		if s.sameUser && uid != os.Geteuid() && uid != 0 {
			return nil, fmt.Errorf("sender runs as uid %d, not ours (%d) nor root: a listener without keys accepts only its own user", uid, os.Geteuid())
		}
	}
	peer := make([]byte, hsNonceSize)
	if _, err := rand.Read(peer); err != nil {
		return nil, fmt.Errorf("nonce: %w", err)
	}
	// The greeting is answered within helloTimeout (or the read timeout,
	// if shorter); then the read timeout applies.
	ht := helloTimeout
	if s.rt > 0 && s.rt < ht {
		ht = s.rt
	}
	dc := &deadlineConn{Conn: c, rt: ht, wt: ht}
	if _, err := dc.Write(append([]byte(wireHello), peer...)); err != nil {
		return nil, fmt.Errorf("greet: %w", err)
	}
	// Exactly the greeting is read, unbuffered: what follows belongs to
	// the winner's reader.
	var hello [len(wireHello)]byte
	if _, err := io.ReadFull(dc, hello[:]); err != nil || string(hello[:]) != wireHello {
		var ne net.Error
		switch {
		case err == nil:
			err = errors.New("not a pcluster sender (bad greeting)")
		case errors.As(err, &ne) && ne.Timeout():
			err = fmt.Errorf("no greeting within %v", ht)
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			err = errors.New("closed before greeting")
		}
		return nil, err
	}
	dc.rt, dc.wt = s.rt, s.rt
	return &greeted{c: c, dc: dc, peer: peer}, nil
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
		if s.haveKeys && !s.keyed {
			// The sender never proved it holds one of our keys: it
			// learns that it was refused, not our key directory's
			// path or which key names and ids exist there.
			reason = []byte(refusedReason)
		}
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
	if s.ln != nil {
		s.ln.Close()
	}
	s.closeConn()
	return nil
}
