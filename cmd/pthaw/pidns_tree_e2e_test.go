package main

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
)

// Trees restored into a new PID namespace (pthaw -pidns) while their
// PIDs are taken here: the originals keep running (pfreeze without -halt)
// or, frozen inside a container, have PIDs such as 1. Every test looks at
// the restored processes from both sides: from here through
// /proc/PID/status (NSpid, NSpgid, NSsid: the innermost namespace's
// number last), and from the inside through what the programs print.

// procStatus returns the fields of /proc/PID/status, by key.
func procStatus(t *testing.T, pid int) map[string][]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	st := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			st[k] = strings.Fields(v)
		}
	}
	return st
}

// pidNSOf returns the PID namespace of pid (zombies included), or "".
func pidNSOf(pid int) string {
	ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", pid))
	return ns
}

// nsIDs returns the ids process pid (ours) has in its own PID namespace:
// what getpid, getppid, getpgid(0) and getsid(0) return there (0 for a
// parent, group or session outside it).
func nsIDs(t *testing.T, pid int) fixture.IDs {
	t.Helper()
	st := procStatus(t, pid)
	inner := func(st map[string][]string, key string) int {
		f := st[key]
		if len(f) == 0 {
			t.Fatalf("pid %d: no %s in /proc/%d/status", pid, key, pid)
		}
		return atoi(t, f[len(f)-1])
	}
	ids := fixture.IDs{Pid: inner(st, "NSpid"), Pgid: inner(st, "NSpgid"), Sid: inner(st, "NSsid")}
	if ppid := atoi(t, st["PPid"][0]); ppid > 0 && pidNSOf(ppid) == pidNSOf(pid) {
		ids.PPid = inner(procStatus(t, ppid), "NSpid")
	}
	return ids
}

// nsMembers maps the pid in init's PID namespace of every process there
// (zombies included) to ours.
func nsMembers(t *testing.T, init int) map[int]int {
	t.Helper()
	ns := pidNSOf(init)
	if ns == "" || ns == pidNSOf(os.Getpid()) {
		t.Fatalf("pid %d is not in a PID namespace of its own (%q)", init, ns)
	}
	out := map[int]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pidNSOf(pid) != ns {
			continue
		}
		f := procStatus(t, pid)["NSpid"]
		out[atoi(t, f[len(f)-1])] = pid
	}
	return out
}

// expectNSIDs checks that the namespace of init holds a process with each
// of the saved ids (by its pid there), and that the PIDs here are others.
func expectNSIDs(t *testing.T, init int, saved map[string]fixture.IDs) {
	t.Helper()
	members := nsMembers(t, init)
	for name, want := range saved {
		pid := members[want.Pid]
		if pid == 0 {
			t.Errorf("%s: no pid %d in the new namespace (it has %v)", name, want.Pid, members)
			continue
		}
		if got := nsIDs(t, pid); got != want {
			t.Errorf("%s (pid %d here): ids in the namespace %+v, want %+v", name, pid, got, want)
		}
		if pid == want.Pid && want.Pid != 1 {
			t.Errorf("%s: pid %d here too, while the original holds it", name, pid)
		}
	}
}

// pidtreeReports reads pidtree's reports from l until every member has
// made n of them and, each time, returns the last of each; a FAIL line
// or any other line fails the test, except the lines of expected.
func pidtreeReports(t *testing.T, l *fixture.Lines, n int, expected ...string) map[string]fixture.PidtreeReport {
	t.Helper()
	last := map[string]fixture.PidtreeReport{}
	count := map[string]int{}
	for count["root"] < n || count["kid"] < n || count["grandkid"] < n {
		line, err := l.Next(waitFor)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(expected, line) {
			continue
		}
		r, ok := fixture.ParsePidtree(line)
		if !ok {
			t.Fatalf("got %q", line)
		}
		last[r.Name] = r
		count[r.Name]++
	}
	return last
}

// freezePidtree starts pidtree and, once each member has reported twice,
// freezes the tree without -halt (the originals keep their PIDs). It
// returns the original, the ids each member reported and the snapshot.
func freezePidtree(t *testing.T) (*fixture.Proc, map[string]fixture.IDs, string) {
	t.Helper()
	var kids []int // die with the root (PR_SET_PDEATHSIG), after the group's cleanup
	t.Cleanup(func() {
		for _, pid := range kids {
			fixture.WaitExit(pid, waitFor)
		}
	})
	p := fixture.StartGroup(t, fixture.Build(t, "pidtree"))
	saved := map[string]fixture.IDs{}
	for name, r := range pidtreeReports(t, p.Lines, 2) {
		saved[name] = r.IDs
		if name != "root" {
			kids = append(kids, r.Pid)
		}
	}
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	return p, saved, snap
}

