package stream

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestIdleStrangersDoNotDelay: connections that connect and say nothing,
// opened before a keyed migration, neither delay it nor make it fail. The
// listener served connections one at a time, giving each 10 s to greet:
// four delayed a migration by 40 s and seven made it fail. Now every
// connection is greeted at once and the first sender wins: the migration
// completes while every stranger is still open, within its first
// greeting deadline (the listener closes all of them when it takes the
// sender, and reports how many), and the sender's own 10 s greeting
// timeout, shorter than the strangers' turns added up, is never reached.
func TestIdleStrangersDoNotDelay(t *testing.T) {
	dir := testKeys(t)
	for _, scheme := range []string{"tcp", "unix"} {
		t.Run(scheme, func(t *testing.T) {
			spec := "tcp:127.0.0.1:0"
			if scheme == "unix" {
				spec = "unix:" + filepath.Join(t.TempDir(), "s.sock")
			}
			var warn syncBuffer
			// No read timeout: a stranger has helloTimeout (10 s) to greet.
			src, err := OpenSource(spec, SourceOptions{HaveKeys: true, Warn: &warn})
			if err != nil {
				t.Fatal(err)
			}
			addr := src.Addr()
			got := make(chan []byte, 1)
			errc := make(chan error, 1)
			go func() {
				b, err := receive(src, ReaderOptions{KeyDir: dir, RequireEncryption: true})
				got <- b
				errc <- err
			}()
			const strangers = 8
			var conns []net.Conn
			for i := 0; i < strangers; i++ {
				c, err := net.Dial(scheme, addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				conns = append(conns, c)
			}
			data := testData(3*ChunkSize, 7)
			sinkSpec := scheme + ":" + addr
			if err := send(sinkSpec, data, Options{Encrypt: encryptOpt(dir, CipherAESGCM, "k1.key")}, true); err != nil {
				t.Fatalf("the migration after %d idle connections: %v (warnings: %q)", strangers, err, warn.String())
			}
			if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
				t.Fatalf("received %d bytes, %v", len(b), err)
			}
			w := warn.String()
			if strings.Contains(w, "dropped") || !strings.Contains(w, fmt.Sprintf("closed %d other connection(s) that had not greeted", strangers)) {
				t.Errorf("warnings %q, want every stranger still open when the sender was taken, and closed then", w)
			}
			// Each stranger was closed when the sender was taken (greeted
			// first, unless its greeting goroutine had not yet run).
			for i, c := range conns {
				b, err := io.ReadAll(c)
				if err != nil || len(b) != 0 && (len(b) != len(wireHello)+hsNonceSize || !bytes.HasPrefix(b, []byte(wireHello))) {
					t.Errorf("stranger %d read %q, %v; want at most the greeting, then the end", i, b, err)
				}
			}
		})
	}
}

// TestGreetingBound: at most maxGreeting connections are greeted at once;
// one more is closed at once, with a warning. A place freed by a
// connection that goes away is taken by the next, here the sender.
func TestGreetingBound(t *testing.T) {
	var warn syncBuffer
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{Warn: &warn})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 1)
	errc := make(chan error, 1)
	go func() {
		b, err := receive(src, ReaderOptions{})
		got <- b
		errc <- err
	}()
	var conns []net.Conn
	for i := 0; i < maxGreeting; i++ {
		c, err := net.Dial("tcp", src.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Greeted while the others are still greeting: the read ends well
		// before the listener's helloTimeout for the connections before.
		c.SetReadDeadline(time.Now().Add(helloTimeout / 2))
		var hello [len(wireHello) + hsNonceSize]byte
		if _, err := io.ReadFull(c, hello[:]); err != nil {
			t.Fatalf("connection %d, with %d others greeting: %v", i, i, err)
		}
		conns = append(conns, c)
	}
	extra, err := net.Dial("tcp", src.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	if b, err := io.ReadAll(extra); err != nil || len(b) != 0 {
		t.Errorf("connection beyond %d: read %q, %v; want it closed at once, ungreeted", maxGreeting, b, err)
	}
	waitWarning(t, &warn, fmt.Sprintf("dropped a connection from %s: %d connections are already greeting", extra.LocalAddr(), maxGreeting))
	conns[0].Close()
	waitWarning(t, &warn, "dropped a connection from "+conns[0].LocalAddr().String()+": closed before greeting")
	data := testData(ChunkSize, 8)
	if err := send("tcp:"+src.Addr(), data, Options{}, true); err != nil {
		t.Fatalf("sender after a place was freed: %v (warnings: %q)", err, warn.String())
	}
	if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
		t.Fatalf("received %d bytes, %v", len(b), err)
	}
	waitWarning(t, &warn, fmt.Sprintf("closed %d other connection(s) that had not greeted", maxGreeting-1))
}

// TestKeyedListenerTakesFirstAuthenticated: a listener with keys takes as
// its sender only a connection whose stream authenticates under one of its
// keys. Before, the first connection to greet took the listener's one
// turn: one that greeted and said nothing held it until its timeout, and
// one without the key made the migration fail. Now those are refused (a
// sender is told so, without the receiver's details) and the listener
// waits for the key holder.
func TestKeyedListenerTakesFirstAuthenticated(t *testing.T) {
	dir := testKeys(t)
	other := testKeys(t) // the same key names, other keys
	var warn syncBuffer
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{HaveKeys: true, KeyDir: dir, ReadTimeout: 10 * time.Second, Warn: &warn})
	if err != nil {
		t.Fatal(err)
	}
	addr := src.Addr()
	got := make(chan []byte, 1)
	errc := make(chan error, 1)
	go func() {
		b, err := receive(src, ReaderOptions{KeyDir: dir, RequireEncryption: true})
		got <- b
		errc <- err
	}()
	// One that greets and then says nothing.
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	silent.Write([]byte(wireHello))
	var hello [len(wireHello) + hsNonceSize]byte
	if _, err := io.ReadFull(silent, hello[:]); err != nil {
		t.Fatal(err)
	}
	data := testData(3*ChunkSize, 9)
	// Plaintext, and a key the receiver does not hold: refused, told so.
	for _, opt := range []Options{{}, {Encrypt: encryptOpt(other, CipherAESGCM, "k1.key")}} {
		err := send("tcp:"+addr, data, opt, true)
		if err == nil || strings.Contains(err.Error(), dir) {
			t.Fatalf("sender with %q: got %v, want refused without the receiver's details", opt.Encrypt, err)
		}
		if !strings.Contains(err.Error(), refusedReason) {
			t.Errorf("sender with %q: got %v, want %q", opt.Encrypt, err, refusedReason)
		}
	}
	if err := send("tcp:"+addr, data, Options{Encrypt: encryptOpt(dir, CipherAESGCM, "k1.key")}, true); err != nil {
		t.Fatalf("the key holder after three others: %v (warnings: %q)", err, warn.String())
	}
	if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
		t.Fatalf("received %d bytes, %v", len(b), err)
	}
	w := warn.String()
	if strings.Count(w, "dropped a connection") != 2 || !strings.Contains(w, "closed 1 other connection(s)") {
		t.Errorf("warnings %q, want the two refused senders dropped and the silent one closed", w)
	}
	if b, err := io.ReadAll(silent); err != nil || len(b) != 0 {
		t.Errorf("the silent connection read %q, %v after the sender was taken; want it closed", b, err)
	}
}
