package stream

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
			if err := send(sinkSpec, data, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")), true); err != nil {
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

// TestGreetingBound: at most maxGreeting connections are pending at once;
// one more is greeted, and the oldest pending one is closed instead, with
// a warning. Before, the one more was closed: 64 idle connections turned
// every sender away.
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
	for i := 0; i < maxGreeting+1; i++ {
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
	if b, err := io.ReadAll(conns[0]); err != nil || len(b) != 0 {
		t.Errorf("the oldest of %d: read %q, %v after its greeting; want it closed", maxGreeting+1, b, err)
	}
	waitWarning(t, &warn, fmt.Sprintf("dropped a connection from %s: %d connections are already pending, and a newer one took the place of the oldest of its source", conns[0].LocalAddr(), maxGreeting))
	data := testData(ChunkSize, 8)
	if err := send("tcp:"+src.Addr(), data, Options{}, true); err != nil {
		t.Fatalf("sender after %d connections: %v (warnings: %q)", maxGreeting+1, err, warn.String())
	}
	if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
		t.Fatalf("received %d bytes, %v", len(b), err)
	}
	// The sender took the place of conns[1]; the rest were closed when it
	// was taken.
	waitWarning(t, &warn, "dropped a connection from "+conns[1].LocalAddr().String())
	waitWarning(t, &warn, fmt.Sprintf("closed %d other connection(s) that had not greeted", maxGreeting-1))
	if w := warn.String(); strings.Count(w, "dropped a connection") != 2 {
		t.Errorf("warnings %q, want two connections dropped", w)
	}
}

// TestGreetedStrangersDoNotDelay: more connections than a keyed listener
// holds pending, each greeting and then saying nothing, do not make a
// migration fail. Before, with maxGreeting of them open, the listener
// closed every newcomer, the sender too (it failed at once with
// "connection reset by peer"), for as long as they stayed: up to 60 s
// waiting for a header, then up to 60 s more while refused. Now the
// sender takes the place of the oldest. And a flood from another source
// between the sender's greeting and its header, twice as many connections
// as the listener holds, evicts only its own: from another address
// (127.0.0.2), or as another user on the same address (uid 65534 on
// 127.0.0.1, the attack as reported).
func TestGreetedStrangersDoNotDelay(t *testing.T) {
	dir := testKeys(t)
	for _, tc := range []struct{ name, scheme, flood string }{
		{"tcp", "tcp", ""}, {"unix", "unix", ""}, {"address", "tcp", "127.0.0.2"}, {"user", "tcp", "uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "user" && os.Geteuid() != 0 {
				t.Skip("needs root to flood as another user (CI runs as root)")
			}
			spec := "tcp:127.0.0.1:0"
			if tc.scheme == "unix" {
				spec = "unix:" + filepath.Join(t.TempDir(), "s.sock")
			}
			var warn syncBuffer
			src, err := OpenSource(spec, SourceOptions{HaveKeys: true, KeyDir: dir, Warn: &warn})
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
			var d net.Dialer
			// greeted dials a stranger that greets, is greeted and then
			// says nothing; a nil error means the listener greeted it.
			greeted := func() (net.Conn, error) {
				c, err := d.Dial(tc.scheme, addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				c.Write([]byte(wireHello))
				var hello [len(wireHello) + hsNonceSize]byte
				_, err = io.ReadFull(c, hello[:])
				return c, err
			}
			strangers := maxGreeting + 8
			var conns []net.Conn
			refused := 0
			for i := 0; i < strangers; i++ {
				c, err := greeted()
				conns = append(conns, c)
				if err != nil {
					refused++
				}
			}
			// The flood comes once the sender is greeted, before its
			// header: the sender's place is then the oldest of all.
			var flood func()
			switch tc.flood {
			case "127.0.0.2":
				flood = func() {
					d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}
					for i := 0; i < 2*maxGreeting; i++ {
						if _, err := greeted(); err != nil {
							t.Errorf("flood connection %d from 127.0.0.2: %v, want greeted", i, err)
						}
					}
				}
			case "uid 65534":
				flood = func() { floodAs(t, 65534, addr, 2*maxGreeting) }
			}
			data := testData(3*ChunkSize, 7)
			err = sendAfterGreeting(tc.scheme+":"+addr, data, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")), flood)
			if err != nil {
				t.Fatalf("the migration after %d silent strangers, %d of them refused a greeting: %v", strangers, refused, err)
			}
			if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
				t.Fatalf("received %d bytes, %v", len(b), err)
			}
			if refused > 0 {
				t.Errorf("%d of %d strangers were refused a greeting, want all greeted (the oldest evicted)", refused, strangers)
			}
			// Every stranger is closed: the oldest evicted, the others
			// when the sender was taken.
			for i, c := range conns {
				if b, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) || len(b) != 0 {
					t.Errorf("stranger %d read %q, %v after its greeting; want the end", i, b, err)
				}
			}
		})
	}
}

