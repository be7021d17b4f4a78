package loader_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/tcplock"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// Sizes of the streams of TestMigrateTCP: the fixture writes tcpOut
// bytes to a peer that reads none of them until the move (most wait in
// the fixture's send queue), and the peer writes tcpIn bytes that the
// fixture reads only after that (they wait in its receive queue).
const (
	tcpOut = 4 << 20
	tcpIn  = 40000
)

// smallRcvbuf makes accepted connections advertise a small window, so a
// sender's bytes stay in the sender's queue.
func smallRcvbuf(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 4096) })
	return errors.Join(err, serr)
}

// tcpRow is a connection's line in /proc/net/tcp or tcp6.
type tcpRow struct {
	state  int // TCP_* as the kernel numbers them
	tx, rx int // bytes in the send and receive queue
}

// tcpConn finds the connection from local port port to remote port
// remote (0: any; a connection of an earlier test may linger in
// TIME_WAIT with the same local port).
func tcpConn(port, remote int) (tcpRow, bool) {
	for _, name := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 5 {
				continue
			}
			i := strings.LastIndexByte(f[1], ':')
			if p, err := strconv.ParseUint(f[1][i+1:], 16, 16); err != nil || int(p) != port {
				continue
			}
			j := strings.LastIndexByte(f[2], ':')
			if p, err := strconv.ParseUint(f[2][j+1:], 16, 16); remote != 0 && (err != nil || int(p) != remote) {
				continue
			}
			st, _ := strconv.ParseUint(f[3], 16, 8)
			tx, rx, _ := strings.Cut(f[4], ":")
			t, _ := strconv.ParseUint(tx, 16, 32)
			r, _ := strconv.ParseUint(rx, 16, 32)
			return tcpRow{int(st), int(t), int(r)}, true
		}
	}
	return tcpRow{}, false
}

// waitConn waits until the connection from local port to remote port
// (0: any) satisfies ok.
func waitConn(t *testing.T, port, remote int, what string, ok func(tcpRow) bool) {
	t.Helper()
	var last tcpRow
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		r, found := tcpConn(port, remote)
		if found && ok(r) {
			return
		}
		last = r
	}
	t.Fatalf("connection at port %d: %+v, want %s", port, last, what)
}

// pattern returns n bytes of the stream whose byte i is i % mod, from off.
func pattern(off, n, mod int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte((off + i) % mod)
	}
	return b
}

// readPattern reads n bytes of the stream i % mod from c.
func readPattern(c net.Conn, n, mod int) error {
	buf := make([]byte, 64<<10)
	for off := 0; off < n; {
		m, err := c.Read(buf[:min(len(buf), n-off)])
		for i := 0; i < m; i++ {
			if buf[i] != byte((off+i)%mod) {
				return fmt.Errorf("byte %d is %d, want %d", off+i, buf[i], (off+i)%mod)
			}
		}
		off += m
		if err != nil {
			return fmt.Errorf("after %d of %d bytes: %w", off, n, err)
		}
	}
	return nil
}

// tcpPair starts the fixture connected to a listener of the test on
// host (127.0.0.1 or ::1), writing tcpOut bytes and to read in; the
// test's end has written in bytes, all acknowledged, and the fixture's
// send queue is full.
func tcpPair(t *testing.T, host string, in int, extra ...string) (orig *fixture.Proc, pid int, conn *net.TCPConn) {
	lc := net.ListenConfig{Control: smallRcvbuf}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("listen on %s: %v", host, err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	orig, pid = fixture.StartUnderShell(t, fixture.Build(t, "tcpconn"), append([]string{"connect", host, strconv.Itoa(port), strconv.Itoa(tcpOut), strconv.Itoa(in)}, extra...)...)
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	conn = c.(*net.TCPConn)
	t.Cleanup(func() { conn.Close() })
	orig.Expect(t, `^connected$`, waitFor)
	if _, err := conn.Write(pattern(0, in, 253)); err != nil {
		t.Fatal(err)
	}
	fport := conn.RemoteAddr().(*net.TCPAddr).Port
	waitConn(t, fport, port, fmt.Sprintf("%d bytes received, 64 KiB and more waiting to go", in), func(r tcpRow) bool {
		return r.rx == in && r.tx >= 64<<10
	})
	// Our bytes acknowledged too: we have nothing to retransmit. From the
	// original's kill until the copy's connect nothing holds the
	// connection, and a packet of ours would draw a reset (docs/
	// pfreeze.md: the window without a socket).
	waitConn(t, port, fport, "everything we sent acknowledged", func(r tcpRow) bool { return r.tx == 0 })
	return orig, pid, conn
}

// finishPair checks the fixture's side of the stream: every byte it
// wrote arrives in order, it reads every byte of ours and answers "ok",
// and once we close our side it sees the end and exits: no reset, the
// same connection from start to end. out follows the fixture's output.
func finishPair(t *testing.T, conn *net.TCPConn, out *fixture.Lines) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(waitFor))
	if err := readPattern(conn, tcpOut, 251); err != nil {
		t.Fatalf("the fixture's stream: %v", err)
	}
	out.Expect(t, `^sent$`, waitFor)
	out.Expect(t, `^received$`, waitFor)
	ok := make([]byte, 2)
	if _, err := io.ReadFull(conn, ok); err != nil || string(ok) != "ok" {
		t.Fatalf("the fixture's answer: %q, %v", ok, err)
	}
	conn.CloseWrite()
	out.Expect(t, `^eof$`, waitFor)
	if n, err := conn.Read(ok); err != io.EOF {
		t.Fatalf("after the fixture's exit: read %d, %v, want the end of the stream", n, err)
	}
}

