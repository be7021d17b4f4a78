package loader_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// describe returns what pfreeze -debug prints of pid (which runs on).
func describe(t *testing.T, pid int) []byte {
	t.Helper()
	return describeWith(t, pid, capture.FreezeOptions{})
}

// describeWith is describe with options o (Tree).
func describeWith(t *testing.T, pid int, o capture.FreezeOptions) []byte {
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
	err := capture.FreezeWith(context.Background(), tr, pid, pw, o)
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
// the process (a daemon's socket) is refused by its peer's name when it
// cannot be handed over (a checkpoint), and the original carries on with
// it.
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
	// A checkpoint (no -halt) cannot hand the connection over: the
	// original runs on with it (TestMemcachedKeptConnection in cmd/pthaw
	// moves one with -halt to a listening pthaw).
	tr := ptrace.NewTracer()
	err = capture.FreezeWith(context.Background(), tr, pid, io.Discard, capture.FreezeOptions{})
	tr.Close()
	for _, w := range []string{"fd 3", "unix stream socket", "connected to \"" + path + "\"", "outside the frozen process"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Fatalf("freeze: %v, want a refusal naming %q", err, w)
		}
	}
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

// migrateNoticed moves pid in this process as migrateTCP does, with
// inherit as the target's Options.InheritFDs, and returns the copy's
// output and what source and target said (their notices).
func migrateNoticed(t *testing.T, pid int, inherit map[int]*os.File) (*fixture.Lines, []string) {
	t.Helper()
	out, said, _ := migrateWith(t, pid, false, inherit)
	return out, said
}

// migrateWith is migrateNoticed, of the tree rooted at pid with tree; it
// also returns the copy's PID.
func migrateWith(t *testing.T, pid int, tree bool, inherit map[int]*os.File) (*fixture.Lines, []string, int) {
	t.Helper()
	return migrateOpts(t, pid, capture.SendOptions{Tree: tree}, loader.Options{InheritFDs: inherit})
}

// migrateOpts is migrateWith with the source's options o (Tree,
// UnixReconnect) and the target's lo (InheritFDs, PIDNamespace; its
// stdio and notices are the test's).
func migrateOpts(t *testing.T, pid int, o capture.SendOptions, lo loader.Options) (*fixture.Lines, []string, int) {
	t.Helper()
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close() })
	out := fixture.FollowReader(t, pr)
	var mu sync.Mutex
	var said []string
	say := func(s string) { mu.Lock(); said = append(said, s); mu.Unlock() }
	sent := make(chan error, 1)
	go func() {
		sink, err := stream.NewConnSink(context.Background(), a.srcConn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
		if err == nil {
			err = capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true,
				Codec: stream.Codec{Name: stream.CompressAuto}, Cipher: stream.CipherAESGCM, Key: &a.key,
				ReadyTimeout: waitFor, Notice: say, Tree: o.Tree, UnixReconnect: o.UnixReconnect})
		}
		sent <- err
	}()
	src, err := stream.NewConnSource(context.Background(), a.dstConn, stream.SourceOptions{Authenticated: true, ReadTimeout: waitFor})
	lo.Stdio, lo.Notice = [3]*os.File{nil, pw, pw}, say
	var p *loader.Process
	if err == nil {
		p, err = loader.ReceiveFrom(context.Background(), a.dstTr, src, loader.ReceiveOptions{Keys: []stream.Key{a.key},
			CommitTimeout: waitFor, Options: lo})
	}
	pw.Close()
	serr := <-sent
	if p != nil {
		t.Cleanup(func() { reap(t, p) })
	}
	if err != nil || serr != nil {
		t.Fatalf("target: %v; source: %v", err, serr)
	}
	mu.Lock()
	defer mu.Unlock()
	return out, append([]string(nil), said...), p.Pid()
}

