package loader_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
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
	if st.Rounds < 2 || st.PrecopyBytes+st.SharedBytes < 3*32<<20 {
		t.Errorf("pre-copy: %d rounds, %d bytes, %d shared with the parent; want at least 2 rounds and every member's area (3 × 32 MiB) sent before the stop or left to the parent's fork", st.Rounds, st.PrecopyBytes, st.SharedBytes)
	}
}

// TestLiveMigratePIDNamespaceExact is the same for a PID namespace moved
// whole through its init (dirtier as pid 1, its children 2 and 3), built
// into a new namespace as an agent does: the pre-copy records name the
// members by their numbers in the namespace.
// The tree, announced before the rounds, is made as they start and the
// pages go straight into its members (loader.PrecopyStats.Early).
func TestLiveMigratePIDNamespaceExact(t *testing.T) {
	needRoot(t)
	pid, lines := startDirtierTree(t, true, "32", "1", "8192", "0", "3")
	lines.Expect(t, `^ready$`, waitFor)
	p, out, st := liveMoveTree(t, pid, true, capture.LiveOptions{})
	checkTree(t, p, out, 3)
	if st.Rounds < 2 || st.PrecopyBytes+st.SharedBytes < 3*32<<20 {
		t.Errorf("pre-copy: %d rounds, %d bytes, %d shared with the parent; want at least 2 rounds and every member's area (3 × 32 MiB) sent before the stop or left to the parent's fork", st.Rounds, st.PrecopyBytes, st.SharedBytes)
	}
	if !p.Precopy().Early {
		t.Errorf("the tree was made at the stop; want it made as the rounds began (announced, unchanged)")
	}
}

// TestLiveMigratePIDNamespaceMemberDied kills a member of the namespace
// after the first round: a zombie at the stop (its parent does not reap
// it). The tree made early is kept, the member's stub ended with its
// status for its parent to reap; the two members left must check out
// exactly, and nothing but the copy's processes is left.
func TestLiveMigratePIDNamespaceMemberDied(t *testing.T) {
	needRoot(t)
	pid, lines := startDirtierTree(t, true, "32", "1", "8192", "0", "3")
	lines.Expect(t, `^ready$`, waitFor)
	kids := mustChildren(t, pid)
	if len(kids) != 2 {
		t.Fatalf("children of %d: %v, want 2", pid, kids)
	}
	before := descendants(t)
	p, out, _ := liveMoveTree(t, pid, true, capture.LiveOptions{Round: func(n int, _ uint64) {
		if n == 0 {
			syscall.Kill(kids[1], syscall.SIGKILL)
		}
	}})
	if !p.Precopy().Early {
		t.Errorf("the tree was rebuilt at the stop; want the one made early kept (a member that became a zombie ends as one)")
	}
	if n := len(p.Pids()); n != 3 {
		t.Fatalf("the copy has %d members %v, want 3 (one a zombie)", n, p.Pids())
	}
	for _, m := range p.Pids() {
		syscall.Kill(m, syscall.SIGUSR1)
	}
	for i := 0; i < 2; i++ {
		got, err := out.Match(`^check .*`, waitFor)
		if err != nil {
			t.Fatalf("check: %v", err)
		}
		if !strings.HasPrefix(got[0], "check ok ") {
			t.Fatalf("check after the move: %s", got[0])
		}
	}
	noneLeft(t, before, p)
}

