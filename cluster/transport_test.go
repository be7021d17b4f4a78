package cluster

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/pcluster/pcluster/cluster/pki"
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

// TestRaftStreamHandshakeBound: at most maxHandshakes handshakes run at
// once; a connection beyond them is closed at once, while those under way
// go on (one of them then completes mutual TLS and reaches raft). Before
// the bound, every connection held a goroutine and a descriptor for the
// whole handshake timeout, however many came.
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
	var conns []net.Conn
	for i := 0; i < maxHandshakes; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	extra, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	if n, err := extra.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("connection beyond %d handshakes: read %d bytes, %v; want it closed", maxHandshakes, n, err)
	}
	// The first connection is still in its handshake: it completes it now.
	c := tls.Client(conns[0], ca.ClientTLS(cert))
	if err := c.Handshake(); err != nil {
		t.Fatalf("handshake on a connection accepted before the bound was reached: %v", err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	a := <-accepted
	a.Close()
}
