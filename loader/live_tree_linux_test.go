package loader_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/stream"
)

// TestLiveMigrateTreeExact moves a tree of three dirtier processes live
// (pfreeze -live -tree): each writes pages of its own copy-on-write copy
// of the area through the pre-copy, with contents tagged by member, and
// all of them write a shared (MAP_SHARED) area too. After the move every
// member checks every page against its ledger: a page of any member's
// rounds lost, stale, torn or given to the wrong member shows as a
// MISMATCH. Every member's whole area must have gone before the stop.
func TestLiveMigrateTreeExact(t *testing.T) {
	needRoot(t)
	st := liveMoveTreeChecked(t, false, capture.LiveOptions{}, 3, "32", "1", "8192", "0", "3")
	if st.Rounds < 2 || st.PrecopyBytes < 3*32<<20 {
		t.Errorf("pre-copy: %d rounds, %d bytes; want at least 2 rounds and every member's area (3 × 32 MiB) sent before the stop", st.Rounds, st.PrecopyBytes)
	}
}

// TestLiveMigratePIDNamespaceExact is the same for a PID namespace moved
// whole through its init (dirtier as pid 1, its children 2 and 3), built
// into a new namespace as an agent does: the pre-copy records name the
// members by their numbers in the namespace.
func TestLiveMigratePIDNamespaceExact(t *testing.T) {
	needRoot(t)
	st := liveMoveTreeChecked(t, true, capture.LiveOptions{}, 3, "32", "1", "8192", "0", "3")
	if st.Rounds < 2 || st.PrecopyBytes < 3*32<<20 {
		t.Errorf("pre-copy: %d rounds, %d bytes; want at least 2 rounds and every member's area (3 × 32 MiB) sent before the stop", st.Rounds, st.PrecopyBytes)
	}
}

// liveMoveTreeChecked starts dirtier with args (procs processes), as the
// init of a PID namespace of its own with pidns, moves its tree live
// with o between two agents of this process, and has every member of the
// copy check every page twice.
func liveMoveTreeChecked(t *testing.T, pidns bool, o capture.LiveOptions, procs int, args ...string) capture.LiveStats {
	pid, lines := startDirtierTree(t, pidns, args...)
	lines.Expect(t, `^ready$`, waitFor)
	p, out, st := liveMoveTree(t, pid, pidns, o)
	checkTree(t, p, out, procs)
	return st
}

// TestLiveMigratePIDNamespaceTwice moves the namespace live, then the
// copy live again: the second time every member is a restored process
// (the init the first stub built into).
func TestLiveMigratePIDNamespaceTwice(t *testing.T) {
	needRoot(t)
	pid, lines := startDirtierTree(t, true, "16", "1", "4096", "0", "3")
	lines.Expect(t, `^ready$`, waitFor)
	p, out, _ := liveMoveTree(t, pid, true, capture.LiveOptions{})
	checkTree(t, p, out, 3)
	p2, out2, st := liveMoveTree(t, p.Pid(), true, capture.LiveOptions{})
	if ws, err := p.Wait(); err != nil || !ws.Signaled() {
		t.Errorf("the first copy's init: wait = %v (%v), want killed by the halt", ws, err)
	}
	checkTree(t, p2, out2, 3)
	if st.Rounds < 2 || st.PrecopyBytes < 3*16<<20 {
		t.Errorf("second move: %d rounds, %d bytes; want at least 2 rounds and every member's area (3 × 16 MiB) sent before the stop", st.Rounds, st.PrecopyBytes)
	}
}

// startDirtierTree starts dirtier with args, with pidns as the init of a
// PID namespace of its own, and returns its pid and output.
func startDirtierTree(t *testing.T, pidns bool, args ...string) (int, *fixture.Lines) {
	bin := fixture.Build(t, "dirtier")
	if !pidns {
		orig, root := fixture.StartUnderShell(t, bin, args...)
		return root, orig.Lines
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd.Process.Pid, fixture.FollowReader(t, out)
}

// liveMoveTree moves the tree of pid live with o between two agents of
// this process and returns the copy (killed at the test's end) and its
// output.
func liveMoveTree(t *testing.T, pid int, pidns bool, o capture.LiveOptions) (*loader.Process, *fixture.Lines, capture.LiveStats) {
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pr.Close() })
	out := fixture.FollowReader(t, pr)
	var st capture.LiveStats
	o.Stats, o.Notice = &st, func(s string) { t.Log(s) }
	// The Frozen hook (an agent freezes the cgroup and takes the VIP
	// away there) must come once, at the final stop: after every round.
	var frozen, roundsThen int
	sent := make(chan error, 1)
	go func() {
		sink, err := stream.NewConnSink(context.Background(), a.srcConn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
		if err != nil {
			sent <- err
			return
		}
		sent <- capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true, Tree: true,
			Cipher: stream.CipherAESGCM, Key: &a.key, ReadyTimeout: waitFor,
			Live: true, LiveOptions: o, Frozen: func() { frozen++; roundsThen = st.Rounds }})
	}()
	src, err := stream.NewConnSource(context.Background(), a.dstConn, stream.SourceOptions{Authenticated: true, ReadTimeout: waitFor})
	var p *loader.Process
	if err == nil {
		p, err = loader.ReceiveFrom(context.Background(), a.dstTr, src, loader.ReceiveOptions{Keys: []stream.Key{a.key},
			CommitTimeout: waitFor, Options: loader.Options{Notice: func(s string) { t.Log("thaw:", s) }, PIDNamespace: pidns, Stdio: [3]*os.File{nil, pw, pw}}})
	}
	pw.Close()
	serr := <-sent
	if p != nil {
		t.Cleanup(func() {
			for _, m := range p.Pids() {
				syscall.Kill(m, syscall.SIGKILL)
			}
			p.Wait()
		})
	}
	if err != nil || serr != nil {
		t.Fatalf("target: %v; source: %v", err, serr)
	}
	t.Logf("rounds %d, pre-copied %d bytes, after the stop %d bytes, untracked areas %d", st.Rounds, st.PrecopyBytes, st.FinalBytes, st.Untracked)
	if frozen != 1 || roundsThen != st.Rounds || roundsThen == 0 {
		t.Errorf("the Frozen hook ran %d times, after %d of the %d rounds; want once, after all of them", frozen, roundsThen, st.Rounds)
	}
	return p, out, st
}

// checkTree has every member of p check every page twice, each printing
// its own verdict to out.
func checkTree(t *testing.T, p *loader.Process, out *fixture.Lines, procs int) {
	t.Helper()
	if n := len(p.Pids()); n != procs {
		t.Fatalf("the copy has %d members %v, want %d", n, p.Pids(), procs)
	}
	for i := 0; i < 2; i++ {
		for _, m := range p.Pids() {
			if err := syscall.Kill(m, syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
		}
		seen := map[int]bool{}
		for len(seen) < procs {
			got, err := out.Match(`^check .*`, waitFor)
			if err != nil {
				t.Fatalf("check %d: %v (members that answered: %v)", i, err, seen)
			}
			m := got[0]
			if !strings.HasPrefix(m, "check ok ") {
				t.Fatalf("check %d after the move: %s", i, m)
			}
			var member int
			if _, err := fmt.Sscanf(m, "check ok member=%d", &member); err != nil {
				t.Fatalf("check %d: %q: %v", i, m, err)
			}
			seen[member] = true
		}
	}
}
