package loader_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// describe returns what pfreeze -debug prints of pid (which runs on).
func describe(t *testing.T, pid int) []byte {
	t.Helper()
	tr := ptrace.NewTracer()
	defer tr.Close()
	pr, pw := io.Pipe()
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() {
		err := image.Describe(&out, image.NewDecoder(pr), ptrace.RegNames[:])
		pr.CloseWithError(err)
		done <- err
	}()
	err := capture.FreezeWith(context.Background(), tr, pid, pw, capture.FreezeOptions{})
	pw.CloseWithError(err)
	if derr := <-done; err == nil {
		err = derr
	}
	if err != nil {
		t.Fatalf("describe %d: %v", pid, err)
	}
	return out.Bytes()
}

// TestMigrateUnixPair moves a single process holding unix socket pairs of
// each type with bytes queued both ways, messages carrying one of its
// fds (SCM_RIGHTS) and one end shut down: the copy reads every queued
// byte and message back with its boundaries, gets fds that write into
// the same pipe, sees the shut-down stream end, and its pairs still talk
// (the fixture checks).
func TestMigrateUnixPair(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"))
	orig.Expect(t, `^ready$`, waitFor)
	out := migrateTCP(t, pid)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	out.Expect(t, `^ok$`, waitFor)
}

// TestDebugUnixPair: pfreeze -debug's description shows each end with its
// type, peer and queue.
func TestDebugUnixPair(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"))
	orig.Expect(t, `^ready$`, waitFor)
	b := describe(t, pid)
	for _, want := range []string{"unix \"socket:[", "stream socket", "queued 1 messages 31 bytes", "[message 0 carries fds [12]]", "dgram socket", "queued 4 messages 15 bytes", "[message 3 carries fds [12]]", "seqpacket socket", "queued 2 messages 5 bytes", "shutdown 2"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("pfreeze -debug lacks %q:\n%s", want, b)
		}
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	orig.Expect(t, `^ok$`, waitFor)
}

// TestFreezeUnixOutside: a unix socket connected to a listener outside
// the process (a daemon's socket) is refused by its peer's name and the
// original carries on with it.
func TestFreezeUnixOutside(t *testing.T) {
	needRoot(t)
	path := filepath.Join(t.TempDir(), "daemon.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "connect", path)
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	orig.Expect(t, `^ready$`, waitFor)
	freezeRefused(t, pid, "fd 3", "unix stream socket", "connected to \""+path+"\"", "outside the frozen process")
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	orig.Expect(t, `^ok$`, waitFor)
	c.SetDeadline(time.Now().Add(waitFor))
	line, err := bufio.NewReader(c).ReadString('\n')
	if line != "hello\n" {
		t.Fatalf("the original sent %q (%v), want hello", line, err)
	}
}

// TestMigrateUnixListener moves a process listening on a unix socket
// bound to a path (its socket file left behind by the killed original is
// replaced, keeping its mode) and one on an abstract name: after the
// move a client connects to the name and the copy answers.
func TestMigrateUnixListener(t *testing.T) {
	needRoot(t)
	for _, abstract := range []bool{false, true} {
		name := filepath.Join(t.TempDir(), "server.sock")
		if abstract {
			name = fmt.Sprintf("@pcluster-test-%d", os.Getpid())
		}
		orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "listen", name)
		orig.Expect(t, `^ready$`, waitFor)
		if !abstract {
			if err := os.Chmod(name, 0o640); err != nil {
				t.Fatal(err)
			}
		}
		out := migrateTCP(t, pid)
		if !abstract {
			if st, err := os.Stat(name); err != nil || st.Mode().Perm() != 0o640 {
				t.Fatalf("the socket file after the move: %v %v, want mode 0640", st, err)
			}
		}
		if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("unix", name)
		if err != nil {
			t.Fatalf("%s: connect to the copy: %v", name, err)
		}
		c.SetDeadline(time.Now().Add(waitFor))
		if _, err := c.Write([]byte("hi\n")); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if line != "echo: hi\n" {
			t.Fatalf("%s: the copy answered %q (%v), want \"echo: hi\\n\"", name, line, err)
		}
		out.Expect(t, `^ok$`, waitFor)
	}
}

// TestMigrateOwnPipe moves a single process (no tree) holding both ends
// of a pipe with bytes buffered in it: the copy reads them, and the pipe
// still carries what it writes.
func TestMigrateOwnPipe(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "pipe")
	orig.Expect(t, `^ready$`, waitFor)
	out := migrateTCP(t, pid)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	out.Expect(t, `^ok$`, waitFor)
}