// TestLiveMigratePIDNamespaceGrows changes the tree after the first
// round: the parent forks a new member and the first one ends (reaped at
// once: the parent ignores SIGCHLD). The tree made early is kept: the new
// member forked at the stop from its parent's stub, the one gone ended
// and reaped by its parent's stub. Each member of the copy checks its
// memory (the new one its own and the parent's it inherited).
func TestLiveMigratePIDNamespaceGrows(t *testing.T) {
	needRoot(t)
	pid, lines := startInPIDNS(t, fixture.Build(t, "treegrow"), "32", "1")
	lines.Expect(t, `^(ready|kid \d+ ready)$`, waitFor)
	lines.Expect(t, `^(ready|kid \d+ ready)$`, waitFor)
	kids := mustChildren(t, pid)
	if len(kids) != 1 {
		t.Fatalf("children of %d: %v, want 1", pid, kids)
	}
	before := descendants(t)
	var newKid string
	p, out, _ := liveMoveTree(t, pid, true, capture.LiveOptions{Round: func(n int, _ uint64) {
		if n != 0 {
			return
		}
		syscall.Kill(pid, syscall.SIGUSR2)
		newKid = lines.Expect(t, `^kid (\d+) ready$`, waitFor)[1]
		syscall.Kill(kids[0], syscall.SIGTERM)
		for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", kids[0])); err != nil {
				return
			}
		}
		t.Errorf("pid %d did not end", kids[0])
	}})
	if !p.Precopy().Early {
		t.Errorf("the tree was rebuilt at the stop; want the one made early kept (a member forked and one gone since)")
	}
	if n := len(p.Pids()); n != 2 {
		t.Fatalf("the copy has %d members %v, want 2", n, p.Pids())
	}
	for _, m := range p.Pids() {
		syscall.Kill(m, syscall.SIGUSR1)
	}
	seen := map[string]bool{}
	for len(seen) < 2 {
		got, err := out.Match(`^check .*`, waitFor)
		if err != nil {
			t.Fatalf("check: %v (answered: %v)", err, seen)
		}
		var pid string
		if _, err := fmt.Sscanf(got[0], "check ok pid=%s", &pid); err != nil {
			t.Fatalf("check after the move: %s", got[0])
		}
		seen[strings.Fields(pid)[0]] = true
	}
	if !seen["1"] || !seen[newKid] {
		t.Errorf("checked: %v, want pid 1 and the new member %s", seen, newKid)
	}
	noneLeft(t, before, p)
}

// TestLiveMigratePIDNamespaceReparented kills a member with a child of
// its own after the first round: the child (PDEATHSIG) dies too, as a
// zombie of the namespace's init now, not of its parent. A member whose
// parent changed cannot be kept from the tree made early: it is rebuilt
// at the stop from the tree record, and the processes made early are
// killed and reaped. The root runs on in the copy, its ids unchanged.
func TestLiveMigratePIDNamespaceReparented(t *testing.T) {
	needRoot(t)
	pid, lines := startInPIDNS(t, fixture.Build(t, "pidtree"))
	lines.Expect(t, `^grandkid 1 `, waitFor)
	kids := mustChildren(t, pid)
	if len(kids) != 1 {
		t.Fatalf("children of %d: %v, want 1", pid, kids)
	}
	before := descendants(t)
	p, out, _ := liveMoveTree(t, pid, true, capture.LiveOptions{Round: func(n int, _ uint64) {
		if n == 0 {
			syscall.Kill(kids[0], syscall.SIGKILL)
		}
	}})
	if p.Precopy().Early {
		t.Errorf("the tree made early was kept; want it rebuilt at the stop (a member's parent changed)")
	}
	for i := 0; i < 3; i++ {
		got, err := out.Match(`^(root \d+|FAIL) .*`, waitFor)
		if err != nil {
			t.Fatalf("the copy's root: %v", err)
		}
		if strings.HasPrefix(got[0], "FAIL") {
			t.Fatalf("the copy: %s", got[0])
		}
	}
	noneLeft(t, before, p)
}

// noneLeft fails t if a process below this one is neither one of before
// nor of the copy p.
func noneLeft(t *testing.T, before map[int]bool, p *loader.Process) {
	t.Helper()
	copies := map[int]bool{p.WaitPid(): true}
	for _, m := range p.Pids() {
		copies[m] = true
	}
	for d := range descendants(t) {
		if !before[d] && !copies[d] {
			t.Errorf("pid %d (%s) is left of the restore", d, comm(d))
		}
	}
}

