package cluster_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pcluster/pcluster/cluster"
	"github.com/pcluster/pcluster/cluster/pki"
)

// TestDataDirPrivate checks that pclusterd refuses a data dir other users
// can enter: raft's snapshots (the whole state, env included) and the
// workload logs are created there with the umask's modes.
func TestDataDirPrivate(t *testing.T) {
	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := cluster.Start(cluster.Config{Name: "x", BindAddr: "127.0.0.1:0", DataDir: dir, Key: key, BootstrapExpect: 1})
	if err == nil {
		s.Shutdown()
		t.Fatal("started with a mode 0755 data dir")
	}
	if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "mode 0755") {
		t.Errorf("got %v, want one line naming the dir and its mode", err)
	}
}

// TestDataDirOwned checks that pclusterd refuses a data dir another user
// could change, whatever its mode: one that user owns (made 0700 in /tmp
// before pclusterd first ran), one inside a directory that user may
// rename entries of, or one reached through that user's symlink. Each let
// the user swap workloads/ID for a directory whose stdout.log was a
// symlink into /etc, which the agent, as root, then appended to.
func TestDataDirOwned(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the directories are given to another uid")
	}
	const other = 65534
	key, err := pki.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	base := t.TempDir()
	mkdir := func(p string, mode os.FileMode, uid int) string {
		t.Helper()
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		if err := os.Lchown(p, uid, uid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	theirs := mkdir(filepath.Join(base, "theirs"), 0o700, other)
	open := mkdir(filepath.Join(base, "open"), 0o777, 0)
	inOpen := mkdir(filepath.Join(open, "data"), 0o700, 0)
	sticky := mkdir(filepath.Join(base, "sticky"), 0o777|os.ModeSticky, 0)
	ours := mkdir(filepath.Join(base, "ours"), 0o700, 0)
	link := filepath.Join(sticky, "link")
	if err := os.Symlink(ours, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(link, other, other); err != nil {
		t.Fatal(err)
	}
	rootLink := filepath.Join(sticky, "rootlink")
	if err := os.Symlink(ours, rootLink); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dir, want string
	}{
		{theirs, "owned by uid 65534"},
		{filepath.Join(theirs, "sub"), "owned by uid 65534"}, // MkdirAll makes sub as root
		{inOpen, "mode 0777 lets other users rename"},
		{link, "owned by uid 65534"},
	} {
		s, err := cluster.Start(cluster.Config{Name: "x", BindAddr: "127.0.0.1:0", DataDir: tc.dir, Key: key, BootstrapExpect: 1})
		if err == nil {
			s.Shutdown()
			t.Errorf("started with data dir %s", tc.dir)
			continue
		}
		if !strings.Contains(err.Error(), tc.dir) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("data dir %s: got %v, want one line naming it and %q", tc.dir, err, tc.want)
		}
	}
	// Root's own symlink in a sticky directory to a private directory of
	// root's is fine: nobody else can change either.
	s, err := cluster.Start(cluster.Config{Name: "x", BindAddr: "127.0.0.1:0", DataDir: rootLink, Key: key, BootstrapExpect: 1})
	if err != nil {
		t.Fatalf("data dir %s (root's symlink to root's 0700 dir): %v", rootLink, err)
	}
	s.Shutdown()
}
