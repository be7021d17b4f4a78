package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
)

// virtRoot waits for pthaw -virtpid to have started a tree (it says so
// once the members run; they stay traced by pthaw, so restoredPid's test
// does not apply) and returns the root's PID here.
func (th *thawed) virtRoot(t *testing.T) int {
	t.Helper()
	return th.waitChild(t, "tree started with virtual PIDs", func(int) bool {
		return strings.Contains(th.stderr.String(), "virtual PIDs")
	})
}

// restoredAs returns the PID here of the member saved as pid, from what
// pthaw said.
func (th *thawed) restoredAs(t *testing.T, pid int) int {
	t.Helper()
	m := regexp.MustCompile(fmt.Sprintf(`pid %d is taken on this host; restored as pid (\d+)`, pid)).FindStringSubmatch(th.stderr.String())
	if m == nil {
		t.Fatalf("pthaw does not say pid %d was taken: %s", pid, th.stderr.String())
	}
	return atoi(t, m[1])
}

// TestForkServerTreeVirtualPID clones the forkserver tree with -virtpid
// while the original runs on and holds every PID: the clone's members get
// new PIDs here and count on in their own shared page. A restored worker
// killed here is reaped by the restored parent under its saved PID (what
// waitpid returned is translated back), which the parent reports as its
// own worker's; the parent exits, and so does pthaw, with its status,
// taking the other worker with it. The original tree is untouched.
func TestForkServerTreeVirtualPID(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "forkserver"))
	m := p.Lines.Expect(t, `^workers (\d+) (\d+)$`, waitFor)
	w1, w2 := atoi(t, m[1]), atoi(t, m[2])
	forkTick(t, p.Lines)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap) // no -halt: the originals keep their PIDs
	th := thaw(t, "-src", snap, "-virtpid")
	root := th.virtRoot(t)
	r1, r2 := th.restoredAs(t, w1), th.restoredAs(t, w2)
	killTreeAtCleanup(t, root, r1, r2)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	if root == p.Pid() || r1 == w1 || r2 == w2 {
		t.Fatalf("restored as %d (%d, %d) while the originals %d (%d, %d) run", root, r1, r2, p.Pid(), w1, w2)
	}
	if kids, err := fixture.Children(root); err != nil || len(kids) != 2 {
		t.Fatalf("children of the restored root %d: %v %v, want %d and %d", root, kids, err, r1, r2)
	}
	for i := 0; i < 3; i++ {
		forkTick(t, th.out)
	}
	if err := syscall.Kill(r1, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("FAIL worker %d exited %d", w1, int(syscall.SIGKILL))
	line := th.out.Expect(t, `^(FAIL.*)$`, waitFor)[1]
	if line != want {
		t.Fatalf("restored parent says %q, want %q", line, want)
	}
	if code := th.exit(t); code != 1 {
		t.Errorf("pthaw exited with %d, want the root's 1", code)
	}
	// The other worker dies with pthaw (PTRACE_O_EXITKILL): nothing runs
	// on with trapped calls nobody answers.
	if err := fixture.WaitExit(r2, waitFor); err != nil {
		t.Errorf("after pthaw exited: %v", err)
	}
	// The original tree: untouched.
	for _, pid := range []int{p.Pid(), w1, w2} {
		if err := syscall.Kill(pid, 0); err != nil {
			t.Errorf("original pid %d: %v", pid, err)
		}
	}
	forkTick(t, p.Lines)
}

