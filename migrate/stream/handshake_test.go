package stream

import (
	"bytes"
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// listenLoopback opens a receiver on 127.0.0.1.
func listenLoopback(t *testing.T, rt time.Duration) Source {
	t.Helper()
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: rt})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// goSender runs a sender in a goroutine that the test joins at cleanup,
// after closing src (which ends any wait of the sender's).
func goSender(t *testing.T, src Source, fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	t.Cleanup(func() {
		src.Close()
		<-done
	})
}

// startSend writes a snapshot to src and returns the sink, with the body
// closed, for the caller to run the sender's side of the handshake. The
// caller closes the sink.
func startSend(_ *testing.T, addr string, data []byte, opt Options) (Sink, error) {
	sink, err := OpenSink("tcp:"+addr, SinkOptions{DialTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second})
	if err != nil {
		return nil, err
	}
	w, err := NewWriter(sink, opt)
	if err != nil {
		return sink, err
	}
	if _, err := w.Write(data); err != nil {
		return sink, err
	}
	return sink, w.Close()
}

func readAllFrom(src io.Reader, opt ReaderOptions) ([]byte, error) {
	r, _, err := NewReader(src, opt)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

func TestHandshakeCommit(t *testing.T) {
	dir := testKeys(t)
	for _, e := range ciphers {
		t.Run(e, func(t *testing.T) {
			src := listenLoopback(t, 5*time.Second)
			data := testData(200000, 9)
			var sendErr, readyErr, commitErr error
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				sink, err := startSend(t, src.Addr(), data, opts("snappy", encryptOpt(dir, e, "k1.key")))
				if sink != nil {
					defer sink.Close()
				}
				if err != nil {
					sendErr = err
					return
				}
				if readyErr = sink.AwaitReady(5 * time.Second); readyErr != nil {
					return
				}
				// Here pfreeze kills the original.
				commitErr = sink.Commit()
			}()
			got, err := readAllFrom(src, ReaderOptions{KeyDir: dir})
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("receive: %v (%d bytes)", err, len(got))
			}
			if err := src.Ready(nil); err != nil {
				t.Fatal(err)
			}
			if err := src.AwaitCommit(5 * time.Second); err != nil {
				t.Fatalf("AwaitCommit: %v", err)
			}
			wg.Wait()
			if sendErr != nil || readyErr != nil || commitErr != nil {
				t.Fatalf("sender: send %v, ready %v, commit %v", sendErr, readyErr, commitErr)
			}
		})
	}
}

func TestHandshakeReceiverFails(t *testing.T) {
	dir := testKeys(t)
	src := listenLoopback(t, 5*time.Second)
	done := make(chan error)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), []byte("records"), opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
		if sink != nil {
			defer sink.Close()
		}
		if err == nil {
			err = sink.AwaitReady(5 * time.Second)
		}
		done <- err
	})
	if _, err := readAllFrom(src, ReaderOptions{KeyDir: dir}); err != nil {
		t.Fatal(err)
	}
	src.Ready(errors.New("thaw: map 0x7f12-0x7f34 (libc.so.6): operation not permitted"))
	err := <-done
	if err == nil || !strings.Contains(err.Error(), "receiver failed: thaw: map 0x7f12-0x7f34 (libc.so.6): operation not permitted") {
		t.Errorf("sender got %v, want the receiver's reason", err)
	}
}

// A sender whose stream a keyed receiver cannot authenticate learns only
// that it was refused: not the receiver's key directory, nor which key
// names or ids exist there. (A plaintext sender reads the unauthenticated
// reason; an attacker's own client would read it whatever it sent.)
func TestHandshakeRefusalTellsNoDetails(t *testing.T) {
	dir := testKeys(t)
	src, err := OpenSource("tcp:127.0.0.1:0", SourceOptions{ReadTimeout: 5 * time.Second, HaveKeys: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	done := make(chan error)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), []byte("records"), Options{})
		if sink != nil {
			defer sink.Close()
		}
		if err == nil {
			err = sink.AwaitReady(5 * time.Second)
		}
		done <- err
	})
	if _, err := readAllFrom(src, ReaderOptions{KeyDir: dir, RequireEncryption: true}); err == nil {
		t.Fatal("a keyed receiver accepted plaintext")
	}
	src.Ready(errors.New("no key named k9.key or with id 0123456789abcdef in " + dir))
	err = <-done
	if err == nil || !strings.Contains(err.Error(), "not encrypted with a key this receiver holds") || strings.Contains(err.Error(), dir) {
		t.Errorf("sender got %v, want a refusal without the receiver's details", err)
	}
}

