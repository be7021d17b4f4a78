package stream

import (
	"bufio"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// peerScript is a receiver that greets like pthaw and reads what comes,
// for three connections; it prints the address it listens on.
const peerScript = `
import os, socket, sys
kind, path, hello = sys.argv[1], sys.argv[2], sys.argv[3].encode()
if kind == "tcp":
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % s.getsockname()[1]
else:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    addr = path
s.listen(3)
print(addr, flush=True)
for _ in range(3):
    c, _ = s.accept()
    c.sendall(hello + os.urandom(16))
    while c.recv(65536):
        pass
    c.close()
`

// TestPlaintextOnlyToOwnUser: over loopback TCP or a unix socket an
// unencrypted stream goes only to a receiver running as our own user, root
// or the frozen process's owner, never to another user who listened there
// first; an encrypted one may go anywhere, since only a key holder can read
// it or acknowledge it.
func TestPlaintextOnlyToOwnUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a receiver as another user (CI runs as root)")
	}
	keys := testKeys(t)
	dir, err := os.MkdirTemp("", "pcluster-peer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"tcp", "unix"} {
		t.Run(kind, func(t *testing.T) {
			// Debian's python3 (in CI's packages): a per-user install may not be
			// readable by uid 65534.
			cmd := exec.Command("/usr/bin/python3", "-c", peerScript, kind, filepath.Join(dir, kind+".sock"), wireHello)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			addr, err := bufio.NewReader(out).ReadString('\n')
			if err != nil {
				t.Fatalf("receiver as uid 65534: %v", err)
			}
			spec := kind + ":" + strings.TrimSpace(addr)
			for _, tc := range []struct {
				enc   string
				owner int // the frozen process's owner (SinkOptions.OwnerUID)
				ok    bool
			}{
				{CipherNone, 0, false},
				{CipherAESGCM, 0, true},
				{CipherNone, 65534, true}, // root sending uid 65534's process to it
			} {
				sink, err := OpenSink(spec, SinkOptions{DialTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second, OwnerUID: tc.owner})
				if err != nil {
					t.Fatal(err)
				}
				w, err := NewWriter(sink, opts("", encryptOpt(keys, tc.enc, "k1.key")))
				switch {
				case !tc.ok && (err == nil || !strings.Contains(err.Error(), "runs as uid 65534")):
					t.Errorf("%s to %s owned by uid 65534 (process owner %d): %v, want a refusal naming the uid", tc.enc, spec, tc.owner, err)
				case tc.ok && err != nil:
					t.Errorf("%s to %s (process owner %d): %v", tc.enc, spec, tc.owner, err)
				case err == nil:
					w.Close()
				}
				sink.Close()
			}
		})
	}
}

// TestPlaintextDualStackLoopback: a receiver listening on all addresses
// (tcp:PORT, an IPv6 socket taking IPv4 too) is found in /proc/net/tcp6 in
// its IPv4-mapped form when the sender dials 127.0.0.1.
func TestPlaintextDualStackLoopback(t *testing.T) {
	src, err := OpenSource("tcp:0", SourceOptions{ReadTimeout: 5 * time.Second, Insecure: true, Warn: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(src.Addr())
	data := []byte("records")
	hosts := []string{"127.0.0.1", "[::1]"}
	if ln, err := net.Listen("tcp6", "[::1]:0"); err != nil {
		hosts = hosts[:1] // no IPv6 loopback on this machine
	} else {
		ln.Close()
	}
	for _, host := range hosts {
		if host == "[::1]" {
			if src, err = OpenSource("tcp:0", SourceOptions{ReadTimeout: 5 * time.Second, Insecure: true, Warn: io.Discard}); err != nil {
				t.Fatal(err)
			}
			_, port, _ = net.SplitHostPort(src.Addr())
		}
		errc := make(chan error, 1)
		go func() { errc <- send("tcp:"+host+":"+port, data, Options{}, true) }()
		got, err := receive(src, ReaderOptions{})
		if err != nil || string(got) != string(data) {
			t.Errorf("%s to a dual-stack receiver: %q, %v", host, got, err)
		}
		if err := <-errc; err != nil {
			t.Errorf("%s to a dual-stack receiver: sender: %v", host, err)
		}
	}
}
