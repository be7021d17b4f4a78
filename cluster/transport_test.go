package cluster

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"

	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/internal/admit"
)

// TestRaftStreamHandshake: the raft port hands raft only connections that
// completed mutual TLS with the cluster CA, drops one that stays silent
// within the handshake timeout, and a silent one delays no other.
func TestRaftStreamHandshake(t *testing.T) {
	old := handshakeTimeout
	handshakeTimeout = 500 * time.Millisecond
	defer func() { handshakeTimeout = old }()

	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := key.CA()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Issue("n1", net.IPv4(127, 0, 0, 1))
	if err != nil {
		t.Fatal(err)
	}
	st, err := newTLSStream("127.0.0.1:0", ca.ServerTLS(cert), ca.ClientTLS(cert))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	addr := st.listenAddr().String()

	// A silent connection: closed by the server after the timeout.
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	t0 := time.Now()

	// Meanwhile a peer with a cluster certificate gets through at once.
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := st.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	c, err := st.Dial(raft.ServerAddress(addr), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// The handshake completes on the first write (TLS 1.3).
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-accepted:
		a.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("an authenticated peer was not accepted while another connection stayed silent")
	}

	silent.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = silent.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("a silent connection was still open after 10 s")
	}
	if err == nil {
		t.Fatal("the server sent something to a silent connection")
	}
	if d := time.Since(t0); d < 400*time.Millisecond {
		t.Errorf("silent connection closed after %v, before the handshake timeout", d)
	}
	select {
	case <-accepted:
		t.Error("the silent connection was handed to raft")
	case <-time.After(100 * time.Millisecond):
	}
}

