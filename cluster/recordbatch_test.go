package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/pki"
	"golang.org/x/sys/unix"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// batchedPair returns a batchedTLS client over a counted TCP connection on
// loopback and the server's end of it, both with the cluster's mutual TLS.
func batchedPair(t testing.TB) (*batchedTLS, *countingConn, *tls.Conn) {
	t.Helper()
	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	ca, err := key.CA()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Issue("node", net.IPv4(127, 0, 0, 1))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		s := tls.Server(c, ca.ServerTLS(cert))
		if err := s.Handshake(); err != nil {
			c.Close()
			accepted <- nil
			return
		}
		accepted <- s
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingConn{Conn: raw}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := dialBatchedTLS(ctx, counted, ca.ClientTLS(cert))
	s := <-accepted
	if err != nil || s == nil {
		t.Fatalf("handshake: client %v, server end %v", err, s)
	}
	t.Cleanup(func() {
		c.Close()
		s.Close()
	})
	return c, counted, s
}

// TestBatchedTLSWritesOnce: a 1 MiB Write, 64 TLS records, leaves in one
// write(2); a frame header's 5 bytes leave with the Write after them; the
// peer reads exactly what was written; a Close after it ends the stream
// cleanly (close_notify after the data).
func TestBatchedTLSWritesOnce(t *testing.T) {
	c, counted, s := batchedPair(t)
	msg := make([]byte, 1<<20)
	rand.Read(msg)
	got := make(chan []byte, 1)
	go func() {
		b, err := io.ReadAll(s)
		if err != nil {
			t.Errorf("server read: %v", err)
		}
		got <- b
	}()
	var want []byte
	for i := range 3 {
		before := counted.writes.Load()
		if n, err := c.Write([]byte("hdr")); err != nil || n != 3 {
			t.Fatalf("write %d's header: %d, %v; want 3, nil", i, n, err)
		}
		n, err := c.Write(msg)
		if err != nil || n != len(msg) {
			t.Fatalf("write %d: %d, %v; want %d, nil", i, n, err, len(msg))
		}
		if w := counted.writes.Load() - before; w != 1 {
			t.Errorf("write %d of 3 bytes and 1 MiB: %d writes to the socket, want 1", i, w)
		}
		want = append(append(want, "hdr"...), msg...)
	}
	if _, err := c.Write([]byte("end")); err != nil {
		t.Fatal(err)
	}
	want = append(want, "end"...)
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	b := <-got
	if !bytes.Equal(b, want) {
		t.Fatalf("server read %d bytes, want the %d written", len(b), len(want))
	}
}

// TestBatchedTLSHeldLeaves: a short Write held leaves before a Read (the
// stream's handshake: a frame, then the wait for the answer to it) and,
// with nothing after it, on its own.
func TestBatchedTLSHeldLeaves(t *testing.T) {
	c, _, s := batchedPair(t)
	go func() {
		// An echo of each 4-byte message.
		var b [4]byte
		for {
			if _, err := io.ReadFull(s, b[:]); err != nil {
				return
			}
			if _, err := s.Write(b[:]); err != nil {
				return
			}
		}
	}()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	c.wait = time.Hour // only the Read sends these
	for _, m := range []string{"ping", "pong"} {
		if _, err := c.Write([]byte(m)); err != nil {
			t.Fatal(err)
		}
		var b [4]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || string(b[:]) != m {
			t.Fatalf("echo of %q: %q, %v", m, b[:], err)
		}
	}
	// Nothing read after it: the timer sends it, and the echo comes.
	c.wait = holdFor
	if _, err := c.Write([]byte("last")); err != nil {
		t.Fatal(err)
	}
	var b [4]byte
	if _, err := io.ReadFull(c.Conn, b[:]); err != nil || string(b[:]) != "last" {
		t.Fatalf("echo of a held write nothing followed: %q, %v", b[:], err)
	}
}

// TestBatchedTLSWriteFailSticks: once a gathered write fails, the Write
// reports it (none of it written) and so does every later one, even when
// the socket would take them: the peer must never see records after a gap.
func TestBatchedTLSWriteFailSticks(t *testing.T) {
	c, _, _ := batchedPair(t)
	c.SetWriteDeadline(time.Unix(1, 0))
	if n, err := c.Write(make([]byte, 64<<10)); err == nil || n != 0 {
		t.Fatalf("write past the deadline: %d, %v; want 0 and an error", n, err)
	}
	c.SetWriteDeadline(time.Time{})
	if _, err := c.Write([]byte("more")); err == nil {
		t.Fatal("write after a failed one: no error")
	}
}

// BenchmarkTransferTLS sends 64 MiB as the stream's sink writes it (each
// 64 KiB block after its 5-byte frame header) over mutual TLS on loopback:
// through a plain tls.Conn (a write(2) per record and per header, as
// before batchedTLS) and through batchedTLS, in the same run. It reports
// MB/s and each end's CPU time per GiB (each end on a thread of its own).
func BenchmarkTransferTLS(b *testing.B) {
	const total = 64 << 20
	block := make([]byte, 64<<10+8)
	rand.Read(block)
	hdr := []byte{'D', 0, 1, 0, 8}
	for _, batched := range []bool{false, true} {
		name := map[bool]string{false: "plain", true: "batched"}[batched]
		b.Run(name, func(b *testing.B) {
			c, _, s := batchedPair(b)
			var w io.Writer = c
			if !batched {
				w = c.Conn // the tls.Conn over the same socket, unbatched
			}
			type usage struct{ usr, sys time.Duration }
			done := make(chan usage, 1)
			go func() {
				runtime.LockOSThread()
				u0 := threadUsage()
				io.Copy(io.Discard, s)
				u1 := threadUsage()
				done <- usage{u1.usr - u0.usr, u1.sys - u0.sys}
			}()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			b.SetBytes(total)
			b.ResetTimer()
			u0 := threadUsage()
			for range b.N {
				for sent := 0; sent < total; sent += len(block) {
					if _, err := w.Write(hdr); err != nil {
						b.Fatal(err)
					}
					if _, err := w.Write(block); err != nil {
						b.Fatal(err)
					}
				}
			}
			u1 := threadUsage()
			b.StopTimer()
			c.Close()
			r := <-done
			gib := float64(b.N) * total / (1 << 30)
			b.ReportMetric((u1.usr-u0.usr).Seconds()/gib, "send-usr-s/GiB")
			b.ReportMetric((u1.sys-u0.sys).Seconds()/gib, "send-sys-s/GiB")
			b.ReportMetric(r.usr.Seconds()/gib, "recv-usr-s/GiB")
			b.ReportMetric(r.sys.Seconds()/gib, "recv-sys-s/GiB")
		})
	}
}

// threadUsage is the calling thread's user and system time.
func threadUsage() (u struct{ usr, sys time.Duration }) {
	var ru syscall.Rusage
	syscall.Getrusage(unix.RUSAGE_THREAD, &ru)
	u.usr = time.Duration(ru.Utime.Nano())
	u.sys = time.Duration(ru.Stime.Nano())
	return u
}
