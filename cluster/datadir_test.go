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