// TestMigrateTCP moves a process holding an established connection, over
// IPv4, IPv6 and IPv4 on an IPv6 socket (a v4-mapped address, as a
// dual-stack program has), on one host: megabytes it wrote wait in its
// send queue (the peer reads nothing), bytes it has not read wait in its
// receive queue. After the move every byte arrives in order both ways on
// the same connection, which then ends with a FIN, not a reset.
func TestMigrateTCP(t *testing.T) {
	needRoot(t)
	for _, host := range []string{"127.0.0.1", "::1", "::ffff:127.0.0.1"} {
		t.Run(host, func(t *testing.T) {
			orig, pid, conn := tcpPair(t, host, tcpIn)
			a := newAgents(t)
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer pr.Close()
			out := fixture.FollowReader(t, pr)
			var held []string
			sent := make(chan error, 1)
			go func() {
				sent <- a.sendTCP(a.srcConn, pid, capture.TCPOptions{Lock: true, Held: func(local, peer netip.AddrPort) {
					held = append(held, local.String()+" -> "+peer.String())
				}})
			}()
			p, rerr := a.receive(context.Background(), a.dstConn, pw)
			pw.Close()
			serr := <-sent
			if p != nil {
				defer reap(t, p)
			}
			if rerr != nil || serr != nil {
				t.Fatalf("target: %v; source: %v", rerr, serr)
			}
			if want := conn.RemoteAddr().String() + " -> " + conn.LocalAddr().String(); len(held) != 1 || held[0] != want {
				t.Errorf("connections held: %q, want [%q]", held, want)
			}
			select {
			case <-orig.Done():
			case <-time.After(waitFor):
				t.Fatal("the original still runs after the commit")
			}
			finishPair(t, conn, out)
		})
	}
}

// TestMigrateTCPDecisionFails: when the move is called off after the
// copy was built, the original resumes with its connection, which goes
// on as if nothing happened.
func TestMigrateTCPDecisionFails(t *testing.T) {
	needRoot(t)
	orig, pid, conn := tcpPair(t, "127.0.0.1", tcpIn)
	a := newAgents(t)
	sent := make(chan error, 1)
	go func() {
		sink, err := stream.NewConnSink(context.Background(), a.srcConn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
		if err == nil {
			err = capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true,
				Cipher: stream.CipherAESGCM, Key: &a.key, ReadyTimeout: waitFor, TCP: capture.TCPOptions{Lock: true},
				Decide: func() error { return errors.New("the scheduler changed its mind") }})
		}
		sent <- err
	}()
	p, rerr := a.receive(context.Background(), a.dstConn, nil)
	serr := <-sent
	if p != nil {
		reap(t, p)
		t.Fatalf("the target started pid %d", p.Pid())
	}
	if serr == nil || !strings.Contains(serr.Error(), "changed its mind") || rerr == nil {
		t.Fatalf("source: %v, want the decision's error; target: %v", serr, rerr)
	}
	if !alive(pid) {
		t.Fatal("the original is gone")
	}
	// The lock on the peer's packets went with the resume (else our
	// acknowledgements below would not reach the original).
	if names, err := tcplock.Locked(-1); err != nil || slices.Contains(names, tcplock.Name(netipOf(conn.RemoteAddr()), netipOf(conn.LocalAddr()))) {
		t.Errorf("after the resume: locks %q (%v), want not this connection's", names, err)
	}
	finishPair(t, conn, orig.Lines)
}