// TestPidtreePIDNamespace: pidtree (a root, a kid leading its own group,
// a grandkid leading its own session, parents signalling children by
// PID) is cloned into a new PID namespace while the original runs on.
// Each member sees its saved pid, ppid, pgid and sid — the root's parent
// and session, outside the tree, are held by stand-ins — and the signals
// each parent sends by PID reach the restored child, not the original.
func TestPidtreePIDNamespace(t *testing.T) {
	needRoot(t)
	p, saved, snap := freezePidtree(t)
	th := thaw(t, "-src", snap, "-pidns")
	first := pidtreeReports(t, th.out, 1)
	later := pidtreeReports(t, th.out, 3)
	for name, want := range saved {
		if got := later[name].IDs; got != want {
			t.Errorf("%s reports %+v after the thaw, want %+v", name, got, want)
		}
	}
	for _, name := range []string{"kid", "grandkid"} {
		if later[name].Usr1 <= first[name].Usr1 {
			t.Errorf("%s received no SIGUSR1 after the thaw (%d, then %d)", name, first[name].Usr1, later[name].Usr1)
		}
	}
	expectNSIDs(t, th.restoredPid(t), saved)
	// The root's session is held by a stand-in unless its leader is
	// outside this PID namespace (sid 0: CI may run in a container whose
	// session leader is outside it), init (1) or the root itself; its
	// parent unless that is outside (0), init (1) or the session leader.
	root := saved["root"]
	var held []string
	if root.Sid > 1 && root.Sid != root.Pid {
		held = append(held, fmt.Sprintf("session %d", root.Sid))
	}
	if root.PPid > 1 && root.PPid != root.Sid {
		held = append(held, fmt.Sprintf("parent %d", root.PPid))
	}
	want := "; stand-ins hold its " + strings.Join(held, ", ") + ")"
	if len(held) == 0 {
		want = "on this host)"
	}
	if msg := th.stderr.String(); !strings.Contains(msg, want) {
		t.Errorf("pthaw stderr %q does not name the stand-ins (want %q)", msg, want)
	}
	pidtreeReports(t, p.Lines, 1) // the originals carry on
}

// TestPipelineTreePIDNamespace clones sh -c 'producer | consumer' with
// lines buffered in the pipe between them into a new PID namespace while
// the original runs on: the three keep their PIDs, groups and sessions
// there, and the consumer reads every line once, in order.
func TestPipelineTreePIDNamespace(t *testing.T) {
	needRoot(t)
	pl := fixture.Pipeline(t)
	last := atoi(t, pl.Lines.Expect(t, `^got (\d+)$`, waitFor)[1])
	saved := map[string]fixture.IDs{}
	for name, pid := range map[string]int{"sh": pl.Pid(), "producer": pl.Producer, "consumer": pl.Consumer} {
		saved[name] = nsIDs(t, pid)
	}
	if err := syscall.Kill(pl.Consumer, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the producer fills the pipe meanwhile
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(pl.Pid()), "-tree", "-dest", snap)
	syscall.Kill(pl.Consumer, syscall.SIGCONT)
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil || !regexp.MustCompile(`pipe \d+ size \d+ buffered [1-9]`).Match(desc) {
		t.Errorf("snapshot has no buffered pipe data (%v)", err)
	}
	th := thaw(t, "-src", snap, "-pidns")
	consumerFlows(t, th, last, 10)
	expectNSIDs(t, th.restoredPid(t), saved)
	pl.Lines.Expect(t, `^got \d+$`, waitFor) // the original carries on
}

