package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
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

// A workload that is its own PID namespace (nsinit: an init as pid 1 and
// a worker under it), frozen from this host's namespace with -tree on its
// init and restored with -pidns, again and again: its PIDs are those of
// the namespace, taken here by nothing (all of them are free in a new
// one), so every move keeps them.

// nsinitIDs are the ids nsinit's init and worker see in their namespace.
type nsinitIDs struct{ init, worker fixture.IDs }

var (
	// nsinitOwn: init leads its session, the worker its group.
	nsinitOwn = nsinitIDs{fixture.IDs{Pid: 1, Pgid: 1, Sid: 1}, fixture.IDs{Pid: 2, PPid: 1, Pgid: 2, Sid: 1}}
	// nsinitOutside (nsinit outside): both are in a group and session led
	// from outside the namespace, which read 0 there.
	nsinitOutside = nsinitIDs{fixture.IDs{Pid: 1}, fixture.IDs{Pid: 2, PPid: 1}}
)

// startNsinit starts nsinit with args and returns it, the init of its
// namespace (our pid) and the worker's first report, with ids. The init
// is killed at cleanup if it still runs (out of the reach of the
// fixture's cleanup, which kills nsinit only), and nsinit left to reap
// it and exit.
func startNsinit(t *testing.T, ids fixture.IDs, args ...string) (*fixture.Proc, int, fixture.NsinitReport) {
	t.Helper()
	p := fixture.Start(t, fixture.Build(t, "nsinit"), args...)
	r := nsinitNext(t, p.Lines, 1, "", ids)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("nsinit %d has children %v (%v), want its namespace's init", p.Pid(), kids, err)
	}
	init := kids[0]
	t.Cleanup(func() { p.Wait(waitFor) })
	killNSAtCleanup(t, init)
	return p, init, r
}

// killNSAtCleanup kills init, and so its PID namespace, at cleanup if it
// is still that namespace's init.
func killNSAtCleanup(t *testing.T, init int) {
	ns := pidNSOf(init)
	t.Cleanup(func() {
		if ns != "" && pidNSOf(init) == ns {
			syscall.Kill(init, syscall.SIGKILL)
		}
	})
}

// nsTIDs returns the TIDs process pid (ours) has in its own PID
// namespace, sorted.
func nsTIDs(t *testing.T, pid int) []int {
	t.Helper()
	tasks, err := fixture.Tasks(pid)
	if err != nil {
		t.Fatalf("pid %d: %v", pid, err)
	}
	var out []int
	for _, tid := range tasks {
		f := procStatus(t, tid)["NSpid"]
		out = append(out, atoi(t, f[len(f)-1]))
	}
	sort.Ints(out)
	return out
}

// nsinitNext reads the next line of l, which must be the worker's report
// number count (any, for 0) with ids and heap checksum sum (any, for "").
func nsinitNext(t *testing.T, l *fixture.Lines, count int, sum string, ids fixture.IDs) fixture.NsinitReport {
	t.Helper()
	line, err := l.Next(waitFor)
	if err != nil {
		t.Fatalf("nsinit: %v (last lines %q)", err, l.Last())
	}
	r, ok := fixture.ParseNsinit(line)
	if !ok {
		t.Fatalf("nsinit printed %q", line)
	}
	if count != 0 && r.Count != count {
		t.Fatalf("nsinit counted %d, want %d", r.Count, count)
	}
	if r.IDs != ids {
		t.Fatalf("nsinit worker sees ids %+v, want %+v", r.IDs, ids)
	}
	if sum != "" && r.Sum != sum {
		t.Fatalf("nsinit heap checksum %s, want %s", r.Sum, sum)
	}
	return r
}

// nsinitToEnd reads the halted workload's reports to the end of l, each
// the next count after last, and returns the last count.
func nsinitToEnd(t *testing.T, l *fixture.Lines, last int, sum string) int {
	t.Helper()
	for {
		line, err := l.Next(waitFor)
		if errors.Is(err, io.EOF) {
			return last
		}
		if err != nil {
			t.Fatalf("the halted workload: %v", err)
		}
		r, ok := fixture.ParseNsinit(line)
		if !ok || r.Count != last+1 || r.Sum != sum {
			t.Fatalf("the halted workload printed %q after count %d", line, last)
		}
		last = r.Count
	}
}

