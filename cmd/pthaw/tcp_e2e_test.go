package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/tcplock"
)

// TestGoHTTPKeepAlive moves a Go HTTP server while a client holds a
// keep-alive connection to it, through a file (pfreeze -halt, then pthaw)
// and through a unix socket (pthaw builds the copy while the original,
// frozen, still holds the connection): the client's next request goes
// over the same connection and finds the server's state.
func TestGoHTTPKeepAlive(t *testing.T) {
	needRoot(t)
	for _, via := range []string{"file", "unix"} {
		t.Run(via, func(t *testing.T) { goHTTPKeepAlive(t, via) })
	}
}

func goHTTPKeepAlive(t *testing.T, via string) {
	p := fixture.Start(t, fixture.Build(t, "gohttp"), "127.0.0.1:0")
	addr := p.Lines.Expect(t, `^listening (\S+)$`, waitFor)[1]
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	get := func(path string) string {
		t.Helper()
		conn.SetDeadline(time.Now().Add(waitFor))
		if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b := make([]byte, 64)
		n, _ := resp.Body.Read(b)
		return strings.TrimSpace(string(b[:n]))
	}
	for i := 1; i <= 3; i++ {
		if got := get("/inc?k=moves"); got != fmt.Sprint(i) {
			t.Fatalf("inc %d: got %q", i, got)
		}
	}
	// The server's last answer acknowledged: the client has no delayed
	// ACK left to send. From the original's kill until pthaw has rebuilt
	// the connection nothing holds it, and a packet from the client
	// would draw a reset from this host (docs/pfreeze.md; the cluster
	// closes that window with netfilter).
	acked(t, conn.RemoteAddr().(*net.TCPAddr).Port, conn.LocalAddr().(*net.TCPAddr).Port)
	var th *thawed
	if via == "file" {
		th = migrate(t, p)
	} else {
		sock := filepath.Join(t.TempDir(), "sock")
		th = thaw(t, "-src", "unix:"+sock)
		th.listening(t)
		freeze(t, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", "unix:"+sock)
		select {
		case <-p.Exited():
		case <-time.After(waitFor):
			t.Fatalf("pid %d still running after pfreeze -halt", p.Pid())
		}
	}
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := get("/inc?k=moves"); got != "4" {
		t.Fatalf("after thaw, on the same connection: inc got %q, want 4", got)
	}
}

// acked waits until the connection from local port to remote port has
// nothing unacknowledged in its send queue (/proc/net/tcp).
func acked(t *testing.T, local, remote int) {
	t.Helper()
	want := fmt.Sprintf(":%04X ", local)
	peer := fmt.Sprintf(":%04X ", remote)
	var last string
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		b, err := os.ReadFile("/proc/net/tcp")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 5 || !strings.HasSuffix(f[1]+" ", want) || !strings.HasSuffix(f[2]+" ", peer) {
				continue
			}
			if last = f[4]; strings.HasPrefix(f[4], "00000000:") {
				return
			}
		}
	}
	t.Fatalf("connection %d -> %d: queues %s, want nothing unacknowledged", local, remote, last)
}

// TestRedisHeldConnection moves redis-server (pfreeze -tree -halt to a
// pthaw listening on a unix socket) while a client holds a connection to it,
// with a reply the client has not read yet: afterwards the client reads
// that reply and the same connection answers, keys intact.
func TestRedisHeldConnection(t *testing.T) {
	needRoot(t)
	p, addr := fixture.StartRedisTCP(t)
	for i := 0; i < 100; i++ {
		if _, err := fixture.RedisDo(addr, fmt.Sprintf("SET key%d value%d", i, i)); err != nil {
			t.Fatal(err)
		}
	}
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(waitFor))
	r := bufio.NewReader(conn)
	line := func() string {
		t.Helper()
		s, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read a reply: %v", err)
		}
		return strings.TrimRight(s, "\r\n")
	}
	if _, err := conn.Write([]byte("INCRBY counter 41\r\n")); err != nil {
		t.Fatal(err)
	}
	if got := line(); got != ":41" {
		t.Fatalf("INCRBY: %q", got)
	}
	// A reply left unread in the client's receive queue, and everything
	// the server sent acknowledged (docs/pfreeze.md: the window without a
	// socket).
	if _, err := conn.Write([]byte("GET key7\r\n")); err != nil {
		t.Fatal(err)
	}
	acked(t, conn.RemoteAddr().(*net.TCPAddr).Port, conn.LocalAddr().(*net.TCPAddr).Port)
	sock := filepath.Join(t.TempDir(), "sock")
	th := thaw(t, "-src", "unix:"+sock)
	th.listening(t)
	// A one-process tree: -tree carries its pipe to itself.
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-halt", "-dest", "unix:"+sock)
	<-p.Exited()
	th.restoredPid(t)
	if got, want := line()+" "+line(), "$6 value7"; got != want {
		t.Fatalf("the reply sent before the move: %q, want %q", got, want)
	}
	if _, err := conn.Write([]byte("INCR counter\r\nGET key99\r\n")); err != nil {
		t.Fatalf("write after the move: %v", err)
	}
	if got, want := line()+" "+line()+" "+line(), ":42 $7 value99"; got != want {
		t.Fatalf("after the move, on the same connection: %q, want %q", got, want)
	}
}

