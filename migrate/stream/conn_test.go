package stream

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// connSend writes data through a conn sink and runs the sender's side of
// the handshake: AwaitReady, then Commit.
func connSend(conn net.Conn, data []byte, opt Options, sopt SinkOptions) error {
	sink, err := NewConnSink(context.Background(), conn, sopt)
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
	if err := sink.AwaitReady(10 * time.Second); err != nil {
		return err
	}
	return sink.Commit()
}

// connReceive reads a stream from a conn source and runs the receiver's
// side of the handshake: Ready(nil), then AwaitCommit.
func connReceive(conn net.Conn, ropt ReaderOptions, sopt SourceOptions) ([]byte, error) {
	src, err := NewConnSource(context.Background(), conn, sopt)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	r, _, err := NewReader(src, ropt)
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

// TestConnHandshake runs a whole migration stream, the -halt handshake
// included, over a mutual-TLS connection the caller opened, as two cluster
// agents do: keys given as bytes on both sides, plaintext allowed because
// the connection is authenticated.
func TestConnHandshake(t *testing.T) {
	key := Key{Name: "cluster", Bytes: make([]byte, KeySize)}
	rand.Read(key.Bytes)
	data := testData(3*ChunkSize+77, 3)
	for _, tc := range []struct {
		name string
		opt  Options
		ropt ReaderOptions
	}{
		{"plaintext", Options{Codec: Codec{Name: CompressAuto}}, ReaderOptions{}},
		{"aes-gcm", Options{Codec: Codec{Name: CompressZstd, Level: 3}, Cipher: CipherAESGCM, Key: &key},
			ReaderOptions{Keys: []Key{{Name: "other", Bytes: make([]byte, KeySize)}, key}, RequireEncryption: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := fixture.TLSPair(t)
			errc := make(chan error, 1)
			go func() { errc <- connSend(c, data, tc.opt, SinkOptions{Authenticated: true, Halt: true}) }()
			got, rerr := connReceive(s, tc.ropt, SourceOptions{Authenticated: true, ReadTimeout: 10 * time.Second})
			serr := <-errc
			if rerr != nil || serr != nil {
				t.Fatalf("receiver: %v; sender: %v", rerr, serr)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("got %d bytes, want the %d sent", len(got), len(data))
			}
		})
	}
}

// TestConnWrongKeyBytes: a receiver without the sender's key refuses the
// stream, and the sender's handshake fails (so it would resume the
// original).
func TestConnWrongKeyBytes(t *testing.T) {
	key := Key{Name: "cluster", Bytes: make([]byte, KeySize)}
	other := Key{Name: "cluster", Bytes: make([]byte, KeySize)}
	rand.Read(key.Bytes)
	rand.Read(other.Bytes)
	c, s := fixture.TLSPair(t)
	errc := make(chan error, 1)
	go func() {
		errc <- connSend(c, testData(ChunkSize, 1), Options{Cipher: CipherChaCha20, Key: &key}, SinkOptions{Authenticated: true})
	}()
	_, rerr := connReceive(s, ReaderOptions{Keys: []Key{other}, RequireEncryption: true}, SourceOptions{Authenticated: true})
	serr := <-errc
	if rerr == nil || !strings.Contains(rerr.Error(), "none of the 1 given keys") {
		t.Errorf("receiver: got %v, want the key refused", rerr)
	}
	// The receiver gave up at the header: the sender sees its failure
	// or, when still writing, a broken connection; either way not ready.
	if serr == nil {
		t.Errorf("sender: got no error, want the receiver's failure")
	}
}

// flagHint matches a command-line flag in a message (" -insecure",
// "(-keydir)"): the library's errors name the object, the CLIs add flags.
var flagHint = regexp.MustCompile(`(^|[ (])-[a-z][a-z-]+\b`)

// farConn reports a peer beyond loopback, as a connection between two
// hosts does.
type farConn struct{ net.Conn }

func (farConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 9} }

// TestConnPlaintextNeedsTrust: without Authenticated, a connection the
// caller gave is held to the listener's and dialer's rules: an
// unencrypted stream to or from a peer beyond loopback is refused on both
// sides.
func TestConnPlaintextNeedsTrust(t *testing.T) {
	c, s := fixture.TLSPair(t)
	errc := make(chan error, 1)
	go func() { errc <- connSend(farConn{c}, []byte("records"), Options{}, SinkOptions{}) }()
	_, rerr := connReceive(farConn{s}, ReaderOptions{}, SourceOptions{})
	serr := <-errc
	if serr == nil || !strings.Contains(serr.Error(), "refusing to send an unencrypted snapshot beyond loopback") || !errors.Is(serr, ErrPlaintextBeyondLoopback) {
		t.Errorf("sender: got %v, want plaintext beyond loopback refused", serr)
	}
	if serr != nil && flagHint.MatchString(serr.Error()) {
		t.Errorf("sender: %q names a command-line flag: only the CLI adds those", serr)
	}
	if rerr == nil {
		t.Errorf("receiver: got no error, want the stream refused")
	}

	c, s = fixture.TLSPair(t)
	go func() { errc <- connSend(c, []byte("records"), Options{}, SinkOptions{Authenticated: true}) }()
	_, rerr = connReceive(farConn{s}, ReaderOptions{}, SourceOptions{})
	<-errc
	if rerr == nil || !strings.Contains(rerr.Error(), "refusing plaintext") {
		t.Errorf("receiver: got %v, want plaintext from beyond loopback refused", rerr)
	}

	// Said authenticated, the same peers exchange it.
	c, s = fixture.TLSPair(t)
	go func() { errc <- connSend(farConn{c}, []byte("records"), Options{}, SinkOptions{Authenticated: true}) }()
	got, rerr := connReceive(farConn{s}, ReaderOptions{}, SourceOptions{Authenticated: true})
	if serr := <-errc; rerr != nil || serr != nil || string(got) != "records" {
		t.Errorf("authenticated: got %q, receiver %v, sender %v; want the stream", got, rerr, serr)
	}
}

// TestConnGreetingCancelled: cancelling the context ends the wait for a
// peer that never greets, on either side, and closes the connection.
func TestConnGreetingCancelled(t *testing.T) {
	for _, side := range []string{"sink", "source"} {
		t.Run(side, func(t *testing.T) {
			c, s := fixture.TLSPair(t)
			go io.Copy(io.Discard, s) // a silent peer
			ctx, cancel := context.WithCancelCause(context.Background())
			errc := make(chan error, 1)
			go func() {
				var err error
				if side == "sink" {
					_, err = NewConnSink(ctx, c, SinkOptions{Authenticated: true})
				} else {
					_, err = NewConnSource(ctx, c, SourceOptions{Authenticated: true})
				}
				errc <- err
			}()
			cause := errors.New("agent shutting down")
			cancel(cause)
			err := <-errc
			if !errors.Is(err, cause) {
				t.Fatalf("got %v, want it to wrap %q", err, cause)
			}
			if _, werr := c.Write([]byte("x")); werr == nil {
				t.Errorf("the connection is still open after a failed greeting")
			}
		})
	}
}