// TestPIDNamespaceAgainAndAgain: a PID namespace is frozen with -halt and
// restored with -pidns three times (through a file, a unix socket, a
// file), each time from the namespace the last restore made: the worker
// sees the same ids, TIDs and heap, and its count goes on with no gap and
// no repeat. Then it exits 7: its init exits 7, and so does pthaw.
func TestPIDNamespaceAgainAndAgain(t *testing.T) {
	nsinitRounds(t, nsinitOwn, nil, "file", "unix", "file")
}

// TestPIDNamespaceOutsideSession: the same, once, with a namespace whose
// processes keep a group and session led from outside it (0 there): so
// they stay after the move, pthaw's.
func TestPIDNamespaceOutsideSession(t *testing.T) {
	nsinitRounds(t, nsinitOutside, []string{"outside"}, "file")
}

// nsinitRounds starts nsinit with args, its processes seeing ids, and
// moves its namespace once through each of dests (file or unix), then
// has it exit 7.
func nsinitRounds(t *testing.T, ids nsinitIDs, args []string, dests ...string) {
	needRoot(t)
	p, init, first := startNsinit(t, ids.worker, args...)
	sum, last := first.Sum, first.Count
	tids := nsTIDs(t, nsMembers(t, init)[2])
	if len(tids) != 2 || tids[0] != 2 {
		t.Fatalf("nsinit's worker has TIDs %v in its namespace, want 2 and its thread's", tids)
	}
	out, exitCode := p.Lines, func() int {
		code, err := p.Wait(waitFor)
		if err != nil {
			t.Fatalf("nsinit: %v", err)
		}
		return code
	}
	var th *thawed
	for i, dest := range dests {
		round := i + 1
		last = nsinitNext(t, out, last+1, sum, ids.worker).Count
		var next *thawed
		args := []string{"-pid", strconv.Itoa(init), "-tree", "-halt"}
		if dest == "file" {
			snap := filepath.Join(t.TempDir(), "snap")
			freeze(t, append(args, "-dest", snap)...)
			next = thaw(t, "-src", snap, "-pidns")
		} else {
			sock := filepath.Join(t.TempDir(), "sock")
			next = thaw(t, "-src", "unix:"+sock, "-pidns")
			next.listening(t)
			freeze(t, append(args, "-dest", "unix:"+sock)...)
		}
		last = nsinitToEnd(t, out, last, sum)
		if code := exitCode(); code != 128+int(syscall.SIGKILL) {
			t.Errorf("round %d: the halted namespace's %s exit code %d, want %d", round,
				map[bool]string{true: "nsinit", false: "pthaw"}[th == nil], code, 128+int(syscall.SIGKILL))
		}
		th = next
		last = nsinitNext(t, th.out, last+1, sum, ids.worker).Count
		init = th.restoredPid(t)
		killNSAtCleanup(t, init)
		expectNSIDs(t, init, map[string]fixture.IDs{"init": ids.init, "worker": ids.worker})
		if got := nsTIDs(t, nsMembers(t, init)[2]); !slices.Equal(got, tids) {
			t.Errorf("round %d: the worker's TIDs in its namespace are %v, want %v", round, got, tids)
		}
		if msg := th.stderr.String(); !strings.Contains(msg, "root pid 1, the namespace's init") {
			t.Errorf("round %d (%s): pthaw stderr %q does not say the root is the namespace's init", round, dest, msg)
		}
		out, exitCode = th.out, func() int { return th.exit(t) }
	}
	nsinitExit7(t, th, init)
}