func TestHandshakeReceiverDiesMidStream(t *testing.T) {
	dir := testKeys(t)
	src := listenLoopback(t, 5*time.Second)
	done := make(chan error)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), testData(32<<20, 1), opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
		if sink != nil {
			defer sink.Close()
		}
		if err == nil {
			err = sink.AwaitReady(5 * time.Second)
		}
		done <- err
	})
	r, _, err := NewReader(src, ReaderOptions{KeyDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	io.CopyN(io.Discard, r, 100000)
	src.Close() // the receiver dies
	select {
	case err := <-done:
		if err == nil {
			t.Error("sender saw no error although the receiver died mid-stream")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("sender still waiting 10s after the receiver died")
	}
}

func TestHandshakeSenderDiesMidStream(t *testing.T) {
	src := listenLoopback(t, 5*time.Second)
	go func() {
		sink, err := OpenSink("tcp:"+src.Addr(), SinkOptions{})
		if err != nil {
			return
		}
		w, _ := NewWriter(sink, Options{})
		w.Write(testData(1<<20, 1))
		sink.(*netSink).flush()
		sink.(*netSink).conn.Close() // the sender dies
	}()
	_, err := readAllFrom(src, ReaderOptions{})
	if !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), "before the end of the stream") {
		t.Errorf("got %v, want a truncated-stream error", err)
	}
	if err := src.Ready(nil); err == nil {
		t.Error("Ready(nil) accepted after a broken stream")
	}
	if err := src.AwaitCommit(time.Second); err == nil {
		t.Error("AwaitCommit accepted after a broken stream")
	}
}

// The sender gives up after Ready (say it could not kill the original): the
// receiver must not start the clone.
func TestHandshakeNoCommit(t *testing.T) {
	src := listenLoopback(t, 5*time.Second)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), []byte("records"), Options{})
		if sink != nil {
			defer sink.Close()
		}
		if err == nil && sink.AwaitReady(5*time.Second) == nil {
			sink.Close()
		}
	})
	if _, err := readAllFrom(src, ReaderOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := src.Ready(nil); err != nil {
		t.Fatal(err)
	}
	if err := src.AwaitCommit(5 * time.Second); err == nil || !strings.Contains(err.Error(), "without committing") {
		t.Errorf("got %v, want no commit", err)
	}
}

func TestHandshakeTimeouts(t *testing.T) {
	src := listenLoopback(t, 300*time.Millisecond)
	sinkc := make(chan Sink, 1)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), []byte("records"), Options{})
		if err != nil {
			if sink != nil {
				sink.Close()
			}
			close(sinkc)
			return
		}
		sinkc <- sink // the test goroutine owns it now
	})
	if _, err := readAllFrom(src, ReaderOptions{}); err == nil {
		t.Error("body read without its end frame")
	}
	sink := <-sinkc
	if sink == nil {
		t.Fatal("send failed")
	}
	defer sink.Close()
	// The receiver is stuck (never calls Ready): the sender times out.
	start := time.Now()
	err := sink.AwaitReady(200 * time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("AwaitReady: got %v, want a timeout", err)
	}
	if time.Since(start) > 3*time.Second {
		t.Errorf("AwaitReady took %v", time.Since(start))
	}
	if err := sink.Commit(); err == nil {
		t.Error("Commit after a failed AwaitReady succeeded")
	}
}

func TestHandshakeCommitTimeout(t *testing.T) {
	src := listenLoopback(t, 5*time.Second)
	hold := make(chan struct{})
	defer close(hold)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), []byte("records"), Options{})
		if sink != nil {
			defer sink.Close()
		}
		if err == nil && sink.AwaitReady(5*time.Second) == nil {
			<-hold // the sender hangs before committing
		}
	})
	if _, err := readAllFrom(src, ReaderOptions{}); err != nil {
		t.Fatal(err)
	}
	src.Ready(nil)
	err := src.AwaitCommit(200 * time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("AwaitCommit: got %v, want a timeout", err)
	}
}

// frame builds a wire frame.
func frame(typ byte, payload ...[]byte) []byte {
	var b bytes.Buffer
	writeFrame(&b, typ, payload...)
	return b.Bytes()
}

