package loader_test

import (
	"context"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/procfs"
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
	// Its MADV_DONTNEED changes no flag: the flags read while it ran do.
	if st.FlagsAtStop {
		t.Errorf("the areas' flags were read at the stop; want them read while it ran (no call that changes flags, no area changed)")
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

// TestLiveMigrateFlags moves a program whose areas carry flags that
// /proc/PID/maps does not show (MADV_DONTFORK, MADV_WIPEONFORK, mlock of
// whole areas): set before the migration (read while the process runs,
// not at the stop), and set during the pre-copy, after the flags were
// read (the counted calls make the stop read them again); alone, and as
// the init of a PID namespace moved whole (a tree, the agents' way). The
// copy's smaps must show them each time. "late-dontfork" makes only the
// madvise call (a counter with a filter on the advice).
func TestLiveMigrateFlags(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "vmadvise")
	for _, tree := range []bool{false, true} {
		for _, early := range []bool{true, false} {
			name := map[bool]string{true: "early", false: "late"}[early]
			if tree {
				name = "pidns-" + name
			}
			t.Run(name, func(t *testing.T) { liveMoveFlags(t, bin, tree, early, false) })
		}
	}
	t.Run("late-dontfork", func(t *testing.T) { liveMoveFlags(t, bin, false, false, true) })
}

func liveMoveFlags(t *testing.T, bin string, tree, early, onlyDontfork bool) {
	var args []string
	if early {
		args = append(args, "early")
	}
	if onlyDontfork {
		args = append(args, "dontfork")
	}
	var orig *fixture.Proc
	var pid int
	var lines *fixture.Lines
	if tree {
		pid, lines = startInPIDNS(t, bin, args...)
	} else {
		orig, pid = fixture.StartUnderShell(t, bin, args...)
		lines = orig.Lines
	}
	ready := lines.Expect(t, `^ready (\S+) (\S+) (\S+)$`, waitFor)
	var advised error
	o := capture.LiveOptions{}
	if !early {
		// After round 0: after the flags were read.
		o.Round = func(n int, _ uint64) {
			if n != 0 {
				return
			}
			if advised = syscall.Kill(pid, syscall.SIGUSR2); advised == nil {
				_, advised = lines.Match(`^advised$`, waitFor)
			}
		}
	}
	var copyPid int
	var out *fixture.Lines
	var st capture.LiveStats
	if tree {
		var p *loader.Process
		p, out, st = liveMoveTree(t, pid, true, o)
		if pids := p.Pids(); len(pids) != 1 {
			t.Fatalf("the copy has members %v, want one", pids)
		} else {
			copyPid = pids[0]
		}
	} else {
		var p *loader.Process
		st, p, out = liveMove(t, orig, pid, o)
		defer reap(t, p)
		copyPid = p.Pid()
	}
	if advised != nil {
		t.Fatalf("advise during the pre-copy: %v", advised)
	}
	if st.FlagsAtStop == early {
		t.Errorf("flags read at the stop: %v, want %v", st.FlagsAtStop, !early)
	}
	maps, err := procfs.Maps(copyPid)
	if err != nil {
		t.Fatal(err)
	}
	wants := []string{"dc", "wf", "lo"}
	if onlyDontfork {
		wants = wants[:1]
	}
	for i, want := range wants {
		start, err := strconv.ParseUint(ready[i+1], 16, 64)
		if err != nil {
			t.Fatal(err)
		}
		var flags string
		found := false
		for _, m := range maps {
			if m.Start == start {
				flags, found = m.VmFlags, true
			}
		}
		if !found {
			t.Errorf("area %#x: not in the copy's smaps", start)
		} else if !slices.Contains(strings.Fields(flags), want) {
			t.Errorf("area %#x in the copy: VmFlags %q, want %s among them", start, flags, want)
		}
	}
	if err := syscall.Kill(copyPid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if got := out.Expect(t, `^sum .*`, waitFor); got[0] != "sum 73728" {
		t.Errorf("copy: %s, want sum 73728 (3 areas of 3 pages of bytes 1, 2, 3)", got[0])
	}
}

// liveMoveChecked starts dirtier with args, moves it live with o between
// two agents of this process, and has the copy check every page twice.
func liveMoveChecked(t *testing.T, o capture.LiveOptions, args ...string) capture.LiveStats {
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "dirtier"), args...)
	orig.Expect(t, `^ready$`, waitFor)
	st, p, out := liveMove(t, orig, pid, o)
	defer reap(t, p)
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

// liveMove moves pid (orig's) live with o between two agents of this
// process: the copy, to be reaped, and its output.
func liveMove(t *testing.T, orig *fixture.Proc, pid int, o capture.LiveOptions) (capture.LiveStats, *loader.Process, *fixture.Lines) {
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close() })
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
	if p != nil && (rerr != nil || serr != nil) {
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
	return st, p, out
}
