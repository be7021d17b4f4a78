package stream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// endpointPair opens a source and returns it with the spec a sink must be
// opened with to reach it.
type endpointPair func(t *testing.T) (Source, string)

var endpoints = map[string]endpointPair{
	"file": func(t *testing.T) (Source, string) {
		p := filepath.Join(t.TempDir(), "snap")
		return nil, p // the source is opened after the sink closed
	},
	"fifo": func(t *testing.T) (Source, string) {
		p := filepath.Join(t.TempDir(), "fifo")
		if err := syscall.Mkfifo(p, 0o600); err != nil {
			t.Skipf("mkfifo: %v", err)
		}
		return nil, p
	},
	"tcp": func(t *testing.T) (Source, string) {
		src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return src, "tcp:" + src.Addr()
	},
	"unix": func(t *testing.T) (Source, string) {
		p := filepath.Join(t.TempDir(), "s.sock")
		src, err := OpenSource("unix:"+p, SourceOptions{ReadTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return src, "unix:" + p
	},
}

// send writes data as a snapshot to spec and closes everything.
func send(spec string, data []byte, opt Options, halt bool) error {
	sink, err := OpenSink(spec, SinkOptions{DialTimeout: 5 * time.Second, WriteTimeout: 10 * time.Second})
	if err != nil {
		return err
	}
	defer sink.Close()
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
	if halt {
		if err := sink.AwaitReady(10 * time.Second); err != nil {
			return err
		}
		return sink.Commit()
	}
	return sink.Close()
}

// receive reads a whole snapshot from src and runs the receiver's side of
// the handshake.
func receive(src Source, opt ReaderOptions) ([]byte, error) {
	defer src.Close()
	r, _, err := NewReader(src, opt)
	if err != nil {
		src.Ready(err)
		return nil, err
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	if err != nil {
		src.Ready(err)
		return nil, err
	}
	if err := src.Ready(nil); err != nil {
		return nil, err
	}
	return got, src.AwaitCommit(10 * time.Second)
}

func TestRoundTripEndpoints(t *testing.T) {
	dir := testKeys(t)
	data := testData(3*ChunkSize+100, 5)
	for name, pair := range endpoints {
		for _, c := range compressions {
			for _, e := range ciphers {
				for _, halt := range []bool{false, true} {
					t.Run(fmt.Sprintf("%s/%s/%s/halt=%v", name, c, e, halt), func(t *testing.T) {
						src, spec := pair(t)
						opt := opts(c, encryptOpt(dir, e, "k2.key"))
						ropt := ReaderOptions{KeyDir: dir}
						var got []byte
						var rerr error
						recvDone := make(chan struct{})
						if src != nil || name == "fifo" {
							go func() {
								defer close(recvDone)
								if src == nil {
									src, rerr = OpenSource(spec, SourceOptions{})
									if rerr != nil {
										return
									}
								}
								got, rerr = receive(src, ropt)
							}()
						}
						err := send(spec, data, opt, halt)
						if name == "fifo" && halt {
							// Nothing acknowledges a FIFO: AwaitReady
							// refuses and keeps the rest of the body.
							<-recvDone
							if !errors.Is(err, ErrNoProof) {
								t.Fatalf("send with a handshake to a FIFO: got %v, want ErrNoProof", err)
							}
							if rerr == nil {
								t.Fatal("the FIFO's reader got a whole snapshot that -halt refused")
							}
							return
						}
						if err != nil {
							t.Fatalf("send: %v", err)
						}
						if name == "file" {
							s, err := OpenSource(spec, SourceOptions{})
							if err != nil {
								t.Fatal(err)
							}
							got, rerr = receive(s, ropt)
						} else {
							<-recvDone
						}
						if rerr != nil {
							t.Fatalf("receive: %v", rerr)
						}
						if !bytes.Equal(got, data) {
							t.Fatalf("got %d bytes, want %d (content differs)", len(got), len(data))
						}
					})
				}
			}
		}
	}
}

func TestEndpointSpecs(t *testing.T) {
	for _, spec := range []string{"udp:127.0.0.1:9", "UDP:1234", "udp6:[::1]:9"} {
		_, err := OpenSink(spec, SinkOptions{})
		if err == nil || !errors.Is(err, ErrUDP) || strings.Contains(err.Error(), "\n") {
			t.Errorf("OpenSink(%s): got %v, want one line refusing udp", spec, err)
		}
		_, err = OpenSource(spec, SourceOptions{})
		if err == nil || !errors.Is(err, ErrUDP) {
			t.Errorf("OpenSource(%s): got %v, want ErrUDP", spec, err)
		}
	}
	for _, spec := range []string{"tcp:0", "tcp::0", "tcp:0.0.0.0:0"} {
		_, err := OpenSource(spec, SourceOptions{})
		if err == nil || !strings.Contains(err.Error(), "refusing to listen beyond loopback") || !errors.Is(err, ErrListenBeyondLoopback) {
			t.Errorf("OpenSource(%s) without keys: got %v, want a refusal", spec, err)
		}
		if err != nil && flagHint.MatchString(err.Error()) {
			t.Errorf("OpenSource(%s): %q names a command-line flag: only the CLI adds those", spec, err)
		}
		var warn bytes.Buffer
		src, err := OpenSource(spec, SourceOptions{Insecure: true, Warn: &warn})
		if err != nil {
			t.Fatalf("OpenSource(%s, insecure): %v", spec, err)
		}
		src.Close()
		if !strings.HasPrefix(warn.String(), "warning: ") || strings.Count(warn.String(), "\n") != 1 {
			t.Errorf("insecure listener: warning %q, want one line", warn.String())
		}
		src, err = OpenSource(spec, SourceOptions{HaveKeys: true})
		if err != nil {
			t.Fatalf("OpenSource(%s, keys): %v", spec, err)
		}
		src.Close()
	}
	for _, spec := range []string{"tcp:127.0.0.1:0", "tcp:localhost:0", "tcp:[::1]:0"} {
		src, err := OpenSource(spec, SourceOptions{})
		if err != nil {
			if strings.Contains(spec, "::1") {
				continue // no IPv6 loopback here
			}
			t.Errorf("OpenSource(%s): %v", spec, err)
			continue
		}
		src.Close()
	}
	if _, err := OpenSink("tcp:", SinkOptions{}); err == nil {
		t.Error("OpenSink(tcp:) accepted")
	}
	_, err := OpenSource(filepath.Join(t.TempDir(), "missing"), SourceOptions{})
	if err == nil || !strings.HasPrefix(err.Error(), "stream: open source ") {
		t.Errorf("missing file: got %v", err)
	}
}

// A listener that needs keys refuses a plaintext snapshot even if the
// caller forgot RequireEncryption.
func TestNonLoopbackRefusesPlaintext(t *testing.T) {
	src, err := OpenSource("tcp:0", SourceOptions{HaveKeys: true, ReadTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	_, port, _ := net.SplitHostPort(src.Addr())
	go send("tcp:127.0.0.1:"+port, []byte("hello"), Options{}, false)
	_, err = receive(src, ReaderOptions{KeyDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "refusing plaintext") {
		t.Errorf("got %v, want plaintext refused", err)
	}
}

func TestFileSinkAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "snap")
	sink, err := OpenSink(p, SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, _ := NewWriter(sink, opts("zstd", ""))
	w.Write([]byte("records"))
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("snapshot visible before it is complete: %v", err)
	}
	w.Close()
	if err := sink.AwaitReady(time.Second); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("after AwaitReady: %v, mode %v; want the file, 0600", err, fi.Mode())
	}
	if err := sink.Commit(); err != nil {
		t.Error(err)
	}
	if err := sink.Close(); err != nil {
		t.Error(err)
	}
	// An unfinished body is not kept.
	p2 := filepath.Join(dir, "snap2")
	sink, _ = OpenSink(p2, SinkOptions{})
	w, _ = NewWriter(sink, Options{})
	w.Write([]byte("half"))
	if err := sink.Close(); err == nil {
		t.Error("closing a sink with an unfinished body: no error")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want only the finished snapshot", len(ents))
	}
}

// TestFileSinkUnnamed: while a snapshot is written nothing of it has a
// name in the directory (an O_TMPFILE, which the kernel frees if the
// writer is killed); a finished one replaces an existing file; after
// Abort, from another goroutine, writes fail and nothing is kept.
func TestFileSinkUnnamed(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "snap")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	sink, err := OpenSink(p, SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, _ := NewWriter(sink, Options{})
	if _, err := w.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("directory holds %d entries while the snapshot is written, want only the old file", len(ents))
	}
	w.Close()
	if err := sink.AwaitReady(time.Second); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) == "old" {
		t.Fatalf("after AwaitReady: %v; want the new snapshot in place of the old file", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("directory holds %d entries, want only the snapshot", len(ents))
	}

	p2 := filepath.Join(dir, "snap2")
	sink, err = OpenSink(p2, SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, _ = NewWriter(sink, Options{})
	w.Write([]byte("half"))
	done := make(chan struct{})
	go func() {
		sink.Abort()
		close(done)
	}()
	<-done
	if _, err := w.Write(make([]byte, 1<<20)); !errors.Is(err, ErrAborted) {
		t.Errorf("write after Abort: got %v, want ErrAborted", err)
	}
	w.Close()
	if err := sink.AwaitReady(time.Second); !errors.Is(err, ErrAborted) {
		t.Errorf("AwaitReady after Abort: got %v, want ErrAborted", err)
	}
	if _, err := os.Stat(p2); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("aborted snapshot kept: %v", err)
	}
}

func TestUnixStaleSocket(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenSource("unix:"+p, SourceOptions{}); err == nil {
		t.Error("listened on a socket another process listens on")
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	src, err := OpenSource("unix:"+p, SourceOptions{})
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	src.Close()
	if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after Close: %v", err)
	}
	os.WriteFile(p, nil, 0o600)
	if _, err := OpenSource("unix:"+p, SourceOptions{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file in the way: got %v", err)
	}
}

func TestSourceReadTimeout(t *testing.T) {
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	c, err := net.Dial("tcp", src.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(wireHello))
	start := time.Now()
	_, _, err = NewReader(src, ReaderOptions{})
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("got %v, want a timeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("timeout took %v", d)
	}
}

func TestSourceGarbageSender(t *testing.T) {
	// A sender that greets and then sends bad frames fails the stream.
	for _, msg := range []string{wireHello + "X\x00\x00\x00\x01z", wireHello + "D\xff\xff\xff\xff"} {
		src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", src.Addr())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(msg))
		_, _, err = NewReader(src, ReaderOptions{})
		if err == nil || strings.Contains(err.Error(), "\n") {
			t.Errorf("sender %q: got %v, want one error line", msg, err)
		}
		c.Close()
		src.Close()
	}
}

// A connection that does not greet (a port scanner, an HTTP client, one
// that stays silent) is dropped with a warning line, and takes nothing
// from the real sender.
func TestSourceDropsNonSenders(t *testing.T) {
	var warn syncBuffer
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 10 * time.Second, Warn: &warn})
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
	c, err := net.Dial("tcp", src.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	waitWarning(t, &warn, "dropped a connection from "+c.LocalAddr().String()+": not a pcluster sender (bad greeting); still listening")
	silent, err := net.Dial("tcp", src.Addr()) // says nothing
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	data := testData(3*ChunkSize, 4)
	if err := send("tcp:"+src.Addr(), data, Options{}, true); err != nil {
		t.Fatalf("the real sender after two others: %v (warnings: %q)", err, warn.String())
	}
	if b, err := <-got, <-errc; err != nil || !bytes.Equal(b, data) {
		t.Fatalf("received %d bytes, %v", len(b), err)
	}
	w := warn.String()
	if strings.Count(w, "dropped a connection") != 1 || strings.Count(w, "\n") != 2 ||
		!strings.Contains(w, "closed 1 other connection(s) that had not greeted") {
		t.Errorf("warnings %q, want the bad greeting dropped and the silent one closed when the sender was taken", w)
	}
}

// waitWarning waits until w holds line: a condition, not a delay.
func waitWarning(t *testing.T, w *syncBuffer, line string) {
	t.Helper()
	for i := 0; !strings.Contains(w.String(), line); i++ {
		if i == 1000 {
			t.Fatalf("warnings %q, want %q", w.String(), line)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Close from another goroutine ends a pending accept.
func TestSourceCloseUnblocksAccept(t *testing.T) {
	src, err := OpenSource("unix:"+filepath.Join(t.TempDir(), "s"), SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() {
		_, err := src.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	src.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Error("read after close succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Accept")
	}
}

// A listener that is not pthaw (nc -l) never greets: the sink says so.
func TestSinkNeedsGreeting(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	_, err = OpenSink("tcp:"+ln.Addr().String(), SinkOptions{DialTimeout: 200 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "connected to "+ln.Addr().String()+", but no greeting came back within 200ms") {
		t.Errorf("got %v, want no greeting", err)
	}
}

// A listener takes one sender and stops listening.
func TestSourceAcceptsOne(t *testing.T) {
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	addr := src.Addr()
	go send("tcp:"+addr, []byte("records"), Options{}, false)
	if got, err := receive(src, ReaderOptions{}); err != nil || string(got) != "records" {
		t.Fatalf("got %q, %v", got, err)
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("a second sender could connect")
	}
}

// The read timeout bounds a stall, not the transfer: a slow but steady
// sender is not cut off.
func TestSourceReadTimeoutExtended(t *testing.T) {
	src, err := OpenSource("unix:"+filepath.Join(t.TempDir(), "s"), SourceOptions{ReadTimeout: 150 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	go func() {
		sink, err := OpenSink("unix:"+src.Addr(), SinkOptions{})
		if err != nil {
			return
		}
		defer sink.Close()
		w, _ := NewWriter(sink, Options{})
		for i := 0; i < 8; i++ { // 8 × 50 ms: longer than the timeout in total
			w.Write([]byte("x"))
			sink.(*netSink).flush()
			time.Sleep(50 * time.Millisecond)
		}
		w.Close()
	}()
	got, err := receive(src, ReaderOptions{})
	if err != nil || string(got) != "xxxxxxxx" {
		t.Errorf("got %q, %v; want a slow stream received whole", got, err)
	}
}
