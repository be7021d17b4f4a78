package admit

import (
	"fmt"
	"net"
	"testing"
)

// fakeConn is a connection that records whether the table closed it.
type fakeConn struct {
	name   string
	closed bool
}

func (c *fakeConn) Close() error { c.closed = true; return nil }

// TestEviction: a full table evicts, for each newcomer, the oldest
// connection of the source that would hold the most (the newcomer
// counted), and never holds more than its size.
func TestEviction(t *testing.T) {
	type step struct {
		name, source string
		evicts       string // "" for none
	}
	steps := []step{
		{"a1", "A", ""},
		{"a2", "A", ""},
		{"a3", "A", ""},
		{"s1", "S", ""},   // full now: A 3, S 1
		{"a4", "A", "a1"}, // A would hold 4: its oldest goes
		{"b1", "B", "a2"}, // A 3 is the largest
		{"s2", "S", "a3"}, // A 2, S 2 with s2: the older of a3 and s1
		{"b2", "B", "s1"}, // A 1, S 2, B 2 with b2: s1, older than b1
		{"c1", "C", "b1"}, // A 1, S 1, B 2: B's oldest
	}
	tab := New(4)
	conns := map[string]*fakeConn{}
	for _, st := range steps {
		c := &fakeConn{name: st.name}
		conns[st.name] = c
		if tab.Admit(c, st.source) == nil {
			t.Fatalf("admit %s: table closed", st.name)
		}
		var got []string
		for name, c := range conns {
			if c.closed {
				got = append(got, name)
				delete(conns, name)
			}
		}
		switch {
		case st.evicts == "" && len(got) != 0, st.evicts != "" && (len(got) != 1 || got[0] != st.evicts):
			t.Errorf("admit %s from %s: evicted %v, want %q", st.name, st.source, got, st.evicts)
		}
		if n := tab.Len(); n > 4 {
			t.Fatalf("admit %s: %d pending, want at most 4", st.name, n)
		}
	}
}

// TestFloodKeepsOthers: however many connections one source opens, a
// connection from another source stays in the table, and so does one of
// the flooding source's own, newer than the flood only by being admitted
// after most of it: eviction takes the oldest.
func TestFloodKeepsOthers(t *testing.T) {
	tab := New(64)
	sender := &fakeConn{name: "sender"}
	k := tab.Admit(sender, "127.0.0.1 uid 0")
	for i := 0; i < 10000; i++ {
		tab.Admit(&fakeConn{}, "127.0.0.1 uid 65534")
	}
	if sender.closed || !k.Release() {
		t.Fatal("a flood from another source evicted the sender")
	}
	// The same source: the sender, admitted after the flood began, is the
	// last of it to go.
	tab = New(64)
	for i := 0; i < 100; i++ {
		tab.Admit(&fakeConn{}, "10.0.0.7")
	}
	sender = &fakeConn{name: "sender"}
	k = tab.Admit(sender, "10.0.0.7")
	for i := 0; i < 63; i++ {
		tab.Admit(&fakeConn{}, "10.0.0.7")
	}
	if sender.closed || !k.Release() {
		t.Fatal("63 newer connections of the sender's own source evicted it from a table of 64")
	}
}

// TestRelease: a released ticket is not evicted nor closed by Close, and
// gives its place back; an evicted one reports it.
func TestRelease(t *testing.T) {
	tab := New(2)
	a, b := &fakeConn{}, &fakeConn{}
	ka := tab.Admit(a, "A")
	kb := tab.Admit(b, "A")
	if first, again := kb.Release(), kb.Release(); !first || !again {
		t.Fatalf("release of a pending ticket: %v, then %v; want true twice", first, again)
	}
	tab.Admit(&fakeConn{}, "A") // a place was free: nothing evicted
	if a.closed {
		t.Fatal("admit with a free place evicted a connection")
	}
	tab.Admit(&fakeConn{}, "A")
	if !a.closed || ka.Release() || !ka.Evicted() {
		t.Fatalf("the oldest after the table filled: closed %v, evicted %v; want evicted", a.closed, ka.Evicted())
	}
	if b.closed {
		t.Fatal("a released connection was closed")
	}
	if n := tab.Close(); n != 2 {
		t.Errorf("close: closed %d, want 2", n)
	}
	if b.closed {
		t.Fatal("close closed a released connection")
	}
	late := &fakeConn{}
	if tab.Admit(late, "A") != nil || !late.closed {
		t.Fatal("admit after close: want nil and the connection closed")
	}
}

// TestSetSource: a ticket moved to its user's source no longer counts in
// its address's.
func TestSetSource(t *testing.T) {
	tab := New(3)
	sender := &fakeConn{}
	k := tab.Admit(sender, "127.0.0.1")
	k.SetSource(WithUser("127.0.0.1", 0))
	tab.Admit(&fakeConn{}, "127.0.0.1")
	tab.Admit(&fakeConn{}, "127.0.0.1")
	for i := 0; i < 10; i++ {
		tab.Admit(&fakeConn{}, "127.0.0.1")
	}
	if sender.closed {
		t.Fatal("connections of the address evicted the one moved to its user")
	}
	if got := k.Source(); got != "127.0.0.1 uid 0" {
		t.Errorf("source %q, want %q", got, "127.0.0.1 uid 0")
	}
}

func TestSource(t *testing.T) {
	var nilTCP *net.TCPAddr
	var nilUnix *net.UnixAddr
	for _, tc := range []struct {
		addr net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4000}, "192.0.2.1"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 1}, "192.0.2.1"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 1}, "2001:db8:1:2::/64"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:ffff::1"), Port: 2}, "2001:db8:1:2::/64"},
		{&net.UnixAddr{Name: "", Net: "unix"}, "unix"},
		{nilUnix, "unix"},
		{nilTCP, "?"},
		{nil, "?"},
	} {
		if got := Source(tc.addr); got != tc.want {
			t.Errorf("Source(%v) = %q, want %q", tc.addr, got, tc.want)
		}
	}
}

func ExampleTable() {
	tab := New(2)
	old := &fakeConn{name: "stranger 1"}
	tab.Admit(old, "198.51.100.9")
	tab.Admit(&fakeConn{name: "stranger 2"}, "198.51.100.9")
	sender := &fakeConn{name: "sender"}
	k := tab.Admit(sender, "192.0.2.1") // full: the stranger's oldest goes
	fmt.Println(old.closed, sender.closed, k.Release())
	// Output: true false true
}

// wrapped is a connection around another, as *tls.Conn is.
type wrapped struct{ net.Conn }

func (w wrapped) NetConn() net.Conn { return w.Conn }

// TestListener: a Listener admits what it accepts; Release, through a
// wrapping connection, or Close gives the place back; a newcomer beyond
// the bound evicts the oldest pending.
func TestListener(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := NewListener(inner, 1)
	defer ln.Close()
	accept := func() (client, server net.Conn) {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return c, s
	}
	_, s1 := accept()
	Release(wrapped{s1})
	c2, s2 := accept() // s1 released: nothing evicted
	s2.Close()         // gives its place back
	c3, _ := accept()
	c4, _ := accept() // evicts c3
	if _, err := s1.Write([]byte("x")); err != nil {
		t.Errorf("a released connection: %v, want it open", err)
	}
	if n, err := c2.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("a closed connection read %d, %v", n, err)
	}
	if n, err := c3.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("the oldest pending, beyond the bound: read %d, %v; want it closed", n, err)
	}
	ln.Close()
	if n, err := c4.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("pending when the listener closed: read %d, %v; want it closed", n, err)
	}
}
