// Package admit bounds the connections a listener holds before they prove
// who they are (a greeting and a keyed first chunk for pthaw, mutual TLS
// for raft), without letting strangers lock the real peer out.
//
// A listener that refuses newcomers once its table of pending handshakes is
// full can be kept full by anyone who reaches the port: open as many
// connections as the table holds, say nothing, reopen each as it times out,
// and every real peer is turned away. A Table instead admits every
// newcomer and, when full, evicts one pending connection: the oldest of the
// source (address, or user) that holds the most. So a flood from one
// source evicts only its own connections once it holds more than any
// other. A peer alone in its source is evicted only once every source in
// the table holds one connection and all older ones are gone: a flood from
// as many sources as the table has places, all connected after the peer
// and before its handshake ends (milliseconds); or a flood from the peer's
// own source, of as many connections, in that time (the peer, newest of
// its source, goes last). The table's size stays the bound on descriptors
// and goroutines. Its users: pthaw's listener (migrate/stream), and
// pclusterd's raft, API, metrics and gossip ports (cluster).
package admit

import (
	"io"
	"net"
	"strconv"
	"sync"
)

// Table is a bounded set of pending connections. Its methods may be called
// from any goroutine.
type Table struct {
	max int

	mu      sync.Mutex // guards the fields below and every Ticket's state
	seq     uint64     // admissions so far: orders tickets, oldest first
	pending map[*Ticket]struct{}
	count   map[string]int // pending tickets per source
	closed  bool
}

// Ticket is one connection's place in a Table, from Admit to Release.
type Ticket struct {
	t      *Table
	c      io.Closer
	source string
	seq    uint64
	state  state // guarded by t.mu
}

type state int

const (
	pending state = iota
	released
	evicted // closed by the table: a newer connection took its place
	closed  // closed by Table.Close
)

// New returns a table of at most max pending connections (max >= 1).
func New(max int) *Table {
	return &Table{max: max, pending: map[*Ticket]struct{}{}, count: map[string]int{}}
}

// Admit enters c, from source (see Source), into the table. If the table
// is full, it first evicts one pending connection and closes it: the oldest
// of the source that would hold the most pending connections, c counted.
// It returns c's ticket, or nil if the table is closed (c is then closed).
func (t *Table) Admit(c io.Closer, source string) *Ticket {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		c.Close()
		return nil
	}
	var victim *Ticket
	if len(t.pending) >= t.max {
		victim = t.victim(source)
		t.remove(victim, evicted)
	}
	t.seq++
	k := &Ticket{t: t, c: c, source: source, seq: t.seq}
	t.pending[k] = struct{}{}
	t.count[source]++
	t.mu.Unlock()
	if victim != nil {
		victim.c.Close()
	}
	return k
}

// victim picks the ticket to evict for a newcomer from source: the oldest
// of the source with the most pending tickets, the newcomer counted in its
// own source. Callers hold t.mu; the table is not empty.
func (t *Table) victim(source string) *Ticket {
	var v *Ticket
	vn := 0
	for k := range t.pending {
		n := t.count[k.source]
		if k.source == source {
			n++
		}
		if v == nil || n > vn || n == vn && k.seq < v.seq {
			v, vn = k, n
		}
	}
	return v
}

// remove takes k out of the table. Callers hold t.mu.
func (t *Table) remove(k *Ticket, s state) {
	delete(t.pending, k)
	if t.count[k.source]--; t.count[k.source] == 0 {
		delete(t.count, k.source)
	}
	k.state = s
}

// SetSource moves a pending ticket to another source, once more is known
// of who connected than its address (the user at the other end of a
// loopback or unix connection).
func (k *Ticket) SetSource(source string) {
	t := k.t
	t.mu.Lock()
	defer t.mu.Unlock()
	if k.state != pending || k.source == source {
		return
	}
	if t.count[k.source]--; t.count[k.source] == 0 {
		delete(t.count, k.source)
	}
	k.source = source
	t.count[source]++
}