// TestLiveMigratePIDNamespaceAbort cuts the connection after the first
// round, when the target has made the tree and written pages into it:
// the target must kill and reap every process it made, and the source
// resume the original, whole.
func TestLiveMigratePIDNamespaceAbort(t *testing.T) {
	needRoot(t)
	pid, lines := startDirtierTree(t, true, "32", "1", "8192", "0", "3")
	lines.Expect(t, `^ready$`, waitFor)
	before := descendants(t)
	a := newAgents(t)
	_, _, _, err := tryLiveMoveTree(t, a, pid, true, capture.LiveOptions{Round: func(n int, _ uint64) {
		if n == 0 {
			a.dstConn.Close()
		}
	}})
	if err == nil {
		t.Fatal("the move succeeded with its connection cut")
	}
	t.Logf("the move failed, as it must: %v", err)
	for d := range descendants(t) {
		if !before[d] {
			t.Errorf("pid %d (%s) is left of the aborted restore", d, comm(d))
		}
	}
	// The original runs on: every member checks out.
	for _, m := range append([]int{pid}, mustChildren(t, pid)...) {
		syscall.Kill(m, syscall.SIGUSR1)
	}
	for i := 0; i < 3; i++ {
		got, err := lines.Match(`^check .*`, waitFor)
		if err != nil {
			t.Fatalf("the original's check: %v", err)
		}
		if !strings.HasPrefix(got[0], "check ok ") {
			t.Fatalf("the original after the failed move: %s", got[0])
		}
	}
}

// descendants returns every process below this one (not its threads).
func descendants(t *testing.T) map[int]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	kids := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := procfs.Stat(pid)
		if err != nil {
			continue
		}
		pp := int(procfs.StatField(st, 4))
		kids[pp] = append(kids[pp], pid)
	}
	out := map[int]bool{}
	queue := []int{os.Getpid()}
	for len(queue) > 0 {
		for _, k := range kids[queue[0]] {
			if !out[k] {
				out[k] = true
				queue = append(queue, k)
			}
		}
		queue = queue[1:]
	}
	return out
}

func comm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

func mustChildren(t *testing.T, pid int) []int {
	t.Helper()
	kids, err := procfs.Children(pid)
	if err != nil {
		t.Fatal(err)
	}
	return kids
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
	if st.Rounds < 2 || st.PrecopyBytes+st.SharedBytes < 3*16<<20 {
		t.Errorf("second move: %d rounds, %d bytes, %d shared with the parent; want at least 2 rounds and every member's area (3 × 16 MiB) sent before the stop or left to the parent's fork", st.Rounds, st.PrecopyBytes, st.SharedBytes)
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
	return startInPIDNS(t, bin, args...)
}

// startInPIDNS starts bin with args as the init of a PID namespace of its
// own and returns its pid and output.
func startInPIDNS(t *testing.T, bin string, args ...string) (int, *fixture.Lines) {
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
	p, out, st, err := tryLiveMoveTree(t, newAgents(t), pid, pidns, o)
	if err != nil {
		t.Fatal(err)
	}
	return p, out, st
}

// tryLiveMoveTree is liveMoveTree through the agents a, returning what
// failed instead of failing the test.
func tryLiveMoveTree(t *testing.T, a *agents, pid int, pidns bool, o capture.LiveOptions) (*loader.Process, *fixture.Lines, capture.LiveStats, error) {
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
		return nil, nil, st, fmt.Errorf("target: %v; source: %v", err, serr)
	}
	t.Logf("rounds %d, pre-copied %d bytes, shared with the parent %d, after the stop %d bytes, untracked areas %d, flags read at the stop %v", st.Rounds, st.PrecopyBytes, st.SharedBytes, st.FinalBytes, st.Untracked, st.FlagsAtStop)
	if frozen != 1 || roundsThen != st.Rounds || roundsThen == 0 {
		t.Errorf("the Frozen hook ran %d times, after %d of the %d rounds; want once, after all of them", frozen, roundsThen, st.Rounds)
	}
	return p, out, st, nil
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
