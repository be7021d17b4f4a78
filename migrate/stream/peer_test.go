package stream

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// peerScript is a receiver that greets like pthaw and reads what comes,
// for two connections; it prints the address it listens on.
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
s.listen(2)
print(addr, flush=True)
for _ in range(2):
    c, _ = s.accept()
    c.sendall(hello + os.urandom(16))
    while c.recv(65536):
        pass
    c.close()
`

// TestPlaintextOnlyToOwnUser: over loopback TCP or a unix socket an
// unencrypted stream goes only to a receiver running as our own user (or
// root), never to another user who listened there first; an encrypted one
// may go anywhere, since only a key holder can read it or acknowledge it.
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
			for _, enc := range []string{CipherNone, CipherAESGCM} {
				sink, err := OpenSink(spec, SinkOptions{DialTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second})
				if err != nil {
					t.Fatal(err)
				}
				w, err := NewWriter(sink, Options{Encrypt: encryptOpt(keys, enc, "k1.key")})
				switch {
				case enc == CipherNone && (err == nil || !strings.Contains(err.Error(), "runs as uid 65534")):
					t.Errorf("plaintext to %s owned by uid 65534: %v, want a refusal naming the uid", spec, err)
				case enc != CipherNone && err != nil:
					t.Errorf("%s to %s: %v", enc, spec, err)
				case err == nil:
					w.Close()
				}
				sink.Close()
			}
		})
	}
}