// nsinitExit7 has the worker of the namespace of init, restored by th,
// exit 7: its init exits 7, and so does pthaw.
func nsinitExit7(t *testing.T, th *thawed, init int) {
	t.Helper()
	worker := nsMembers(t, init)[2]
	if worker == 0 {
		t.Fatal("no worker in the restored namespace")
	}
	syscall.Kill(worker, syscall.SIGUSR1)
	for {
		line, err := th.out.Next(waitFor)
		if err != nil {
			t.Fatalf("no exit line: %v", err)
		}
		if line == "exit 7" {
			break
		}
		if _, ok := fixture.ParseNsinit(line); !ok {
			t.Fatalf("nsinit printed %q", line)
		}
	}
	if code := th.exit(t); code != 7 {
		t.Errorf("pthaw exit code %d, want 7 (the worker's, through its init)", code)
	}
}

// refusedFreeze runs pfreeze with args, which must fail with one line
// containing want; the snapshot file must not exist.
func refusedFreeze(t *testing.T, want string, args ...string) {
	t.Helper()
	snap := filepath.Join(t.TempDir(), "snap")
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), append(args, "-halt", "-dest", snap)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatalf("pfreeze %v succeeded, want %q", args, want)
	}
	if msg := stderr.String(); !strings.Contains(msg, want) || strings.Count(msg, "\n") != 1 {
		t.Errorf("pfreeze %v: stderr %q, want one line with %q", args, msg, want)
	}
	if _, err := os.Stat(snap); err == nil {
		t.Errorf("pfreeze %v failed but left %s", args, snap)
	}
}

// TestPIDNamespaceRefusals: a process of a child PID namespace that is not
// its init is refused, with or without -tree, with one line naming the
// init to freeze instead; a namespace that a process entered from
// outside (nsenter: setns, then fork) is refused with one line naming it.
// Each time the workload runs on, its count unbroken.
func TestPIDNamespaceRefusals(t *testing.T) {
	needRoot(t)
	p, init, r := startNsinit(t, nsinitOwn.worker)
	worker := nsMembers(t, init)[2]
	if worker == 0 {
		t.Fatal("no worker in nsinit's namespace")
	}
	want := fmt.Sprintf("pfreeze: freeze %d: process is in another pid namespace, as its pid 2 (freeze the namespace's init, pid %d, with -tree)", worker, init)
	refusedFreeze(t, want, "-pid", strconv.Itoa(worker), "-tree")
	refusedFreeze(t, want, "-pid", strconv.Itoa(worker))
	last := nsinitNext(t, p.Lines, 0, r.Sum, nsinitOwn.worker).Count

	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		t.Skip("nsenter (util-linux) not installed")
	}
	fixture.StartGroup(t, nsenter, "-t", strconv.Itoa(init), "-p", fixture.Build(t, "sleeper"), "100")
	var entered int
	for deadline := time.Now().Add(waitFor); entered == 0; {
		for nsPid, pid := range nsMembers(t, init) {
			if nsPid != 1 && nsPid != 2 {
				entered = pid
			}
		}
		if entered == 0 && time.Now().After(deadline) {
			t.Fatalf("no process entered the namespace of %d after %v", init, waitFor)
		}
		time.Sleep(5 * time.Millisecond)
	}
	refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: pid %d is in the pid namespace of %d but not in its tree (entered with setns)", init, entered, init),
		"-pid", strconv.Itoa(init), "-tree")
	for range 2 {
		last = nsinitNext(t, p.Lines, last+1, r.Sum, nsinitOwn.worker).Count
	}
}