func netipOf(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

// freezeRefused freezes pid to a snapshot nobody reads, expecting a
// refusal that names all of want; the process runs on.
func freezeRefused(t *testing.T, pid int, want ...string) {
	t.Helper()
	a := newAgents(t)
	sent := make(chan error, 1)
	go func() { sent <- a.send(context.Background(), a.srcConn, pid, nil) }()
	p, _ := a.receive(context.Background(), a.dstConn, nil)
	serr := <-sent
	if p != nil {
		reap(t, p)
		t.Fatalf("the target started pid %d", p.Pid())
	}
	for _, w := range want {
		if serr == nil || !strings.Contains(serr.Error(), w) {
			t.Fatalf("source: %v, want a refusal naming %q", serr, w)
		}
	}
	if !alive(pid) {
		t.Fatal("the original is gone")
	}
}

// migrateTCP moves pid in this process (the -halt handshake), the copy's
// output going to the returned Lines; the copy is reaped at cleanup.
func migrateTCP(t *testing.T, pid int) *fixture.Lines {
	t.Helper()
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close() })
	out := fixture.FollowReader(t, pr)
	sent := make(chan error, 1)
	go func() { sent <- a.send(context.Background(), a.srcConn, pid, nil) }()
	p, rerr := a.receive(context.Background(), a.dstConn, pw)
	pw.Close()
	serr := <-sent
	if p != nil {
		t.Cleanup(func() { reap(t, p) })
	}
	if rerr != nil || serr != nil {
		t.Fatalf("target: %v; source: %v", rerr, serr)
	}
	return out
}

// TestMigrateTCPDup: a connection open on two fds (a dup) moves once and
// is again one socket on both.
func TestMigrateTCPDup(t *testing.T) {
	needRoot(t)
	_, pid, conn := tcpPair(t, "127.0.0.1", tcpIn, "dup")
	out := migrateTCP(t, pid)
	a, err3 := os.Readlink(fmt.Sprintf("/proc/%d/fd/3", pid))
	b, err4 := os.Readlink(fmt.Sprintf("/proc/%d/fd/4", pid))
	if err3 != nil || err4 != nil || a != b || !strings.HasPrefix(a, "socket:") {
		t.Errorf("the copy's fds 3 and 4: %q (%v), %q (%v); want one socket", a, err3, b, err4)
	}
	finishPair(t, conn, out)
}

// TestMigrateTCPCloseWait: a connection whose peer has closed its side
// (CLOSE_WAIT), with bytes unread before the peer's FIN, moves: the copy
// reads them, then the end of the stream, and its own side goes on.
func TestMigrateTCPCloseWait(t *testing.T) {
	needRoot(t)
	_, pid, conn := tcpPair(t, "127.0.0.1", tcpIn)
	conn.CloseWrite()
	waitConn(t, conn.RemoteAddr().(*net.TCPAddr).Port, conn.LocalAddr().(*net.TCPAddr).Port, "CLOSE_WAIT", func(r tcpRow) bool { return r.state == 8 })
	out := migrateTCP(t, pid)
	finishPair(t, conn, out)
}

// TestMigrateTCPFinWait2: a connection whose own side the process has
// closed, the peer having acknowledged (FIN_WAIT2), moves with the bytes
// the peer sent since: the copy reads them and then the end of the
// stream; the peer gets every byte and the end of the copy's side once.
func TestMigrateTCPFinWait2(t *testing.T) {
	needRoot(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const out = 10000
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "tcpconn"), "halfclose", "127.0.0.1", strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), strconv.Itoa(out), strconv.Itoa(tcpIn))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	conn := c.(*net.TCPConn)
	defer conn.Close()
	orig.Expect(t, `^shut$`, waitFor)
	fport := conn.RemoteAddr().(*net.TCPAddr).Port
	lport := ln.Addr().(*net.TCPAddr).Port
	waitConn(t, fport, lport, "FIN_WAIT2", func(r tcpRow) bool { return r.state == 5 })
	if _, err := conn.Write(pattern(0, tcpIn, 253)); err != nil {
		t.Fatal(err)
	}
	waitConn(t, fport, lport, fmt.Sprintf("%d bytes received", tcpIn), func(r tcpRow) bool { return r.rx == tcpIn })
	waitConn(t, lport, fport, "everything we sent acknowledged", func(r tcpRow) bool { return r.tx == 0 })
	copyOut := migrateTCP(t, pid)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	copyOut.Expect(t, `^received$`, waitFor)
	conn.SetDeadline(time.Now().Add(waitFor))
	if err := readPattern(conn, out, 251); err != nil {
		t.Fatalf("the fixture's stream: %v", err)
	}
	if n, err := conn.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after the fixture's bytes: read %d, %v, want the end of its stream", n, err)
	}
	conn.CloseWrite()
	copyOut.Expect(t, `^eof$`, waitFor)
}

