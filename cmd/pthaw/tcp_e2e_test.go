package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestGoHTTPKeepAlive moves a Go HTTP server (pfreeze -halt, then pthaw)
// while a client holds a keep-alive connection to it: the client's next
// request goes over the same connection and finds the server's state.
func TestGoHTTPKeepAlive(t *testing.T) {
	needRoot(t)
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
	th := migrate(t, p)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := get("/inc?k=moves"); got != "4" {
		t.Fatalf("after thaw, on the same connection: inc got %q, want 4", got)
	}
}
