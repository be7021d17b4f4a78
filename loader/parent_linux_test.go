package loader_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
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

// checkpoint writes a snapshot of pid (left running) to a file in dir,
// incremental against parent when it is not empty, and returns its path
// and size.
func checkpoint(t testing.TB, tr *ptrace.Tracer, pid int, dir, name, parent string, codec string, key stream.Key) (string, int64) {
	t.Helper()
	var p *capture.Parent
	if parent != "" {
		var err error
		if p, err = capture.OpenParent(parent, []stream.Key{key}); err != nil {
			t.Fatal(err)
		}
	}
	return checkpointAgainst(t, tr, pid, dir, name, p, codec, key)
}

// checkpointAgainst is checkpoint with the parent already read.
func checkpointAgainst(t testing.TB, tr *ptrace.Tracer, pid int, dir, name string, parent *capture.Parent, codec string, key stream.Key) (string, int64) {
	t.Helper()
	path := filepath.Join(dir, name)
	o := capture.SendOptions{Dest: path, Cipher: stream.CipherAESGCM, Key: &key, DialTimeout: waitFor, WriteTimeout: waitFor, Parent: parent}
	var err error
	if o.Codec, err = stream.ParseCodec(codec); err != nil {
		t.Fatal(err)
	}
	if err := capture.Send(context.Background(), tr, pid, o); err != nil {
		t.Fatalf("checkpoint %s: %v", name, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, st.Size()
}

// TestIncrementalChainExact checkpoints a program whose threads keep
// writing pages (some given back with MADV_DONTNEED) and a small area
// that is unmapped and mapped elsewhere, replaced, grown and shrunk, three
// times: a full snapshot, then two incremental ones, each against the one
// before (encrypted, each compressed differently). The last restored from
// the chain must be the process as it was then: the program checks every
// page against its own ledger. The incremental snapshots carry only what
// changed.
func TestIncrementalChainExact(t *testing.T) {
	needRoot(t)
	// 2 MiB/s: the writers catch up after each stop (their pace is by
	// the clock), so a stop of seconds on a loaded machine still leaves
	// the incremental checkpoints well under half the full one.
	orig := fixture.Start(t, fixture.Build(t, "dirtier"), "32", "2", "2048", "1")
	orig.Expect(t, `^ready$`, waitFor)
	tr := ptrace.NewTracer()
	defer tr.Close()
	key := clusterKey(t)
	dir := t.TempDir()
	full, fullSize := checkpoint(t, tr, orig.Pid(), dir, "full.pf", "", "none", key)
	time.Sleep(200 * time.Millisecond) // let it write
	inc1, size1 := checkpoint(t, tr, orig.Pid(), dir, "inc1.pf", full, "zstd", key)
	time.Sleep(200 * time.Millisecond)
	inc2, size2 := checkpoint(t, tr, orig.Pid(), dir, "inc2.pf", inc1, "snappy", key)
	t.Logf("full %d bytes, incremental %d and %d bytes", fullSize, size1, size2)
	// 2 MiB/s for a fraction of a second dirties a few MiB of 32.
	if size1 >= fullSize/2 || size2 >= fullSize/2 {
		t.Errorf("incremental snapshots of %d and %d bytes, the full one %d: want less than half", size1, size2, fullSize)
	}
	orig.Kill()
	orig.Wait(waitFor)

	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	out := fixture.FollowReader(t, pr)
	p, err := loader.Receive(context.Background(), tr, loader.ReceiveOptions{Src: inc2, Keys: []stream.Key{key},
		ReadTimeout: waitFor, CommitTimeout: waitFor, Options: loader.Options{NewPID: true, Stdio: [3]*os.File{nil, pw, pw}}})
	pw.Close()
	if err != nil {
		t.Fatalf("restore the chain: %v", err)
	}
	defer reap(t, p)
	if err := syscall.Kill(p.Pid(), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	got, err := out.Match(`^check .*`, waitFor)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got[0], "check ok") {
		t.Fatalf("restored from the chain: %s", got[0])
	}
}

// TestIncrementalWrongParent: a child whose parent was replaced by
// another snapshot at the same path is refused with one line naming the
// parent (by its size before anything is built, or, of the same size, at
// the first page that differs from its digest); so is one whose parent
// cannot be found, or was altered (one byte: the same size), and a parent
// given with -parent that is another snapshot is not taken for it.
func TestIncrementalWrongParent(t *testing.T) {
	needRoot(t)
	orig := fixture.Start(t, fixture.Build(t, "dirtier"), "4", "1", "1024")
	orig.Expect(t, `^ready$`, waitFor)
	tr := ptrace.NewTracer()
	defer tr.Close()
	key := clusterKey(t)
	dir := t.TempDir()
	parent, _ := checkpoint(t, tr, orig.Pid(), dir, "parent.pf", "", "none", key)
	child, _ := checkpoint(t, tr, orig.Pid(), dir, "child.pf", parent, "none", key)
	other, _ := checkpoint(t, tr, orig.Pid(), dir, "other.pf", "", "none", key)
	receive := func(parents ...string) error {
		p, err := loader.Receive(context.Background(), tr, loader.ReceiveOptions{Src: child, Keys: []stream.Key{key}, Parents: parents,
			ReadTimeout: waitFor, CommitTimeout: waitFor, Options: loader.Options{NewPID: true}})
		if err == nil {
			reap(t, p)
		}
		return err
	}
	// The right parent, named on the command line under another name.
	moved := filepath.Join(dir, "moved.pf")
	if err := os.Rename(parent, moved); err != nil {
		t.Fatal(err)
	}
	if err := receive(other, moved); err != nil {
		t.Fatalf("with the parent given: %v", err)
	}
	if err := receive(); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("parent missing: got %v, want it not found", err)
	}
	b, err := os.ReadFile(moved)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	if err := os.WriteFile(parent, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := receive(); err == nil || !strings.Contains(err.Error(), parent) || strings.Contains(err.Error(), "\n") {
		t.Errorf("an altered parent: got %v, want one line naming %s", err, parent)
	} else {
		t.Logf("an altered parent: %v", err)
	}
	if err := os.Rename(other, parent); err != nil {
		t.Fatal(err)
	}
	err = receive()
	if !errors.Is(err, image.ErrWrongParent) || !strings.Contains(err.Error(), parent) || strings.Contains(err.Error(), "\n") {
		t.Errorf("another snapshot at the parent's path: got %v, want one line naming %s as the wrong parent", err, parent)
	}
}
