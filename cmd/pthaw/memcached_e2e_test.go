package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// memcachedBinary returns Debian's memcached, or skips the test.
func memcachedBinary(t *testing.T) string {
	t.Helper()
	if bin, err := exec.LookPath("memcached"); err == nil {
		return bin
	}
	if _, err := os.Stat("/usr/bin/memcached"); err == nil {
		return "/usr/bin/memcached"
	}
	t.Skip("memcached is not installed (make deps installs it)")
	return ""
}

// mcConn is a memcached text-protocol client on one connection.
type mcConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialMemcached(t *testing.T, sock string) *mcConn {
	t.Helper()
	c, err := net.DialTimeout("unix", sock, waitFor)
	if err != nil {
		t.Fatalf("connect to memcached at %s: %v", sock, err)
	}
	t.Cleanup(func() { c.Close() })
	return &mcConn{c: c, r: bufio.NewReader(c)}
}

// do sends req and reads reply lines until one is a final line (STORED,
// END, an error...), returning them joined by spaces.
func (m *mcConn) do(t *testing.T, req string) string {
	t.Helper()
	m.c.SetDeadline(time.Now().Add(waitFor))
	if _, err := m.c.Write([]byte(req)); err != nil {
		t.Fatalf("memcached: write %q: %v", req, err)
	}
	var got []string
	for {
		line, err := m.r.ReadString('\n')
		if err != nil {
			t.Fatalf("memcached: %q: read the reply (%q so far): %v", req, got, err)
		}
		line = strings.TrimRight(line, "\r\n")
		got = append(got, line)
		switch {
		case line == "STORED", line == "END", line == "NOT_STORED", line == "DELETED",
			strings.HasSuffix(line, "ERROR"), strings.HasPrefix(line, "CLIENT_ERROR"), strings.HasPrefix(line, "SERVER_ERROR"):
			return strings.Join(got, " ")
		}
	}
}

func (m *mcConn) set(t *testing.T, k, v string) {
	t.Helper()
	if got := m.do(t, fmt.Sprintf("set %s 0 0 %d\r\n%s\r\n", k, len(v), v)); got != "STORED" {
		t.Fatalf("set %s: %q, want STORED", k, got)
	}
}

func (m *mcConn) get(t *testing.T, k, want string) {
	t.Helper()
	if got, w := m.do(t, "get "+k+"\r\n"), fmt.Sprintf("VALUE %s 0 %d %s END", k, len(want), want); got != w {
		t.Fatalf("get %s: %q, want %q", k, got, w)
	}
}

// TestMemcachedKeptConnection moves Debian's memcached (four worker
// threads, listening only on a unix socket) with pfreeze -halt, a single
// process, to a pthaw listening on a unix socket, while a client keeps
// its connection open across the move: the same connection, and a new
// one, read the keys set before it and set new ones. The client's
// connection is a unix socket connected to a peer outside the process:
// pthaw takes that very socket over from the held original.
func TestMemcachedKeptConnection(t *testing.T) {
	needRoot(t)
	bin := memcachedBinary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "mc.sock")
	p := fixture.Start(t, bin, "-u", "root", "-t", "4", "-s", sock, "-U", "0", "-p", "0", "-m", "16")
	t.Cleanup(func() { os.Remove(sock) })
	var kept *mcConn
	for deadline := time.Now().Add(waitFor); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.DialTimeout("unix", sock, waitFor); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("memcached did not listen on %s", sock)
		}
	}
	kept = dialMemcached(t, sock)
	for i := 0; i < 50; i++ {
		kept.set(t, fmt.Sprintf("key%d", i), fmt.Sprintf("value%d", i))
	}
	// The listener's backlog must be empty (memcached accepted our
	// connection): it has answered on it, so it has.
	th := thaw(t, "-src", "unix:"+filepath.Join(dir, "thaw.sock"))
	th.listening(t)
	said := freeze(t, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", "unix:"+filepath.Join(dir, "thaw.sock"))
	if !strings.Contains(said, "the copy takes over this connection") {
		t.Errorf("pfreeze said %q, want a word on the kept connection", said)
	}
	<-p.Exited()
	copied := th.restoredPid(t)
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", copied)); !strings.HasSuffix(exe, "memcached") {
		t.Fatalf("pthaw's child %d runs %q, want memcached", copied, exe)
	}
	kept.get(t, "key7", "value7")
	kept.set(t, "after", "on-the-kept-connection")
	fresh := dialMemcached(t, sock)
	fresh.get(t, "key49", "value49")
	fresh.get(t, "after", "on-the-kept-connection")
	fresh.set(t, "new", "on-a-new-connection")
	kept.get(t, "new", "on-a-new-connection")
}

// TestMemcachedKeptConnectionToFile: through a file the original is
// killed before any pthaw runs, so a connection to a peer outside cannot
// be handed over: pfreeze -halt refuses it by name and memcached runs on,
// answering on the same connection.
func TestMemcachedKeptConnectionToFile(t *testing.T) {
	needRoot(t)
	bin := memcachedBinary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "mc.sock")
	p := fixture.Start(t, bin, "-u", "root", "-t", "4", "-s", sock, "-U", "0", "-p", "0", "-m", "16")
	t.Cleanup(func() { os.Remove(sock) })
	for deadline := time.Now().Add(waitFor); ; time.Sleep(10 * time.Millisecond) {
		if c, err := net.DialTimeout("unix", sock, waitFor); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("memcached did not listen on %s", sock)
		}
	}
	kept := dialMemcached(t, sock)
	kept.set(t, "k", "before")
	snap := filepath.Join(dir, "snap")
	out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "is connected to socket:[") || strings.Count(strings.TrimSpace(string(out)), "\n") != 0 {
		t.Fatalf("pfreeze -halt to a file: %v, %q; want one line refusing the kept connection", err, out)
	}
	if _, err := os.Stat(snap); err == nil {
		t.Errorf("pfreeze left a snapshot at %s", snap)
	}
	kept.get(t, "k", "before")
}