// fakeReceiver accepts one sender, reads up to the E frame and answers with
// reply.
func fakeReceiver(t *testing.T, reply []byte) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.ReadFull(c, make([]byte, len(wireHello)))
		c.Write(append([]byte(wireHello), make([]byte, hsNonceSize)...))
		for {
			var h [frameHeaderSize]byte
			if _, err := io.ReadFull(c, h[:]); err != nil {
				return
			}
			io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(h[1:])))
			if h[0] == frameEnd {
				break
			}
		}
		if reply != nil {
			c.Write(reply)
			io.Copy(io.Discard, c)
		}
	}()
	return ln.Addr().String()
}

func TestHandshakeForgedReady(t *testing.T) {
	dir := testKeys(t)
	nonce := make([]byte, hsNonceSize)
	forged := map[string][]byte{
		"unauthenticated":   frame(frameReady, []byte{statusBuilt}, nonce),
		"random mac":        frame(frameReady, []byte{statusBuilt}, nonce, bytes.Repeat([]byte{0x5a}, macSize)),
		"mac under no key":  frame(frameReady, []byte{statusBuilt}, nonce, wireMAC(nil, "ready", append([]byte{statusBuilt}, nonce...))),
		"a commit frame":    frame(frameCommit, make([]byte, macSize)),
		"oversized":         frame(frameReady, make([]byte, 4000)),
		"closed, no answer": nil,
	}
	for name, reply := range forged {
		t.Run(name, func(t *testing.T) {
			addr := fakeReceiver(t, reply)
			sink, err := startSend(t, addr, []byte("records"), opts("", encryptOpt(dir, CipherChaCha20, "k1.key")))
			if sink != nil {
				defer sink.Close()
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := sink.AwaitReady(2 * time.Second); err == nil {
				t.Fatalf("forged ready accepted: the sender would kill the original")
			}
			if err := sink.Commit(); err == nil {
				t.Error("Commit after a forged ready succeeded")
			}
		})
	}
}

// recordingProxy forwards one connection to target and records what the
// sender sent. mangle may alter sender bytes in flight.
func recordingProxy(t *testing.T, target string, mangle func([]byte)) (addr string, rec func() []byte) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var mu sync.Mutex
	var buf bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		u, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer u.Close()
		go func() { io.Copy(c, u); c.Close() }()
		p := make([]byte, 64<<10)
		for {
			n, err := c.Read(p)
			if n > 0 {
				mu.Lock()
				buf.Write(p[:n])
				all := bytes.Clone(buf.Bytes())
				mu.Unlock()
				if mangle != nil {
					mangle(all)
				}
				u.Write(all[len(all)-n:])
			}
			if err != nil {
				u.(*net.TCPConn).CloseWrite()
				return
			}
		}
	}()
	return ln.Addr().String(), func() []byte {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return bytes.Clone(buf.Bytes())
	}
}

// An attacker who recorded a whole migration replays it to a listening
// receiver: the stream is genuine, but its header names the nonce of the
// first receiver's greeting (peer=), so the new receiver refuses it before
// building anything, with or without -halt.
func TestHandshakeReplayedStream(t *testing.T) {
	dir := testKeys(t)
	for _, halt := range []bool{false, true} {
		src := listenLoopback(t, 5*time.Second)
		addr, rec := recordingProxy(t, src.Addr(), nil)
		go send("tcp:"+addr, []byte("records"), opts("", encryptOpt(dir, CipherAESGCM, "k1.key")), halt)
		if _, err := receive(src, ReaderOptions{KeyDir: dir}); err != nil {
			t.Fatalf("genuine stream: %v", err)
		}
		recorded := rec()

		src2 := listenLoopback(t, 5*time.Second)
		c, err := net.Dial("tcp", src2.Addr())
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c.Write(recorded)
			io.Copy(io.Discard, c)
		}()
		_, err = readAllFrom(src2, ReaderOptions{KeyDir: dir})
		if err == nil || !strings.Contains(err.Error(), "not sent for this connection") {
			t.Errorf("halt=%v: replayed stream: got %v, want it refused", halt, err)
		}
		if err := src2.Ready(nil); err == nil {
			t.Errorf("halt=%v: Ready after a replayed stream succeeded", halt)
		}
		c.Close()
	}
}