// TestTCPFlagsBadInput: pfreeze's TCP flags, given wrong, say so in one
// line and exit non-zero before any process is touched.
func TestTCPFlagsBadInput(t *testing.T) {
	for _, args := range [][]string{
		{"-pid", "1", "-tcp-addrs", "198.18.0.500"},
		{"-pid", "1", "-tcp-addrs", "198.18.0.50/40"},
		{"-pid", "1", "-tcp-close"},
	} {
		cmd := exec.Command(filepath.Join(binDir, "pfreeze"), args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Run(); err == nil {
			t.Errorf("pfreeze %v: accepted", args)
		}
		if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pfreeze: -tcp-") {
			t.Errorf("pfreeze %v: stderr %q, want one line naming the flag", args, msg)
		}
	}
}

// TestPeerSendsWhileHalted: a client sends a request while the server is
// halted to a file, after the original's kill and before pthaw: no socket
// holds the connection then, and this host answered the request with a
// reset until pfreeze held the peer's packets off with netfilter
// (internal/tcplock) for pthaw to let in once it has rebuilt the
// connection (zdtm's socket-tcpbuf, whose peer keeps sending, failed so
// in most runs). The request, dropped, is retransmitted to the copy,
// which answers it on the same connection; no lock is left.
func TestPeerSendsWhileHalted(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "gohttp"), "127.0.0.1:0")
	addr := p.Lines.Expect(t, `^listening (\S+)$`, waitFor)[1]
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	request := func(path string) {
		t.Helper()
		if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	answer := func(path string) string {
		t.Helper()
		conn.SetDeadline(time.Now().Add(waitFor))
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b := make([]byte, 64)
		n, _ := resp.Body.Read(b)
		return strings.TrimSpace(string(b[:n]))
	}
	request("/inc?k=n")
	if got := answer("/inc?k=n"); got != "1" {
		t.Fatalf("inc: got %q, want 1", got)
	}
	local := conn.RemoteAddr().(*net.TCPAddr).AddrPort()
	peer := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	t.Cleanup(func() { tcplock.Unlock(-1, local, peer) })
	acked(t, int(local.Port()), int(peer.Port()))

	snap := haltToFile(t, p)
	request("/inc?k=n")
	// Wait until the request has met the window: retransmitted (dropped
	// the first time) or reset.
	raw, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	for deadline := time.Now().Add(waitFor); ; time.Sleep(5 * time.Millisecond) {
		var ierr error
		if err := raw.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || ierr != nil {
			t.Fatalf("TCP_INFO: %v %v", err, ierr)
		}
		if info.State != unix.BPF_TCP_ESTABLISHED || info.Total_retrans > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the request was neither retransmitted nor reset while the server was halted")
		}
	}
	if info.State != unix.BPF_TCP_ESTABLISHED {
		t.Fatalf("the request sent while the server was halted drew a reset (client in state %d)", info.State)
	}
	if names, err := tcplock.Locked(-1); err != nil || !slices.Contains(names, tcplock.Name(local, peer)) {
		t.Errorf("while halted: locks %q (%v), want %q among them", names, err, tcplock.Name(local, peer))
	}
	th := thaw(t, "-src", snap)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := answer("/inc?k=n"); got != "2" {
		t.Fatalf("the request sent while halted, answered by the copy: got %q, want 2", got)
	}
	if names, err := tcplock.Locked(-1); err != nil || slices.Contains(names, tcplock.Name(local, peer)) {
		t.Errorf("after pthaw: locks %q (%v), want none of %s", names, err, tcplock.Name(local, peer))
	}
}