// TestForkServerTreePIDNamespace restores one forkserver snapshot twice,
// at once, each into a namespace of its own, while the original runs on:
// three trees with the same PIDs, each counting in a page its three
// processes share. Then a worker of the first is killed: its parent
// reports it by its saved PID and exits 1, and that status travels up
// through the stand-ins and init to pthaw; the namespace goes with it.
func TestForkServerTreePIDNamespace(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "forkserver"))
	m := p.Lines.Expect(t, `^workers (\d+) (\d+)$`, waitFor)
	_, s0, a0, b0 := forkTick(t, p.Lines)
	saved := map[string]fixture.IDs{"parent": nsIDs(t, p.Pid())}
	for i, w := range m[1:] {
		saved[fmt.Sprintf("worker %d", i+1)] = nsIDs(t, atoi(t, w))
	}
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	var thaws []*thawed
	var members []map[int]int
	for i := 0; i < 2; i++ {
		th := thaw(t, "-src", snap, "-pidns")
		var s, a, b int
		for j := 0; j < 5; j++ {
			_, s, a, b = forkTick(t, th.out)
		}
		if s <= s0 || a <= a0 || b <= b0 {
			t.Errorf("thaw %d: shared=%d w1=%d w2=%d, want each above shared=%d w1=%d w2=%d", i, s, a, b, s0, a0, b0)
		}
		init := th.restoredPid(t)
		expectNSIDs(t, init, saved)
		thaws, members = append(thaws, th), append(members, nsMembers(t, init))
	}
	if thaws[0].restoredPid(t) == thaws[1].restoredPid(t) {
		t.Errorf("two thaws share init %d", thaws[0].restoredPid(t))
	}
	w1, w2 := saved["worker 1"].Pid, saved["worker 2"].Pid
	if err := syscall.Kill(members[0][w2], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	thaws[0].out.Expect(t, fmt.Sprintf(`^FAIL worker %d exited 9$`, w2), waitFor)
	if code := thaws[0].exit(t); code != 1 {
		t.Errorf("pthaw exit code %d, want 1 (the root's)", code)
	}
	if fixture.Alive(members[0][w1]) {
		t.Errorf("worker %d (pid %d here) outlived its namespace's init", w1, members[0][w1])
	}
	forkTick(t, thaws[1].out) // the other copy and the original carry on
	forkTick(t, p.Lines)
}

// TestZombieTreePIDNamespace: a process with two unreaped children (one
// exited 3, one killed by SIGTERM), cloned into a new PID namespace: there
// both are zombies again with their saved PIDs and wait statuses, children
// of the restored parent.
func TestZombieTreePIDNamespace(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, "/bin/sh", "-c", `(exit 3) & sh -c 'kill -TERM $$' & exec "$0" 5`, fixture.Build(t, "countforever"))
	p.Lines.Expect(t, `^\d+$`, waitFor)
	var zombies []int
	for deadline := time.Now().Add(waitFor); len(zombies) < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no two zombie children of %d (have %v)", p.Pid(), zombies)
		}
		zombies = zombiesOf(p.Pid())
	}
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	th := thaw(t, "-src", snap, "-pidns")
	th.out.Expect(t, `^\d+$`, waitFor)
	members := nsMembers(t, th.restoredPid(t))
	root := members[p.Pid()]
	if root == 0 {
		t.Fatalf("no pid %d in the new namespace (it has %v)", p.Pid(), members)
	}
	for _, z := range zombies {
		st, want := statOf(t, members[z]), statOf(t, z)
		if members[z] == 0 || st[0] != "Z" || atoi(t, st[1]) != root || st[52-3] != want[52-3] {
			t.Errorf("pid %d in the namespace (%d here): state %s ppid %s exit status %s, want Z, %d, %s",
				z, members[z], st[0], st[1], st[52-3], root, want[52-3])
		}
	}
	th.out.Expect(t, `^\d+$`, waitFor)
}

// TestThreadsTreePIDNamespace: sh and its child threads8 (eight counting
// pthreads), cloned into a new PID namespace while the original runs on:
// every thread has its saved TID there, and the counting goes on.
func TestThreadsTreePIDNamespace(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, "/bin/sh", "-c", `"$0" & wait`, fixture.Build(t, "threads8"))
	m := p.Lines.Expect(t, `^threads 8 tids=([\d,]+)$`, waitFor)
	p.Lines.Expect(t, `^tick 2 `, waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("sh %d has children %v (%v), want threads8", p.Pid(), kids, err)
	}
	want := append([]string{strconv.Itoa(kids[0])}, strings.Split(m[1], ",")...)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	th := thaw(t, "-src", snap, "-pidns")
	for i := 0; i < 3; i++ {
		if line := th.out.Expect(t, `^(tick \d+ total=\d+|FAIL.*)$`, waitFor)[0]; strings.HasPrefix(line, "FAIL") {
			t.Fatalf("got %q after the thaw", line)
		}
	}
	threads8 := nsMembers(t, th.restoredPid(t))[kids[0]]
	if threads8 == 0 {
		t.Fatalf("no pid %d in the new namespace", kids[0])
	}
	var got []string
	for _, tid := range tasksOf(t, threads8) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", threads8, tid))
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(regexp.MustCompile(`(?m)^NSpid:(.*)$`).FindStringSubmatch(string(b))[1])
		got = append(got, f[len(f)-1])
	}
	sort.Strings(got)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("threads in the namespace %v, want %v", got, want)
	}
}