// TestRaftStreamHandshakeBound: at most maxHandshakes handshakes are under
// way at once; a connection beyond them is taken, and the oldest under way
// is closed instead. A peer then completes mutual TLS and reaches raft
// while the table is full of silent strangers, and a flood from another
// address between its connection and its handshake evicts only its own.
// Before, the connection beyond the bound was closed: 64 silent
// connections, renewed every 10 s, turned away every raft connection to
// the node.
func TestRaftStreamHandshakeBound(t *testing.T) {
	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := key.CA()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Issue("n1", net.IPv4(127, 0, 0, 1))
	if err != nil {
		t.Fatal(err)
	}
	st, err := newTLSStream("127.0.0.1:0", ca.ServerTLS(cert), ca.ClientTLS(cert))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	addr := st.listenAddr().String()
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := st.Accept(); err == nil {
			accepted <- c
		}
	}()
	// mirror follows the stream layer's table, admission for admission
	// (the accept loop takes connections in the order they were made), to
	// tell which connection each admission evicts.
	mirror := admit.New(maxHandshakes)
	var mirrored []*closer
	closes := 0
	var d net.Dialer
	dial := func(from net.IP) net.Conn {
		d.LocalAddr = &net.TCPAddr{IP: from}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		m := &closer{c: c, n: &closes}
		mirror.Admit(m, from.String())
		mirrored = append(mirrored, m)
		return c
	}
	// evicted waits until the stream layer has closed the connection the
	// mirror closed last: then it has admitted every connection made so far.
	evicted := func(what string) {
		t.Helper()
		var last *closer
		for _, m := range mirrored {
			if m.closed > 0 && (last == nil || m.closed > last.closed) {
				last = m
			}
		}
		if n, err := last.c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("%s: the connection it evicts read %d bytes, %v; want it closed", what, n, err)
		}
	}
	lo, other := net.IPv4(127, 0, 0, 1), net.IPv4(127, 0, 0, 2)
	for i := 0; i < maxHandshakes; i++ {
		dial(lo)
	}
	peer := dial(lo)
	evicted("a connection beyond the bound")
	for i := 0; i < 2*maxHandshakes; i++ {
		dial(other)
	}
	evicted("a flood from another address")
	c := tls.Client(peer, ca.ClientTLS(cert))
	if err := c.Handshake(); err != nil {
		t.Fatalf("handshake of a peer among %d silent connections and a flood: %v", maxHandshakes, err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	a := <-accepted
	a.Close()
}

// closer records when the mirror table closed it: the how-manieth close
// of those counted by n.
type closer struct {
	c      net.Conn
	n      *int
	closed int
}

func (m *closer) Close() error {
	*m.n++
	m.closed = *m.n
	return nil
}

// TestAPIPendingBound: the TLS API holds at most maxAPIPending connections
// that have not sent a request; one more is taken and the oldest pending
// one closed, so that strangers cannot exhaust the descriptors raft and
// gossip share with the API. A cluster client gets through among them,
// and once it has sent a request its connection no longer counts: a
// flood from its own address afterwards leaves it open. Before, the
// API's pending connections were not bounded at all.
func TestAPIPendingBound(t *testing.T) {
	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := key.CA()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Issue("n1", net.IPv4(127, 0, 0, 1))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := listenAPI("127.0.0.1:0", ca.ServerTLS(cert))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:           http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }),
		ReadHeaderTimeout: time.Hour, // only the bound closes a silent connection here
		ConnState:         releaseOnRequest,
		ErrorLog:          log.New(io.Discard, "", 0), // a handshake error for each evicted
	}
	go srv.Serve(ln)
	defer srv.Close()
	addr := ln.Addr().String()
	// All from one address: the table evicts in the order it admitted,
	// the order of the connections.
	var pending []net.Conn
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		pending = append(pending, c)
		return c
	}
	// evicted waits until the server has closed the oldest connections
	// beyond the bound: then it has admitted every one made so far.
	evicted := func(what string) {
		t.Helper()
		n := len(pending) - maxAPIPending
		for i, c := range pending[:n] {
			c.SetReadDeadline(time.Now().Add(time.Minute)) // against a hang, not a measure
			if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("%s: pending connection %d of %d read %d bytes, %v; want it closed", what, i, len(pending), n, err)
			}
		}
		pending = pending[n:]
	}
	for i := 0; i < maxAPIPending; i++ {
		dial()
	}
	raw := dial()
	evicted("a connection beyond the bound")
	// A cluster client on that newest connection: two requests, with a
	// flood from its address between them.
	c := tls.Client(raw, ca.ClientTLS(cert))
	br := bufio.NewReader(c)
	get := func(what string) {
		t.Helper()
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(b) != "ok" {
			t.Fatalf("%s: %q, %v; want ok", what, b, err)
		}
	}
	get("a request among silent connections")
	pending = slices.DeleteFunc(pending, func(c net.Conn) bool { return c == raw })
	for i := 0; i < 2*maxAPIPending; i++ {
		dial()
	}
	evicted("a flood after the request")
	get("a second request on the same connection after a flood")
}

// TestGossipStreamBound: the gossip port handles at most maxGossipStreams
// TCP connections at once; one more is taken and the oldest closed, and a
// node still joins (a push/pull over TCP) among silent connections.
// Before, memberlist held every accepted connection for its TCP timeout,
// however many came.
func TestGossipStreamBound(t *testing.T) {
	newNode := func(name string) *memberlist.Memberlist {
		mc := memberlist.DefaultLANConfig()
		mc.Name, mc.BindAddr, mc.BindPort = name, "127.0.0.1", 0
		mc.TCPTimeout = time.Hour // only the bound closes a silent connection here
		mc.Logger = log.New(io.Discard, "", 0)
		if _, err := newGossipTransport(mc); err != nil {
			t.Fatal(err)
		}
		ml, err := memberlist.Create(mc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ml.Shutdown() })
		return ml
	}
	a := newNode("a")
	addr := a.LocalNode().FullAddress().Addr
	var conns []net.Conn
	for i := 0; i < maxGossipStreams+1; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	conns[0].SetReadDeadline(time.Now().Add(time.Minute)) // against a hang, not a measure
	if n, err := conns[0].Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the oldest of %d silent connections read %d bytes, %v; want it closed", maxGossipStreams+1, n, err)
	}
	b := newNode("b")
	if n, err := b.Join([]string{addr}); n != 1 || err != nil {
		t.Fatalf("join among %d silent connections: %d, %v", maxGossipStreams, n, err)
	}
}
