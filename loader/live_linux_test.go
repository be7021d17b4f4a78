package loader_test

import (
	"context"
	"os"
	"syscall"
	"testing"
	"time"

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
	st := liveMoveChecked(t, capture.LiveOptions{}, "64", "2", "16384")
	if st.Rounds < 2 || st.PrecopyBytes < 64<<20 {
		t.Errorf("pre-copy: %d rounds, %d bytes; want at least 2 rounds and the whole area (64 MiB) sent before the stop", st.Rounds, st.PrecopyBytes)
	}
}

// TestLiveMigrateChurn moves the same program while a thread of it also
// keeps replacing a small area (grown or shrunk by mremap, or unmapped
// and mapped anew), so that areas the receiver mapped as they were
// announced are gone or resized at the stop: it must unmap them and take
// the snapshot's, and the program checks every page of both after the
// move. The rounds are slowed (bandwidth cap) so that the area surely
// changes between the announcement and the stop.
func TestLiveMigrateChurn(t *testing.T) {
	needRoot(t)
	st := liveMoveChecked(t, capture.LiveOptions{Bandwidth: 128 << 20}, "64", "2", "16384", "1")
	if st.Untracked == 0 {
		t.Errorf("no area changed during the pre-copy (%d rounds): the churn was not exercised", st.Rounds)
	}
}

// liveMoveChecked starts dirtier with args, moves it live with o between
// two agents of this process, and has the copy check every page twice.
func liveMoveChecked(t *testing.T, o capture.LiveOptions, args ...string) capture.LiveStats {
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "dirtier"), args...)
	orig.Expect(t, `^ready$`, waitFor)
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	out := fixture.FollowReader(t, pr)
	var st capture.LiveStats
	o.Stats, o.Notice = &st, func(s string) { t.Log(s) }
	sent := make(chan error, 1)
	go func() {
		sink, err := stream.NewConnSink(context.Background(), a.srcConn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
		if err != nil {
			sent <- err
			return
		}
		sent <- capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true,
			Cipher: stream.CipherAESGCM, Key: &a.key, ReadyTimeout: waitFor,
			Live: true, LiveOptions: o})
	}()
	p, rerr := a.receive(context.Background(), a.dstConn, pw)
	pw.Close()
	serr := <-sent
	if p != nil {
		defer reap(t, p)
	}
	if rerr != nil || serr != nil {
		select {
		case <-time.After(2 * time.Second):
			t.Logf("the original still runs")
		case <-orig.Exited():
			time.Sleep(100 * time.Millisecond)
			t.Logf("the original's shell exited; output: %q", orig.Drain())
		default:
		}
		t.Fatalf("target: %v; source: %v", rerr, serr)
	}
	t.Logf("rounds %d, pre-copied %d bytes, after the stop %d bytes, untracked areas %d, flags read at the stop %v", st.Rounds, st.PrecopyBytes, st.FinalBytes, st.Untracked, st.FlagsAtStop)
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
	return st
}