// TestContainerInitTree: a pipeline frozen inside a container (its own
// PID and mount namespaces, with the shell as pid 1), by a pfreeze run
// inside it, is restored with -pidns: the shell is the new namespace's
// init, pid 1 with no parent, group or session visible there, as it was,
// its children have their PIDs, and the data flows on.
func TestContainerInitTree(t *testing.T) {
	needRoot(t)
	unshare, err1 := exec.LookPath("unshare")
	nsenter, err2 := exec.LookPath("nsenter")
	if err1 != nil || err2 != nil {
		t.Skip("unshare or nsenter (util-linux) not installed")
	}
	prod, cons := fixture.Build(t, "producer"), fixture.Build(t, "consumer")
	c := fixture.StartGroup(t, unshare, "--pid", "--fork", "--mount-proc", "/bin/sh", "-c", `"$0" | "$1"`, prod, cons)
	last := atoi(t, c.Lines.Expect(t, `^got (\d+)$`, waitFor)[1])
	kids, err := fixture.Children(c.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v), want the container's init", c.Pid(), kids, err)
	}
	sh := kids[0]
	saved := map[string]fixture.IDs{"sh": nsIDs(t, sh)}
	if saved["sh"] != (fixture.IDs{Pid: 1}) {
		t.Fatalf("the container's shell has ids %+v, want pid 1 and nothing else visible", saved["sh"])
	}
	pipeline, _ := fixture.Children(sh)
	for _, pid := range pipeline {
		saved[fmt.Sprint("pid ", pid)] = nsIDs(t, pid)
	}
	if len(saved) != 3 {
		t.Fatalf("the container's shell has children %v, want producer and consumer", pipeline)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	fr := exec.Command(nsenter, "-t", strconv.Itoa(sh), "-p", "-m", filepath.Join(binDir, "pfreeze"), "-pid", "1", "-tree", "-dest", snap)
	if out, err := fr.CombinedOutput(); err != nil {
		t.Fatalf("pfreeze inside the container: %v: %s", err, out)
	}
	th := thaw(t, "-src", snap, "-pidns")
	consumerFlows(t, th, last, 5)
	init := th.restoredPid(t)
	expectNSIDs(t, init, saved)
	if got := nsIDs(t, init); got.Pid != 1 {
		t.Errorf("pthaw's child is pid %d in its namespace, want 1 (the shell itself)", got.Pid)
	}
	if msg := th.stderr.String(); !strings.Contains(msg, "root pid 1, the namespace's init") {
		t.Errorf("pthaw stderr %q does not say the root is the namespace's init", msg)
	}
	c.Lines.Expect(t, `^got \d+$`, waitFor) // the original carries on
}

// TestContainerInitProcess: a single process that was its container's
// init (pid 1), frozen from inside, restored with -pidns is the new
// namespace's init itself, pthaw's child, and pthaw passes on its status.
func TestContainerInitProcess(t *testing.T) {
	needRoot(t)
	unshare, err1 := exec.LookPath("unshare")
	nsenter, err2 := exec.LookPath("nsenter")
	if err1 != nil || err2 != nil {
		t.Skip("unshare or nsenter (util-linux) not installed")
	}
	c := fixture.StartGroup(t, unshare, "--pid", "--fork", "--mount-proc", fixture.Build(t, "countforever"), "5")
	last := atoi(t, c.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
	kids, err := fixture.Children(c.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v), want the container's init", c.Pid(), kids, err)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	fr := exec.Command(nsenter, "-t", strconv.Itoa(kids[0]), "-p", "-m", filepath.Join(binDir, "pfreeze"), "-pid", "1", "-dest", snap)
	if out, err := fr.CombinedOutput(); err != nil {
		t.Fatalf("pfreeze inside the container: %v: %s", err, out)
	}
	th := thaw(t, "-src", snap, "-pidns")
	if n := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1]); n <= last {
		t.Errorf("restored process printed %d, want more than %d", n, last)
	}
	init := th.restoredPid(t)
	if got := nsIDs(t, init); got != (fixture.IDs{Pid: 1}) {
		t.Errorf("pthaw's child has ids %+v in its namespace, want pid 1 and nothing else visible", got)
	}
	if msg := th.stderr.String(); !strings.Contains(msg, "restored as pid 1, the init of a new PID namespace") {
		t.Errorf("pthaw stderr %q does not say the process is the namespace's init", msg)
	}
	syscall.Kill(init, syscall.SIGKILL)
	if code := th.exit(t); code != 128+int(syscall.SIGKILL) {
		t.Errorf("pthaw exit code %d, want %d", code, 128+int(syscall.SIGKILL))
	}
}