// TestPidtreeVirtualPID: pidtree (a root, a kid leading its own group, a
// grandkid leading its own session, parents signalling children by PID)
// is cloned with -virtpid while the original runs on. Every member gets a
// new PID here, yet reports its saved pid, ppid, pgid and sid (the root's
// parent is pthaw now, as for a single process); the signals each parent
// sends by saved PID reach the restored child, not the original.
func TestPidtreeVirtualPID(t *testing.T) {
	needRoot(t)
	p, saved, snap := freezePidtree(t)
	th := thaw(t, "-src", snap, "-virtpid")
	root := th.virtRoot(t)
	kid, grandkid := th.restoredAs(t, saved["kid"].Pid), th.restoredAs(t, saved["grandkid"].Pid)
	killTreeAtCleanup(t, root, kid, grandkid)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s", th.stderr.String())
		}
	})
	if root == p.Pid() {
		t.Fatalf("restored as pid %d, the original's", root)
	}
	ppid := fmt.Sprintf("FAIL root ppid changed from %d to %d", saved["root"].PPid, th.cmd.Process.Pid)
	first := pidtreeReports(t, th.out, 1, ppid)
	later := pidtreeReports(t, th.out, 3, ppid)
	want := saved
	r := want["root"]
	r.PPid = th.cmd.Process.Pid
	want["root"] = r
	for name, w := range want {
		if got := later[name].IDs; got != w {
			t.Errorf("%s reports %+v after the thaw, want %+v", name, got, w)
		}
	}
	for _, name := range []string{"kid", "grandkid"} {
		if later[name].Usr1 <= first[name].Usr1 {
			t.Errorf("%s received no SIGUSR1 after the thaw (%d, then %d)", name, first[name].Usr1, later[name].Usr1)
		}
	}
	// The originals got one SIGUSR1 per tick of their own parent, none
	// from the clone's.
	orig := pidtreeReports(t, p.Lines, 2)
	for _, name := range []string{"kid", "grandkid"} {
		if o := orig[name]; o.Usr1 > o.Tick+1 {
			t.Errorf("original %s received %d SIGUSR1 by tick %d: the clone's signals reached it", name, o.Usr1, o.Tick)
		}
	}
}

// TestBadTreeVirtualPID feeds pthaw -virtpid damaged snapshots of the
// forkserver tree, whose PIDs the running original holds: each fails with
// one line and leaves no process behind.
func TestBadTreeVirtualPID(t *testing.T) {
	restoreDamagedTree(t, "-virtpid", 5, func(t *testing.T, p *fixture.Proc, bin string, originals int) {
		// pthaw reaps every member itself: none comes to us, not even
		// as a zombie (TestBadTreeReaped).
		for _, pid := range orphans(p.Pid()) {
			t.Errorf("pid %d (%s) left behind", pid, commOf(pid))
			unix.Kill(pid, unix.SIGKILL)
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, 0, nil)
		}
		if n := len(processesOf(bin)); n != originals {
			t.Errorf("%d processes of %s, want the %d originals", n, bin, originals)
		}
	})
}

// TestShellVirtualPID clones, with -virtpid, a shell with a background
// child that forks and execs a new child every tick: those children,
// made after the thaw, keep their own (new) PIDs, but inherit the
// virtualisation, so each reports its parent, the restored shell, by the
// shell's saved PID.
func TestShellVirtualPID(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, "/bin/sh", "-c", `sleep 1000 & while :; do echo "me $$"; sh -c 'echo "ppid $PPID"'; sleep 0.1; done`)
	me := atoi(t, p.Lines.Expect(t, `^me (\d+)$`, waitFor)[1])
	if got := atoi(t, p.Lines.Expect(t, `^ppid (\d+)$`, waitFor)[1]); got != me {
		t.Fatalf("before the freeze: the shell's child says its parent is %d, want %d", got, me)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	th := thaw(t, "-src", snap, "-virtpid")
	root := th.virtRoot(t)
	kids, _ := fixture.Children(root)
	killTreeAtCleanup(t, root, kids...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pthaw's stderr: %s; output: %q", th.stderr.String(), th.out.Drain())
		}
	})
	if root == me {
		t.Fatalf("restored as pid %d, the original's", root)
	}
	for i := 0; i < 3; i++ {
		if got := atoi(t, th.out.Expect(t, `^ppid (\d+)$`, waitFor)[1]); got != me {
			t.Fatalf("after the thaw: a new child of the shell (pid %d here) says its parent is %d, want the saved %d", root, got, me)
		}
	}
}

