package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
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