// Source returns the ticket's source.
func (k *Ticket) Source() string {
	k.t.mu.Lock()
	defer k.t.mu.Unlock()
	return k.source
}

// Release gives the ticket's place back, the moment its connection has
// proved who it is or failed to: before anything slow is done with it. It
// reports whether the connection was still pending; false means the table
// closed it (evicted for a newer one, or Table.Close) and the caller must
// not use it. Release is idempotent.
func (k *Ticket) Release() bool {
	t := k.t
	t.mu.Lock()
	defer t.mu.Unlock()
	switch k.state {
	case pending:
		t.remove(k, released)
		return true
	case released:
		return true
	}
	return false
}

// Evicted reports whether the table closed the connection to make room for
// a newer one.
func (k *Ticket) Evicted() bool {
	k.t.mu.Lock()
	defer k.t.mu.Unlock()
	return k.state == evicted
}

// Close closes every pending connection and the table: Admit closes what
// it is given from then on. It returns how many connections it closed.
func (t *Table) Close() int {
	t.mu.Lock()
	t.closed = true
	var cs []io.Closer
	for k := range t.pending {
		t.remove(k, closed)
		cs = append(cs, k.c)
	}
	t.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
	return len(cs)
}

// Len returns how many connections are pending.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.pending)
}

// Source names where a connection comes from, for Admit: an IPv4 address,
// an IPv6 address's /64 (one host is commonly given a whole /64, so its
// addresses count as one), or the network name for an address without an
// IP (a unix socket: refine it with the peer's user, Ticket.SetSource).
func Source(a net.Addr) string {
	var ip net.IP
	switch a := a.(type) {
	case *net.TCPAddr:
		if a != nil {
			ip = a.IP
		}
	case *net.UDPAddr:
		if a != nil {
			ip = a.IP
		}
	case *net.UnixAddr:
		return "unix" // a client's address is mostly unnamed, and may be nil
	default:
		if a == nil {
			return "?"
		}
		return a.Network()
	}
	if v4 := ip.To4(); v4 != nil {
		return v4.String()
	}
	if len(ip) == net.IPv6len {
		return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
	}
	return "?"
}

// WithUser refines source with the user at the other end, when it is
// known (loopback and unix connections).
func WithUser(source string, uid int) string {
	return source + " uid " + strconv.Itoa(uid)
}

// Listener admits each connection it accepts into a Table: at most max
// are pending at once, the newest evicting as Admit does. A connection
// holds its place until Release is called on it (or on a connection that
// wraps it, such as a *tls.Conn) or it is closed.
type Listener struct {
	net.Listener
	t *Table
}

// NewListener returns ln with its accepted connections admitted into a
// table of max places.
func NewListener(ln net.Listener, max int) *Listener {
	return &Listener{Listener: ln, t: New(max)}
}

// Accept waits for the next connection and admits it.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	ac := l.t.Conn(c)
	if ac == nil {
		return nil, net.ErrClosed
	}
	return ac, nil
}

// Close stops listening and closes every pending connection.
func (l *Listener) Close() error {
	err := l.Listener.Close()
	l.t.Close()
	return err
}

// Conn admits c, from its remote address's source, and returns it wrapped:
// closing the result gives its place back, and so does Release. It returns
// nil if the table is closed (c is then closed).
func (t *Table) Conn(c net.Conn) net.Conn {
	k := t.Admit(c, Source(c.RemoteAddr()))
	if k == nil {
		return nil
	}
	return &conn{Conn: c, k: k}
}

// conn is a connection admitted by Table.Conn.
type conn struct {
	net.Conn
	k *Ticket
}

func (c *conn) Close() error {
	c.k.Release()
	return c.Conn.Close()
}

// Release gives back the place of c, a connection from Table.Conn (or a
// Listener) or one wrapping it (a *tls.Conn, through NetConn), once it has proved who
// it is. It does nothing for any other connection.
func Release(c net.Conn) {
	for c != nil {
		switch x := c.(type) {
		case *conn:
			x.k.Release()
			return
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return
		}
	}
}