// TestFreezeTCPReset: a connection its peer has reset (state CLOSE) is
// refused by name, and the process runs on.
func TestFreezeTCPReset(t *testing.T) {
	needRoot(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "tcpconn"), "halfclose", "127.0.0.1", strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), "10", "10")
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	orig.Expect(t, `^shut$`, waitFor)
	fport := c.RemoteAddr().(*net.TCPAddr).Port
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	for deadline := time.Now().Add(waitFor); ; time.Sleep(10 * time.Millisecond) {
		if _, found := tcpConn(fport, ln.Addr().(*net.TCPAddr).Port); !found {
			break // closed: out of the kernel's tables
		}
		if time.Now().After(deadline) {
			t.Fatal("the fixture's connection was not reset")
		}
	}
	freezeRefused(t, pid, "fd 3", "in state CLOSE")
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	orig.Expect(t, `^error: read: Connection reset by peer$`, waitFor)
}

// TestFreezeListenerPending: a listener with a connection it has not
// accepted yet is refused (the connection would be reset with the
// original); the process runs on, accepts it and serves it.
func TestFreezeListenerPending(t *testing.T) {
	needRoot(t)
	port := freePort(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "tcpconn"), "listen", "127.0.0.1", strconv.Itoa(port))
	orig.Expect(t, `^listening$`, waitFor)
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	freezeRefused(t, pid, "fd 3", "1 connections not yet accepted")
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(waitFor))
	if _, err := c.Write([]byte("hi\n")); err != nil {
		t.Fatal(err)
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != "echo: hi\n" {
		t.Fatalf("the listener's answer: %q, %v", got, err)
	}
	orig.Expect(t, `^served$`, waitFor)
}

// freePort returns a TCP port of loopback that was free a moment ago.
func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestMigrateUDP moves a process with a bound and connected UDP socket:
// afterwards it still receives on its port and answers from it.
func TestMigrateUDP(t *testing.T) {
	needRoot(t)
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			peer, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
			if err != nil {
				t.Skipf("udp on %s: %v", host, err)
			}
			defer peer.Close()
			orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "tcpconn"), "udp", host, strconv.Itoa(peer.LocalAddr().(*net.UDPAddr).Port))
			m := orig.Expect(t, `^udp (\d+)$`, waitFor)
			to, _ := net.ResolveUDPAddr("udp", net.JoinHostPort(host, m[1]))
			echo := func(msg string) {
				t.Helper()
				peer.SetDeadline(time.Now().Add(waitFor))
				if _, err := peer.WriteTo([]byte(msg), to); err != nil {
					t.Fatal(err)
				}
				b := make([]byte, 100)
				n, from, err := peer.ReadFrom(b)
				if err != nil || string(b[:n]) != "echo: "+msg || from.(*net.UDPAddr).Port != to.Port {
					t.Fatalf("answer to %q: %q from %v, %v; want %q from port %d", msg, b[:n], from, err, "echo: "+msg, to.Port)
				}
			}
			echo("before")
			a := newAgents(t)
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer pr.Close()
			out := fixture.FollowReader(t, pr)
			sent := make(chan error, 1)
			go func() { sent <- a.send(context.Background(), a.srcConn, pid, nil) }()
			p, rerr := a.receive(context.Background(), a.dstConn, pw)
			pw.Close()
			serr := <-sent
			if p != nil {
				defer reap(t, p)
			}
			if rerr != nil || serr != nil {
				t.Fatalf("target: %v; source: %v", rerr, serr)
			}
			echo("after")
			peer.WriteTo([]byte("quit"), to)
			out.Expect(t, `^quit$`, waitFor)
		})
	}
}

// sendTCP is agents.send with TCP options.
func (a *agents) sendTCP(conn net.Conn, pid int, tcp capture.TCPOptions) error {
	sink, err := stream.NewConnSink(context.Background(), conn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
	if err != nil {
		return err
	}
	return capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true,
		Cipher: stream.CipherAESGCM, Key: &a.key, ReadyTimeout: waitFor, TCP: tcp})
}

