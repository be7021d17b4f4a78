package loader_test

import (
	"context"
	"os"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/stream"
)

// TestLiveMigrateExact moves a program whose threads write pages (and
// give some back with MADV_DONTNEED) all through the pre-copy, then has
// it check every page against its own ledger: a page of any round lost,
// stale or torn shows as a MISMATCH.
func TestLiveMigrateExact(t *testing.T) {
	needRoot(t)
	// 64 MiB, 2 writer threads, 16 MiB/s.
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "dirtier"), "64", "2", "16384")
	orig.Expect(t, `^ready$`, waitFor)
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	out := fixture.FollowReader(t, pr)
	var st capture.LiveStats
	sent := make(chan error, 1)
	go func() {
		sink, err := stream.NewConnSink(context.Background(), a.srcConn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
		if err != nil {
			sent <- err
			return
		}
		sent <- capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true,
			Cipher: stream.CipherAESGCM, Key: &a.key, ReadyTimeout: waitFor,
			Live: true, LiveOptions: capture.LiveOptions{Stats: &st, Notice: func(s string) { t.Log(s) }}})
	}()
	p, rerr := a.receive(context.Background(), a.dstConn, pw)
	pw.Close()
	serr := <-sent
	if p != nil {
		defer reap(t, p)
	}
	if rerr != nil || serr != nil {
		t.Fatalf("target: %v; source: %v", rerr, serr)
	}
	t.Logf("rounds %d, pre-copied %d bytes, after the stop %d bytes, untracked areas %d", st.Rounds, st.PrecopyBytes, st.FinalBytes, st.Untracked)
	if st.Rounds < 2 || st.PrecopyBytes < 64<<20 {
		t.Errorf("pre-copy: %d rounds, %d bytes; want at least 2 rounds and the whole area (64 MiB) sent before the stop", st.Rounds, st.PrecopyBytes)
	}
	for i := 0; i < 2; i++ {
		if err := syscall.Kill(p.Pid(), syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		if got, err := out.Match(`^check .*`, waitFor); err != nil {
			t.Fatalf("check %d: %v", i, err)
		} else if m := got[0]; m[:8] != "check ok" {
			t.Fatalf("check %d after the move: %s", i, m)
		}
	}
}
