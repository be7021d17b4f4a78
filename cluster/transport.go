package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/pcluster/pcluster/internal/admit"
)

// handshakeTimeout bounds how long a connection to the raft port may stay
// unauthenticated: one that has not completed the mutual TLS handshake by
// then is closed (as the API's ReadHeaderTimeout does for HTTP).
var handshakeTimeout = 10 * time.Second

// maxHandshakes bounds the handshakes under way at once, so that whoever
// can reach the port cannot make the node hold an unbounded number of
// goroutines and descriptors, 10 s each, by connecting fast. Beyond it a
// new connection is still taken, and one under way is closed instead: the
// oldest from the address holding the most (see package admit). Closing
// the newcomer instead let 64 silent connections, renewed every 10 s, turn
// away every raft connection to the node (a leader change or a restart
// could not reconnect).
const maxHandshakes = 64

// tlsStream is raft's stream layer over mutual TLS with the cluster CA.
// raft's transport hands accepted connections to a goroutine that would
// run the handshake lazily, with no deadline: anyone who can reach the
// port could hold connections (and file descriptors) open forever. So the
// stream layer runs each handshake itself, beside the accept loop (a slow
// one delays no other), and gives raft only authenticated connections.
type tlsStream struct {
	ln        net.Listener // plain TCP
	server    *tls.Config
	client    *tls.Config
	advertise net.Addr // what peers dial; raft records it in its configuration

	conns   chan net.Conn
	pending *admit.Table // handshakes under way, at most maxHandshakes
	done    chan struct{}
	ctx     context.Context // cancelled by Close: ends handshakes under way
	cancel  context.CancelFunc
	once    sync.Once
}

func newTLSStream(addr string, server, client *tls.Config) (*tlsStream, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("raft listen %s: %w", addr, err)
	}
	t := &tlsStream{ln: ln, server: server, client: client, conns: make(chan net.Conn), pending: admit.New(maxHandshakes), done: make(chan struct{})}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	go t.acceptLoop()
	return t, nil
}

func (t *tlsStream) acceptLoop() {
	var delay time.Duration
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				t.Close()
				return
			}
			// Out of descriptors or memory, an aborted connection: wait
			// and go on, as net/http and raft's own loop do.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(delay):
				continue
			case <-t.done:
				return
			}
		}
		delay = 0
		if k := t.pending.Admit(c, admit.Source(c.RemoteAddr())); k != nil {
			go t.handshake(c, k)
		}
	}
}

// handshake runs the server side of mutual TLS on c and hands the
// connection to Accept. Its place among the handshakes under way is given
// back the moment the handshake ends, before the connection waits for
// raft to take it.
func (t *tlsStream) handshake(c net.Conn, k *admit.Ticket) {
	tc := tls.Server(c, t.server)
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	err := tc.HandshakeContext(t.ctx)
	if !k.Release() {
		return // closed by the table: evicted for a newer connection, or Close
	}
	if err != nil {
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	select {
	case t.conns <- tc:
	case <-t.done:
		tc.Close()
	}
}

// Accept returns the next connection that completed the handshake.
func (t *tlsStream) Accept() (net.Conn, error) {
	select {
	case c := <-t.conns:
		return c, nil
	case <-t.done:
		return nil, net.ErrClosed
	}
}

func (t *tlsStream) Close() error {
	var err error
	t.once.Do(func() {
		t.cancel()
		close(t.done)
		err = t.ln.Close()
		t.pending.Close()
	})
	return err
}

// Addr is the advertised address: raft refuses an unspecified one (0.0.0.0).
func (t *tlsStream) Addr() net.Addr { return t.advertise }

// listenAddr is the address actually listened on.
func (t *tlsStream) listenAddr() *net.TCPAddr { return t.ln.Addr().(*net.TCPAddr) }

func (t *tlsStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	c, err := tls.DialWithDialer(d, "tcp", string(addr), t.client)
	if err != nil {
		return nil, fmt.Errorf("raft dial %s: %w", addr, err)
	}
	return c, nil
}