// TestRefusedStrangersDoNotDelay: connections that a keyed listener
// refused (a header that is no snapshot's), read to their end to be told
// so, no longer hold a place among the pending ones: more of them than
// the listener holds, each then silent, do not make a migration fail.
// Before, each held its place for up to 60 s more, and with maxGreeting of
// them the sender was closed at once. Those being told are bounded apart
// (maxRefusing), the oldest closed untold.
func TestRefusedStrangersDoNotDelay(t *testing.T) {
	dir := testKeys(t)
	var warn syncBuffer
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{HaveKeys: true, KeyDir: dir, Warn: &warn})
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
	strangers := maxGreeting + 8
	refused := 0
	var conns []net.Conn
	for i := 0; i < strangers; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte(wireHello))
		var hello [len(wireHello) + hsNonceSize]byte
		if _, err := io.ReadFull(c, hello[:]); err != nil {
			refused++
			continue
		}
		writeFrame(c, frameData, bytes.Repeat([]byte("not a snapshot header "), 16))
		conns = append(conns, c)
	}
	data := testData(3*ChunkSize, 10)
	if err := send("tcp:"+addr, data, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")), true); err != nil {
		t.Fatalf("the migration after %d refused strangers, %d of them refused a greeting: %v", strangers, refused, err)
	}
	if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
		t.Fatalf("received %d bytes, %v", len(b), err)
	}
	if refused > 0 {
		t.Errorf("%d of %d strangers were refused a greeting, want all greeted", refused, strangers)
	}
	// Each was dropped (and its place given back) before it was read to
	// its end: they are all still open, silent.
	for _, c := range conns {
		waitWarning(t, &warn, "dropped a connection from "+c.LocalAddr().String())
	}
}

// sendAfterGreeting is send with halt, calling during (if not nil) once
// the receiver has greeted the sender and before anything is sent.
func sendAfterGreeting(spec string, data []byte, opt Options, during func()) error {
	sink, err := OpenSink(spec, SinkOptions{DialTimeout: 5 * time.Second, WriteTimeout: 10 * time.Second})
	if err != nil {
		return err
	}
	defer sink.Close()
	if during != nil {
		during()
	}
	w, err := NewWriter(sink, opt)
	if err != nil {
		return err
	}
	if _, err := w.Write(data); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := sink.AwaitReady(10 * time.Second); err != nil {
		return err
	}
	return sink.Commit()
}

// floodScript opens n connections to a pthaw listener, greets on each and
// reads its greeting, then holds them all until its stdin closes.
const floodScript = `
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
n, hello, held, greeted = int(sys.argv[2]), sys.argv[3].encode(), [], 0
for _ in range(n):
    c = socket.create_connection((host, int(port)))
    held.append(c)
    c.sendall(hello)
    got = b""
    while len(got) < len(hello) + 16:
        b = c.recv(64)
        if not b:
            break
        got += b
    greeted += len(got) == len(hello) + 16
print(greeted, flush=True)
sys.stdin.read()
`

// floodAs runs floodScript as uid against addr with n connections and
// returns once every connection has been greeted or refused; the script
// holds them until the test ends.
func floodAs(t *testing.T, uid int, addr string, n int) {
	cmd := exec.Command("/usr/bin/python3", "-c", floodScript, addr, fmt.Sprint(n), wireHello)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("flood as uid %d: %v", uid, err)
	}
	if strings.TrimSpace(line) != fmt.Sprint(n) {
		t.Errorf("flood as uid %d: %s of %d connections greeted, want all", uid, strings.TrimSpace(line), n)
	}
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
	for _, opt := range []Options{{}, opts("", encryptOpt(other, CipherAESGCM, "k1.key"))} {
		err := send("tcp:"+addr, data, opt, true)
		if err == nil || strings.Contains(err.Error(), dir) {
			t.Fatalf("sender with %q: got %v, want refused without the receiver's details", opt.Cipher, err)
		}
		if !strings.Contains(err.Error(), refusedReason) {
			t.Errorf("sender with %q: got %v, want %q", opt.Cipher, err, refusedReason)
		}
	}
	if err := send("tcp:"+addr, data, opts("", encryptOpt(dir, CipherAESGCM, "k1.key")), true); err != nil {
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
