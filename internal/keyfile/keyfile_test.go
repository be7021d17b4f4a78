package keyfile

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // whatever the umask
			t.Fatal(err)
		}
		return p
	}
	key := []byte("0123456789abcdef0123456789abcdef")
	if got, err := Read(write("ok", key, 0o600), 32); err != nil || string(got) != string(key) {
		t.Errorf("Read of a 0600 key: %q, %v", got, err)
	}
	if got, err := Read(write("long", append(key, "more"...), 0o400), 32); err != nil || len(got) != 33 {
		t.Errorf("Read of a long key: %d bytes, %v; want 33 (max+1)", len(got), err)
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o620, 0o604, 0o602} {
		p := write("k"+mode.String(), key, mode)
		if _, err := Read(p, 32); err == nil || !strings.Contains(err.Error(), "chmod 600 "+p) || strings.Count(err.Error(), "\n") > 0 {
			t.Errorf("Read of a %04o key: %v; want one line telling to chmod 600", mode, err)
		}
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Read(fifo, 32); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Errorf("Read of a FIFO: %v; want a refusal", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read of a FIFO blocked")
	}
	if os.Geteuid() == 0 {
		p := write("theirs", key, 0o600)
		if err := os.Chown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if _, err := Read(p, 32); err == nil || !strings.Contains(err.Error(), "uid 65534") {
			t.Errorf("Read of a key owned by uid 65534: %v; want a refusal naming the owner", err)
		}
		if got, err := ReadAnyOwner(p, 32); err != nil || string(got) != string(key) {
			t.Errorf("ReadAnyOwner of a 0600 key owned by uid 65534: %q, %v", got, err)
		}
		os.Chmod(p, 0o644)
		if _, err := ReadAnyOwner(p, 32); err == nil {
			t.Error("ReadAnyOwner of a 0644 key: accepted")
		}
	}
}

func TestCheckDir(t *testing.T) {
	dir := t.TempDir()
	for mode, ok := range map[os.FileMode]bool{0o700: true, 0o755: true, 0o775: false, 0o777: false, 0o757: false} {
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := Check(dir, fi); (err == nil) != ok {
			t.Errorf("key directory of mode %04o: %v", mode, err)
		}
	}
	os.Chmod(dir, 0o700)
}