// TestMigrateOutsidePipe moves a process holding, beyond fds 0-2, the read
// end of a FIFO with bytes buffered in it and the write end of another,
// both leading to this test: the copy reads the buffered bytes and then
// the end of the stream, and its write fails with EPIPE, as if the far
// ends had gone away; source and target say so. With InheritFDs
// (pthaw -inherit-fd) it gets pipes of ours in their place instead.
func TestMigrateOutsidePipe(t *testing.T) {
	needRoot(t)
	for _, inherit := range []bool{false, true} {
		dir := t.TempDir()
		rf, wf := filepath.Join(dir, "r"), filepath.Join(dir, "w")
		for _, f := range []string{rf, wf} {
			if err := syscall.Mkfifo(f, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		reader, err := os.OpenFile(wf, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer reader.Close()
		orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "outpipe", rf, wf)
		orig.Expect(t, `^ready$`, waitFor)
		writer, err := os.OpenFile(rf, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer writer.Close()
		if _, err := writer.WriteString("outside-bytes"); err != nil {
			t.Fatal(err)
		}
		var fds map[int]*os.File
		var gotW *os.File
		want := []string{`^read: outside-bytes$`, `^eof$`, `^epipe$`}
		if inherit {
			r3, w3, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			r4, w4, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			w3.WriteString("fresh")
			w3.Close()
			defer r3.Close()
			defer w4.Close()
			gotW = r4
			defer r4.Close()
			fds = map[int]*os.File{3: r3, 4: w4}
			want = []string{`^read: fresh$`, `^eof$`, `^wrote$`}
		}
		out, said := migrateNoticed(t, pid, fds)
		if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		for _, w := range want {
			out.Expect(t, w, waitFor)
		}
		all := strings.Join(said, "\n")
		for _, w := range []string{"fd 3 (", "fd 4 ("} {
			if !strings.Contains(all, w) || !strings.Contains(all, "leads outside the process") {
				t.Errorf("inherit %v: source and target said %q, want a notice about %s leading outside", inherit, said, w)
			}
		}
		if inherit {
			if strings.Contains(all, "far end is closed (a") {
				t.Errorf("the target said %q of fds it was given", said)
			}
			b := make([]byte, 1)
			gotW.SetReadDeadline(time.Now().Add(waitFor))
			if _, err := gotW.Read(b); err != nil || b[0] != 'w' {
				t.Errorf("read %q (%v) from the pipe given as fd 4, want \"w\"", b, err)
			}
		} else if !strings.Contains(all, "led outside the process: it is a pipe whose far end is closed (a read end: 13 buffered bytes") {
			t.Errorf("the target said %q, want that fd 3 keeps its 13 bytes", said)
		}
	}
}

// TestMigratePty moves a process holding a pty's master and slave, the
// slave's echo off and its window 33x101: the copy finds the same
// settings and the pty still carries bytes both ways; pfreeze -debug
// shows both sides.
func TestMigratePty(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "pty")
	orig.Expect(t, `^ready /dev/pts/\d+$`, waitFor)
	d := string(describe(t, pid))
	for _, want := range []string{"fd 3: pty-master", "fd 4: pty-slave", "window 33x101"} {
		if !strings.Contains(d, want) {
			t.Errorf("pfreeze -debug lacks %q:\n%s", want, d)
		}
	}
	out := migrateTCP(t, pid)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	out.Expect(t, `^ok$`, waitFor)
}

// TestMigrateUnixPairTree moves a tree whose parent and child talk over
// a stream and a datagram socket pair, bytes queued both ways: each reads
// what the other had sent before the freeze, and they still talk.
func TestMigrateUnixPairTree(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "tree")
	orig.Expect(t, `^ready$`, waitFor)
	out, said, copied := migrateWith(t, pid, true, nil)
	t.Logf("the copy is pid %d (%q)", copied, said)
	if err := syscall.Kill(copied, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	// In either order: the parent's wait for its child's saved PID
	// fails (ECHILD) when the child was restored under another.
	got := map[string]bool{}
	for i := 0; i < 2; i++ {
		line, err := out.Next(waitFor)
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		got[line] = true
	}
	if !got["ok"] || !got["child ok"] {
		t.Fatalf("the copies said %v, want ok and child ok", got)
	}
}

// TestMigrateUnixRightsTree moves a parent and its child, each with a
// message queued to the other on their socketpair carrying an fd only
// the sender holds (SCM_RIGHTS): the receiver of each gets an fd that
// writes into the sender's pipe. Then again into a new PID namespace.
func TestMigrateUnixRightsTree(t *testing.T) {
	needRoot(t)
	for _, pidns := range []bool{false, true} {
		t.Run(fmt.Sprintf("pidns=%v", pidns), func(t *testing.T) {
			orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "treefds")
			orig.Expect(t, `^ready$`, waitFor)
			if d := describeWith(t, pid, capture.FreezeOptions{Tree: true}); !regexp.MustCompile(`carries fds \[\d+ of pid \d+\]`).Match(d) {
				t.Errorf("pfreeze -debug does not say which member holds a queued fd:\n%s", d)
			}
			out, said, copied := migrateOpts(t, pid, capture.SendOptions{Tree: true}, loader.Options{PIDNamespace: pidns})
			t.Logf("the copy is pid %d (%q)", copied, said)
			if err := syscall.Kill(copied, syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			got := map[string]bool{}
			for i := 0; i < 2; i++ {
				line, err := out.Next(waitFor)
				if err != nil {
					t.Fatalf("after %v: %v", got, err)
				}
				got[line] = true
			}
			if !got["ok"] || !got["child ok"] {
				t.Fatalf("the copies said %v, want ok and child ok", got)
			}
		})
	}
}

// TestMigrateUnixReconnect: with UnixReconnect (pfreeze -unix-reconnect)
// a unix socket connected to a daemon's named socket outside the process
// is connected to it again by the copy, which then talks to the daemon
// on the new connection; the source says so.
func TestMigrateUnixReconnect(t *testing.T) {
	needRoot(t)
	path := filepath.Join(t.TempDir(), "daemon.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "connect", path)
	first, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	orig.Expect(t, `^ready$`, waitFor)
	out, said, copied := migrateOpts(t, pid, capture.SendOptions{UnixReconnect: true}, loader.Options{})
	if !strings.Contains(strings.Join(said, "\n"), "the copy connects to it again") {
		t.Errorf("the source said %q, want that the copy connects again", said)
	}
	second, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if err := syscall.Kill(copied, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	out.Expect(t, `^ok$`, waitFor)
	second.SetDeadline(time.Now().Add(waitFor))
	line, err := bufio.NewReader(second).ReadString('\n')
	if line != "hello\n" {
		t.Fatalf("the copy sent %q (%v) on its new connection, want hello", line, err)
	}
}

// TestMigrateRedisUnix moves Debian's redis-server listening only on a
// unix socket, with a key set: a client connecting to the socket after
// the move gets the key from the copy, which goes on serving.
func TestMigrateRedisUnix(t *testing.T) {
	needRoot(t)
	p, sock := fixture.StartRedis(t)
	if got, err := fixture.RedisDo(sock, "SET k before-the-move"); err != nil || got != "+OK" {
		t.Fatalf("SET: %q %v", got, err)
	}
	// The server closes its side of our connection when it sees the
	// end of it: wait until the listener is its only socket.
	deadline := time.Now().Add(waitFor)
	for {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.Pid()))
		n := 0
		for _, e := range ents {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p.Pid(), e.Name())); strings.HasPrefix(l, "socket:") {
				n++
			}
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis still holds %d sockets", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	migrateTCP(t, p.Pid())
	if got, err := fixture.RedisDo(sock, "GET k"); err != nil || got != "before-the-move" {
		t.Fatalf("GET k from the copy: %q %v, want before-the-move", got, err)
	}
	if got, err := fixture.RedisDo(sock, "INCR n"); err != nil || got != ":1" {
		t.Fatalf("INCR n on the copy: %q %v, want :1", got, err)
	}
}

// TestMigrateNginxTree moves Debian's nginx, a master and two workers
// (the master talks to each worker over a socketpair, nginx's channels),
// listening on a unix socket they all share, as one tree: after the move
// the copy's workers answer a request on the same socket. Then again into
// a new PID namespace (pthaw -pidns, how the cluster runs workloads),
// where the members take the socketpairs' ends and the listener from
// pthaw without naming its PID.
func TestMigrateNginxTree(t *testing.T) {
	needRoot(t)
	bin, err := exec.LookPath("nginx")
	if err != nil {
		if _, err = os.Stat("/usr/sbin/nginx"); err != nil {
			t.Skip("nginx is not installed (make deps installs it)")
		}
		bin = "/usr/sbin/nginx"
	}
	for _, pidns := range []bool{false, true} {
		t.Run(fmt.Sprintf("pidns=%v", pidns), func(t *testing.T) { migrateNginx(t, bin, pidns) })
	}
}

func migrateNginx(t *testing.T, bin string, pidns bool) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "nginx.sock")
	conf := filepath.Join(dir, "nginx.conf")
	cfg := fmt.Sprintf(`daemon off;
master_process on;
worker_processes 2;
pid %[1]s/nginx.pid;
events { worker_connections 64; }
http {
	access_log off;
	keepalive_timeout 0;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen unix:%[2]s;
		location / { return 200 "hello from nginx\n"; }
	}
}
`, dir, sock)
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := fixture.Start(t, bin, "-p", dir+"/", "-c", conf, "-e", "stderr")
	get := func() (string, error) {
		c, err := net.DialTimeout("unix", sock, waitFor)
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(waitFor))
		if _, err := c.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
			return "", err
		}
		b, err := io.ReadAll(c)
		return string(b), err
	}
	// Up when both workers run and one answers.
	deadline := time.Now().Add(waitFor)
	for {
		kids, _ := fixture.Children(p.Pid())
		if body, err := get(); err == nil && strings.HasSuffix(body, "hello from nginx\n") && len(kids) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx did not come up (children %v)", kids)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, said, copied := migrateOpts(t, p.Pid(), capture.SendOptions{Tree: true}, loader.Options{PIDNamespace: pidns})
	t.Logf("the copy's master is pid %d (%q)", copied, said)
	workers, _ := fixture.Children(copied)
	t.Cleanup(func() {
		// The master stops its workers; then wait for them to go.
		syscall.Kill(copied, syscall.SIGTERM)
		for _, w := range workers {
			for end := time.Now().Add(waitFor); alive(w) && time.Now().Before(end); {
				time.Sleep(10 * time.Millisecond)
			}
		}
	})
	if len(workers) != 2 {
		t.Fatalf("the copy's master has children %v, want 2 workers", workers)
	}
	body, err := get()
	if err != nil || !strings.HasSuffix(body, "hello from nginx\n") {
		t.Fatalf("GET / from the copy: %q %v", body, err)
	}
}