// BenchmarkVirtualPIDTree reports what the pid calls of a tree member
// cost under -virtpid (us/getpid through the listener, us/wait4 through
// two ptrace stops, us/getuid not trapped) next to the same calls in the
// original, which runs on meanwhile. Run with make bench.
func BenchmarkVirtualPIDTree(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	rx := `^getpid ([\d.]+) getuid ([\d.]+) wait4 ([\d.]+)$`
	var orig, virt [3]float64
	for i := 0; i < b.N; i++ {
		p := fixture.StartGroup(b, fixture.Build(b, "pidcalls"))
		p.Lines.Expect(b, rx, waitFor)
		snap := filepath.Join(b.TempDir(), "snap")
		fr := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
		if out, err := fr.CombinedOutput(); err != nil {
			b.Fatalf("pfreeze: %v: %s", err, out)
		}
		th := thawCmd(b, exec.Command(filepath.Join(binDir, "pthaw"), "-src", snap, "-virtpid"))
		for j := 0; j < 3; j++ { // the first lines may predate the thaw
			m := th.out.Expect(b, rx, waitFor)
			o := p.Lines.Expect(b, rx, waitFor)
			if j == 2 {
				for k := range virt {
					v, _ := strconv.ParseFloat(m[k+1], 64)
					w, _ := strconv.ParseFloat(o[k+1], 64)
					virt[k] += v
					orig[k] += w
				}
			}
		}
	}
	for k, name := range []string{"getpid", "getuid", "wait4"} {
		b.ReportMetric(virt[k]/float64(b.N), "us/"+name)
		b.ReportMetric(orig[k]/float64(b.N), "us/"+name+"-orig")
	}
}

// TestZombieTreeVirtualPID clones, with -virtpid, a process with two
// unreaped children (one exited with status 3, one killed by SIGTERM)
// while the original holds their PIDs: restored as zombies with new PIDs,
// they are reaped by the restored parent under their saved PIDs, with
// their statuses.
func TestZombieTreeVirtualPID(t *testing.T) {
	needRoot(t)
	py := fixture.Python(t)
	p := fixture.StartGroup(t, py, "-c", `import os, signal, sys, time
a = os.fork()
if a == 0:
    os._exit(3)
b = os.fork()
if b == 0:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    os._exit(0)
print("kids", a, b, flush=True)
sys.stdin.readline()
for _ in range(2):
    pid, st = os.wait()
    print("reaped", pid, "exit", os.waitstatus_to_exitcode(st), flush=True)
time.sleep(60)`)
	m := p.Lines.Expect(t, `^kids (\d+) (\d+)$`, waitFor)
	a, b := atoi(t, m[1]), atoi(t, m[2])
	deadline := time.Now().Add(waitFor)
	for len(zombiesOf(p.Pid())) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no two zombie children of %d", p.Pid())
		}
		time.Sleep(10 * time.Millisecond)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	th := thaw(t, "-src", snap, "-virtpid")
	root := th.virtRoot(t)
	killTreeAtCleanup(t, root)
	if th.restoredAs(t, a) == a || th.restoredAs(t, b) == b {
		t.Fatalf("zombies restored with the originals' PIDs")
	}
	fmt.Fprintln(th.stdin, "go")
	got := map[string]bool{}
	for i := 0; i < 2; i++ {
		got[th.out.Expect(t, `^reaped .*$`, waitFor)[0]] = true
	}
	for _, want := range []string{fmt.Sprintf("reaped %d exit 3", a), fmt.Sprintf("reaped %d exit -15", b)} {
		if !got[want] {
			t.Errorf("restored parent says %v, want %q", got, want)
		}
	}
	if z := zombiesOf(p.Pid()); len(z) != 2 {
		t.Errorf("the original's zombies: %v, want 2", z)
	}
}