// TestPIDNamespaceDetached: a namespace restored with -pidns -detach, its
// init no longer pthaw's child (a workload the agent adopts after a
// restart), is frozen again and restored in the foreground: its count
// goes on, and its exit status reaches pthaw. The test is a child
// subreaper meanwhile, so that the detached init comes back to it to be
// reaped.
func TestPIDNamespaceDetached(t *testing.T) {
	needRoot(t)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	ids := nsinitOwn
	p, init, first := startNsinit(t, ids.worker)
	sum := first.Sum
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-dest", snap)
	last := nsinitToEnd(t, p.Lines, first.Count, sum)

	// The detached workload keeps pthaw's stdout, a pipe we read (pthaw
	// prints the init's PID there too, before or after its first lines),
	// and its stderr, a file: a pipe copied by exec would keep Run
	// waiting for as long as the workload runs.
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { outR.Close() })
	errF, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer errF.Close()
	stderr := func() string { b, _ := os.ReadFile(errF.Name()); return string(b) }
	cmd := exec.Command(filepath.Join(binDir, "pthaw"), "-detach", "-src", snap, "-pidns")
	cmd.Stdout, cmd.Stderr = outW, errF
	err = cmd.Run()
	outW.Close()
	if err != nil {
		t.Fatalf("pthaw -detach: %v: %s", err, stderr())
	}
	out := fixture.FollowReader(t, outR)
	detached, reaped := 0, false
	t.Cleanup(func() {
		if detached > 0 && !reaped {
			syscall.Kill(detached, syscall.SIGKILL)
			var ws unix.WaitStatus
			unix.Wait4(detached, &ws, 0, nil)
		}
	})
	for detached == 0 || last == first.Count {
		line, err := out.Next(waitFor)
		if err != nil {
			t.Fatalf("pthaw -detach: %v: %s", err, stderr())
		}
		if pid, err := strconv.Atoi(line); err == nil {
			detached = pid
			continue
		}
		r, ok := fixture.ParseNsinit(line)
		if !ok || r.Count != last+1 || r.Sum != sum || r.IDs != ids.worker {
			t.Fatalf("the detached workload printed %q after count %d", line, last)
		}
		last = r.Count
	}
	if ppid := atoi(t, procStatus(t, detached)["PPid"][0]); ppid != os.Getpid() {
		t.Fatalf("the detached init %d has parent %d, want us (its subreaper)", detached, ppid)
	}
	expectNSIDs(t, detached, map[string]fixture.IDs{"init": ids.init, "worker": ids.worker})

	snap2 := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(detached), "-tree", "-halt", "-dest", snap2)
	var ws unix.WaitStatus
	if _, err := unix.Wait4(detached, &ws, 0, nil); err != nil {
		t.Fatalf("reap the halted init %d: %v", detached, err)
	}
	reaped = true
	if ws.Signal() != unix.SIGKILL {
		t.Errorf("the halted init %d ended with %#x, want killed by SIGKILL", detached, uint32(ws))
	}
	last = nsinitToEnd(t, out, last, sum)
	th := thaw(t, "-src", snap2, "-pidns")
	nsinitNext(t, th.out, last+1, sum, ids.worker)
	init = th.restoredPid(t)
	killNSAtCleanup(t, init)
	expectNSIDs(t, init, map[string]fixture.IDs{"init": ids.init, "worker": ids.worker})
	nsinitExit7(t, th, init)
}

// TestPIDNamespaceNestedRefused: a namespace holding another (nsinit
// nested: the worker's child is pid 1 of a namespace of its own) is
// refused with one line naming that member, and the nested namespace's
// init, two levels below ours, is refused as such; the workload runs on.
func TestPIDNamespaceNestedRefused(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "nsinit"), "nested")
	p.Lines.Expect(t, `^nested \d+$`, waitFor)
	r := nsinitNext(t, p.Lines, 1, "", nsinitOwn.worker)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("nsinit %d has children %v (%v), want its namespace's init", p.Pid(), kids, err)
	}
	init := kids[0]
	t.Cleanup(func() { p.Wait(waitFor) })
	killNSAtCleanup(t, init)
	worker := nsMembers(t, init)[2]
	inner, err := fixture.Children(worker)
	if err != nil || len(inner) != 1 {
		t.Fatalf("the worker %d has children %v (%v), want the nested namespace's init", worker, inner, err)
	}
	refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: pid %d: process is in a pid namespace nested in the frozen one", init, inner[0]),
		"-pid", strconv.Itoa(init), "-tree")
	refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: process is in a pid namespace nested 2 levels below pfreeze's", inner[0]),
		"-pid", strconv.Itoa(inner[0]), "-tree")
	last := nsinitNext(t, p.Lines, 0, r.Sum, nsinitOwn.worker).Count
	nsinitNext(t, p.Lines, last+1, r.Sum, nsinitOwn.worker)
}