// nonceBuffer collects a stream written as if for a network receiver that
// greeted with nonce.
type nonceBuffer struct {
	bytes.Buffer
	nonce []byte
}

func (b *nonceBuffer) peerNonce() []byte { return b.nonce }

// The same recorded stream, its framing stripped, fed to a file or pipe
// source (pthaw -src FILE, or stdin): refused, since its header says it
// was sent to a network receiver.
func TestReplayedStreamFromFile(t *testing.T) {
	dir := testKeys(t)
	for _, enc := range []string{CipherNone, CipherAESGCM} {
		b := &nonceBuffer{nonce: bytes.Repeat([]byte{7}, hsNonceSize)}
		w, err := NewWriter(b, opts("", encryptOpt(dir, enc, "k1.key")))
		if err != nil {
			t.Fatal(err)
		}
		w.Write([]byte("records"))
		w.Close()
		_, _, err = NewReader(bytes.NewReader(b.Bytes()), ReaderOptions{KeyDir: dir})
		if err == nil || !strings.Contains(err.Error(), "sent to a network receiver") {
			t.Errorf("%s: stream for a network receiver read from a file: %v, want it refused", enc, err)
		}
	}
}

// A commit is bound to the nonce of this receiver's ready message.
func TestHandshakeCommitBoundToNonce(t *testing.T) {
	k := []byte("handshake key of one stream.....")
	n1, n2 := bytes.Repeat([]byte{1}, hsNonceSize), bytes.Repeat([]byte{2}, hsNonceSize)
	if hmac.Equal(wireMAC(k, "commit", n1), wireMAC(k, "commit", n2)) {
		t.Error("a commit for one nonce verifies for another")
	}
	if hmac.Equal(wireMAC(k, "commit", n1), wireMAC(k, "ack", n1)) {
		t.Error("a commit can be reflected as an ack")
	}
}

// Flipping the end frame's handshake flag (asking the receiver to start at
// once while the sender waits, which would leave two copies running) is
// detected.
func TestHandshakeForgedEnd(t *testing.T) {
	dir := testKeys(t)
	src := listenLoopback(t, 5*time.Second)
	// The E frame is the last 5+1+32 bytes the sender sends before waiting.
	flipped := false
	addr, _ := recordingProxy(t, src.Addr(), func(all []byte) {
		n := len(all) - (frameHeaderSize + 1 + macSize)
		if !flipped && n > 0 && all[n] == frameEnd && all[n+frameHeaderSize] == 1 {
			all[n+frameHeaderSize] = 0
			flipped = true
		}
	})
	goSender(t, src, func() {
		sink, err := startSend(t, addr, []byte("records"), opts("", encryptOpt(dir, CipherAESGCM, "k1.key")))
		if sink != nil {
			defer sink.Close()
		}
		if err == nil {
			sink.AwaitReady(3 * time.Second)
		}
	})
	_, err := readAllFrom(src, ReaderOptions{KeyDir: dir})
	if !flipped {
		t.Skip("the end frame did not arrive in one piece; nothing was flipped")
	}
	if err == nil || !strings.Contains(err.Error(), "end-of-stream message failed authentication") {
		t.Errorf("got %v, want the forged end refused", err)
	}
}

// Files and stdout have no handshake: -halt means "kill once written".
func TestHandshakeFileNoop(t *testing.T) {
	p := filepath.Join(t.TempDir(), "snap")
	os.WriteFile(p, nil, 0o600)
	src, err := OpenSource(p, SourceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.Ready(nil); err != nil {
		t.Error(err)
	}
	if err := src.AwaitCommit(time.Millisecond); err != nil {
		t.Error(err)
	}
}

// Ready(nil) is refused until the body was read to io.EOF: stopping at the
// end record is not enough, the last chunk and the end frame must verify.
func TestReadyNeedsEOF(t *testing.T) {
	src := listenLoopback(t, 5*time.Second)
	goSender(t, src, func() {
		sink, err := startSend(t, src.Addr(), []byte("records end-record"), Options{})
		if sink != nil {
			defer sink.Close()
		}
		if err == nil {
			sink.AwaitReady(5 * time.Second)
		}
	})
	r, _, err := NewReader(src, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	io.ReadFull(r, make([]byte, len("records end-record")))
	if err := src.Ready(nil); err == nil || !strings.Contains(err.Error(), "read the body to io.EOF") {
		t.Errorf("Ready before EOF: got %v", err)
	}
}