// TestBadTreePIDNamespace feeds pthaw -pidns damaged snapshots of the
// forkserver tree, whose PIDs the running original holds: each fails with
// one line, and leaves no process behind, nor the namespace it made.
func TestBadTreePIDNamespace(t *testing.T) {
	mine := pidNSOf(os.Getpid())
	restoreDamagedTree(t, "-pidns", 4, func(t *testing.T, p *fixture.Proc, bin string, _ int) {
		for _, pid := range orphans(p.Pid()) {
			t.Errorf("pid %d (%s, PID namespace %s) left behind", pid, commOf(pid), pidNSOf(pid))
			unix.Kill(pid, unix.SIGKILL)
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, 0, nil)
		}
		for _, pid := range processesOf(bin) {
			if ns := pidNSOf(pid); ns != mine {
				t.Errorf("pid %d (%s) left behind in PID namespace %s", pid, commOf(pid), ns)
			}
		}
	})
}

// forkserverSnapshot starts a forkserver tree, waits for it to tick and
// freezes it with -tree (it runs on); it returns the tree, its binary and
// the snapshot's bytes.
func forkserverSnapshot(t *testing.T) (*fixture.Proc, string, []byte) {
	t.Helper()
	bin := fixture.Build(t, "forkserver")
	p := fixture.StartGroup(t, bin)
	forkTick(t, p.Lines)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	good, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	return p, bin, good
}

// restoreDamagedTree freezes a running forkserver tree (its PIDs stay
// taken) and runs pthaw with flag on 24 damaged copies of the snapshot
// (seeded with seed): each must fail with one line on stderr; then
// leftovers looks for what it left (given the original, its binary and
// how many processes ran it before). While it runs the test is a child
// subreaper, so that whatever pthaw leaves behind becomes its child
// instead of hiding under PID 1.
func restoreDamagedTree(t *testing.T, flag string, seed int64, leftovers func(t *testing.T, p *fixture.Proc, bin string, originals int)) {
	needRoot(t)
	p, bin, good := forkserverSnapshot(t)
	originals := len(processesOf(bin))
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	hdr := bytes.IndexByte(good, '\n') + 1
	cases := map[string][]byte{}
	damage(cases, good, hdr, hdr, rand.New(rand.NewSource(seed)))
	dir := t.TempDir()
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(name, " ", "_"))
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(filepath.Join(binDir, "pthaw"), flag, "-src", path)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Run(); err == nil {
				t.Fatalf("pthaw %s accepted a damaged snapshot", flag)
			}
			if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pthaw: ") {
				t.Errorf("stderr %q, want one line starting with \"pthaw: \"", msg)
			}
			leftovers(t, p, bin, originals)
		})
	}
	forkTick(t, p.Lines) // the original carries on
}

// orphans returns our children, zombies included, other than except.
func orphans(except int) []int {
	var out []int
	me := strconv.Itoa(os.Getpid())
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == except {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
		if len(f) > 1 && f[1] == me {
			out = append(out, pid)
		}
	}
	return out
}

func commOf(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

// TestUnixPairTreePIDNamespace clones a parent and the child it forked
// after socketpair (a stream and a datagram pair, bytes queued both ways)
// into a new PID namespace while the original runs on: each member takes
// its end from pthaw through a pidfd of pthaw it reopened by /proc (it
// cannot name pthaw's PID there); each reads what the other had sent
// before the freeze, and they still talk.
func TestUnixPairTreePIDNamespace(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "unixpair"), "tree")
	p.Lines.Expect(t, `^ready$`, waitFor)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	th := thaw(t, "-src", snap, "-pidns")
	members := nsMembers(t, th.restoredPid(t))
	root := members[p.Pid()]
	if root == 0 {
		t.Fatalf("no pid %d in the new namespace (it has %v)", p.Pid(), members)
	}
	if err := syscall.Kill(root, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for i := 0; i < 2; i++ {
		line, err := th.out.Next(waitFor)
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		got[line] = true
	}
	if !got["ok"] || !got["child ok"] {
		t.Fatalf("the copies said %v, want ok and child ok", got)
	}
	if code := th.exit(t); code != 0 {
		t.Errorf("pthaw exit code %d, want 0 (the root's)", code)
	}
}