// TestMigrateTCPStays: a connection whose local address does not move
// with the process (here loopback, when only 198.18.0.50 moves) is
// refused by name and the process goes on with it; with Close the move
// goes ahead, the peer gets a reset and the copy finds the connection
// aborted.
func TestMigrateTCPStays(t *testing.T) {
	needRoot(t)
	moving := []netip.Prefix{netip.MustParsePrefix("198.18.0.50/32")}
	t.Run("refused", func(t *testing.T) {
		orig, pid, conn := tcpPair(t, "127.0.0.1", tcpIn)
		a := newAgents(t)
		sent := make(chan error, 1)
		go func() { sent <- a.sendTCP(a.srcConn, pid, capture.TCPOptions{Moving: moving}) }()
		p, _ := a.receive(context.Background(), a.dstConn, nil)
		serr := <-sent
		if p != nil {
			reap(t, p)
			t.Fatalf("the target started pid %d", p.Pid())
		}
		if !errors.Is(serr, capture.ErrConnectionStays) || !strings.Contains(serr.Error(), "fd 3") {
			t.Fatalf("source: %v, want fd 3 refused as staying behind", serr)
		}
		finishPair(t, conn, orig.Lines)
	})
	t.Run("closed", func(t *testing.T) {
		_, pid, conn := tcpPair(t, "127.0.0.1", tcpIn)
		a := newAgents(t)
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pr.Close()
		out := fixture.FollowReader(t, pr)
		sent := make(chan error, 1)
		go func() { sent <- a.sendTCP(a.srcConn, pid, capture.TCPOptions{Moving: moving, Close: true}) }()
		p, rerr := a.receive(context.Background(), a.dstConn, pw)
		pw.Close()
		serr := <-sent
		if p != nil {
			defer reap(t, p)
		}
		if rerr != nil || serr != nil {
			t.Fatalf("target: %v; source: %v", rerr, serr)
		}
		// The copy was stopped in write(): restarted, it fails.
		out.Expect(t, `^error: write: Software caused connection abort$`, waitFor)
		conn.SetDeadline(time.Now().Add(waitFor))
		_, err = io.Copy(io.Discard, conn)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the peer: %v, want a reset", err)
		}
	})
}

// TestThawTCPAddressNotHere restores a snapshot whose connection's local
// address is not on this host (as after a move between hosts, of a
// connection from the host's own address): past the commit the original
// is gone, so the process starts with that connection aborted and the
// user is told, rather than the process being lost.
func TestThawTCPAddressNotHere(t *testing.T) {
	needRoot(t)
	_, pid, conn := tcpPair(t, "127.0.0.1", tcpIn)
	srcTr, dstTr := ptrace.NewTracer(), ptrace.NewTracer()
	defer srcTr.Close()
	defer dstTr.Close()
	var snap bytes.Buffer
	if err := capture.Freeze(context.Background(), srcTr, pid, &snap, true, nil); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	// The same snapshot, the connection's local address made 198.18.0.77.
	var moved bytes.Buffer
	dec, enc := image.NewDecoder(&snap), image.NewEncoder(&moved)
	for {
		rec, err := dec.Next()
		if err != nil {
			t.Fatal(err)
		}
		switch r := rec.(type) {
		case *image.Pages:
			data := make([]byte, r.Len)
			if _, err := io.ReadFull(readerFunc(dec.ReadData), data); err != nil {
				t.Fatal(err)
			}
			err = enc.WritePages(r.Addr, data)
		case *image.FD:
			if r.TCP != nil {
				r.TCP.Local.IP = []byte{198, 18, 0, 77}
			}
			err = enc.Write(r)
		case *image.End:
			err = enc.Close()
		default:
			err = enc.Write(rec)
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := rec.(*image.End); ok {
			break
		}
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	out := fixture.FollowReader(t, pr)
	var notices []string
	p, err := loader.Build(context.Background(), dstTr, image.NewDecoder(&moved), loader.Options{Stdio: [3]*os.File{nil, pw, pw},
		Notice: func(s string) { notices = append(notices, s) }})
	pw.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer reap(t, p)
	if len(notices) != 1 || !strings.Contains(notices[0], "fd 3 (TCP connection 198.18.0.77:") || !strings.Contains(notices[0], "aborted") {
		t.Errorf("notices %q, want one naming fd 3 aborted", notices)
	}
	// The copy was stopped in write(): restarted, it fails.
	out.Expect(t, `^error: write: Software caused connection abort$`, waitFor)
}

// readerFunc is an io.Reader.
type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }
