package stream

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeSink writes body to a file sink named spec and closes it.
func writeSink(t *testing.T, spec string, body []byte) error {
	t.Helper()
	sink, err := OpenSink(spec, SinkOptions{})
	if err != nil {
		return err
	}
	if _, err := sink.Write(body); err != nil {
		sink.Close()
		return err
	}
	return sink.Close()
}

func isSymlink(t *testing.T, p string) bool {
	t.Helper()
	fi, err := os.Lstat(p)
	return err == nil && fi.Mode()&os.ModeSymlink != 0
}

// TestFileSinkFollowsSymlink: a destination that is a symlink is written
// through, as open(2) would, never replaced. (The unnamed snapshot was
// renamed over the symlink's name: -dest LINK replaced the link and left
// its file as it was, and `pfreeze -dest /dev/stdout > FILE` put a
// regular file in place of /dev/stdout and wrote nothing to FILE.)
func TestFileSinkFollowsSymlink(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	target, link := filepath.Join(dir, "b", "target"), filepath.Join(dir, "a", "link")
	if err := os.WriteFile(target, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../b/target", link); err != nil {
		t.Fatal(err)
	}
	body := bytes.Repeat([]byte("snapshot"), 1<<14)
	if err := writeSink(t, link, body); err != nil {
		t.Fatal(err)
	}
	if !isSymlink(t, link) {
		t.Errorf("%s was replaced, want it still a symlink", link)
	}
	if b, _ := os.ReadFile(target); !bytes.Equal(b, body) {
		t.Errorf("target holds %d bytes, want the %d written through the link", len(b), len(body))
	}

	// A link to nothing is refused, not replaced, and nothing is created.
	dangling := filepath.Join(dir, "a", "dangling")
	if err := os.Symlink("../b/missing", dangling); err != nil {
		t.Fatal(err)
	}
	if err := writeSink(t, dangling, body); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("sink to a dangling symlink: %v, want a refusal saying its target does not exist", err)
	}
	if !isSymlink(t, dangling) {
		t.Errorf("%s was replaced, want it still a symlink", dangling)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "b")); len(ents) != 1 {
		t.Errorf("%d files in %s, want only target", len(ents), filepath.Join(dir, "b"))
	}

	// One of our fds by name (/dev/stdout is /proc/self/fd/1): that fd is
	// written, appending where it appends.
	f, err := os.OpenFile(filepath.Join(dir, "b", "fd"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("hdr")
	for _, name := range []string{fmt.Sprintf("/proc/self/fd/%d", f.Fd()), fmt.Sprintf("/dev/fd/%d", f.Fd())} {
		if err := writeSink(t, name, body); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if b, _ := os.ReadFile(f.Name()); string(b) != "hdr"+string(body)+string(body) {
		t.Errorf("fd's file holds %d bytes, want hdr and the two snapshots (%d)", len(b), 3+2*len(body))
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "b")); len(ents) != 2 {
		t.Errorf("%d files in %s, want target and fd", len(ents), filepath.Join(dir, "b"))
	}
}

// TestFileSinkStickySymlink: as fs.protected_symlinks does (and even
// where it is off), a symlink another user planted in a sticky
// world-writable directory is not followed: root's pfreeze -dest
// /tmp/snap must not write a snapshot over the file it names.
func TestFileSinkStickySymlink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a symlink another owner")
	}
	dir := t.TempDir()
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, os.ModeSticky|0o777); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(tmp, "snap")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	if err := writeSink(t, link, []byte("snapshot")); err == nil || !strings.Contains(err.Error(), "not followed") {
		t.Errorf("sink through another user's symlink in a sticky directory: %v, want a refusal", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Errorf("victim holds %q, want it untouched", b)
	}
	if err := os.Lchown(link, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := writeSink(t, link, []byte("snapshot")); err != nil {
		t.Errorf("sink through the caller's own symlink: %v", err)
	}
}