// TestMigrateUnixSelfConnected moves a process connected to its own
// listener on a path, bytes queued both ways on the connection: the copy
// reads them, says the connection has lost its name, and the listener
// still accepts.
func TestMigrateUnixSelfConnected(t *testing.T) {
	needRoot(t)
	path := filepath.Join(t.TempDir(), "self.sock")
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "self", path)
	orig.Expect(t, `^ready$`, waitFor)
	out, said, copied := migrateWith(t, pid, false, nil)
	if !strings.Contains(strings.Join(said, "\n"), "fd 5 (unix stream socket \""+path+"\") is connected to a socket of the process") {
		t.Errorf("the source said %q, want a word on fd 5's name", said)
	}
	if err := syscall.Kill(copied, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	c.Write([]byte("again\n"))
	line, err := bufio.NewReader(c).ReadString('\n')
	if line != "echo: again\n" {
		t.Fatalf("the copy answered %q (%v)", line, err)
	}
	out.Expect(t, `^ok$`, waitFor)
}

// TestMigrateUnixDgramBound moves a process with a datagram socket bound
// to a path (a receiver others send to) and an unbound one: after the
// move a datagram sent to the path reaches the copy, which answers it,
// and its unbound socket can send to it.
func TestMigrateUnixDgramBound(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "recv.sock")
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "dgram", path)
	orig.Expect(t, `^ready$`, waitFor)
	d := string(describe(t, pid))
	if !strings.Contains(d, "dgram socket") || !strings.Contains(d, "unconnected, bound to \""+path+"\"") {
		t.Errorf("pfreeze -debug lacks the bound datagram socket:\n%s", d)
	}
	out := migrateTCP(t, pid)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	me := filepath.Join(dir, "me.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: me, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteToUnix([]byte("hi"), &net.UnixAddr{Name: path, Net: "unixgram"}); err != nil {
		t.Fatalf("send to the copy: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(waitFor))
	b := make([]byte, 64)
	n, _, err := c.ReadFromUnix(b)
	if err != nil || string(b[:n]) != "echo: hi" {
		t.Fatalf("the copy answered %q (%v), want \"echo: hi\"", b[:n], err)
	}
	out.Expect(t, `^ok$`, waitFor)
}

// TestMigratePtyTree moves a tree whose child leads a session with the
// slave of its parent's pty as its controlling terminal and its own group
// in the foreground: the copy's child still has that controlling
// terminal and foreground group, and the two still talk through it. Then
// again into a new PID namespace (pthaw -pidns).
func TestMigratePtyTree(t *testing.T) {
	needRoot(t)
	for _, pidns := range []bool{false, true} {
		t.Run(fmt.Sprintf("pidns=%v", pidns), func(t *testing.T) {
			orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "ptytree")
			orig.Expect(t, `^ready$`, waitFor)
			out, said, copied := migrateOpts(t, pid, capture.SendOptions{Tree: true}, loader.Options{PIDNamespace: pidns})
			t.Logf("the copy is pid %d (%q)", copied, said)
			for _, s := range said {
				if strings.Contains(s, "not restored") {
					t.Errorf("the target said %q", s)
				}
			}
			if err := syscall.Kill(copied, syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			out.Expect(t, `^ok$`, waitFor)
		})
	}
}
