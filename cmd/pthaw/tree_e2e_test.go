package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// haltTreeToFile freezes the tree rooted at p with -tree -halt into a
// file, waits for the root and for others (its descendants) to be gone,
// and returns the file.
func haltTreeToFile(t *testing.T, p *fixture.Proc, others ...int) string {
	t.Helper()
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-halt", "-dest", snap)
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatalf("pid %d still running after pfreeze -tree -halt", p.Pid())
	}
	// Reaped, not only zombies: until then a member keeps its process
	// group's and session's ids, which the restore takes again.
	for _, pid := range others {
		waitReaped(t, pid)
	}
	return snap
}

// killTreeAtCleanup kills, when the test ends and before pthaw is
// stopped, process group pgid and pids (restored members: they hold
// pthaw's stdout and stderr, which pthaw's cleanup waits to be closed) and
// waits for them to exit.
func killTreeAtCleanup(t *testing.T, pgid int, pids ...int) {
	t.Cleanup(func() {
		syscall.Kill(-pgid, syscall.SIGKILL)
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, pid := range pids {
			if err := fixture.WaitExit(pid, waitFor); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
}

// pgidOf returns pid's process group (/proc/PID/stat field 5).
func pgidOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	return atoi(t, f[2])
}

// forkTick reads forkserver's next tick, failing on a FAIL line.
func forkTick(t *testing.T, l *fixture.Lines) (n, s, a, b int) {
	t.Helper()
	m := l.Expect(t, `^(fork tick (\d+) shared=(\d+) w1=(\d+) w2=(\d+)|FAIL.*)$`, waitFor)
	if strings.HasPrefix(m[0], "FAIL") {
		t.Fatalf("got %q", m[0])
	}
	return atoi(t, m[2]), atoi(t, m[3]), atoi(t, m[4]), atoi(t, m[5])
}

// TestForkServerTree moves a parent and its two workers, which count in
// one MAP_SHARED|MAP_ANONYMOUS page: after thaw all three have their PIDs
// and process group, the counts keep growing in the parent's view (the
// page is still shared, not three private copies) and the parent's check
// shared == w1 + w2 keeps holding.
func TestForkServerTree(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "forkserver"))
	m := p.Lines.Expect(t, `^workers (\d+) (\d+)$`, waitFor)
	w1, w2 := atoi(t, m[1]), atoi(t, m[2])
	var s0, a0, b0 int
	for i := 0; i < 3; i++ {
		_, s0, a0, b0 = forkTick(t, p.Lines)
	}
	root := p.Pid()
	snap := haltTreeToFile(t, p, w1, w2)
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, root, w1, w2)
	var s, a, b int
	for i := 0; i < 10; i++ {
		_, s, a, b = forkTick(t, th.out)
	}
	if s <= s0 || a <= a0 || b <= b0 {
		t.Fatalf("after thaw shared=%d w1=%d w2=%d, want each above shared=%d w1=%d w2=%d", s, a, b, s0, a0, b0)
	}
	kids := expectTree(t, th, root, w1, w2)
	for _, pid := range append([]int{root}, kids...) {
		if g := pgidOf(t, pid); g != root {
			t.Errorf("pid %d in process group %d, want %d", pid, g, root)
		}
	}
	if strings.Contains(th.stderr.String(), "taken") {
		t.Errorf("pthaw says: %s", th.stderr.String())
	}
}

// TestPipelineTree moves the shell pipeline sh -c 'producer | consumer'
// with lines waiting in the pipe between them (the consumer is stopped
// for a moment before the freeze): after thaw the same three PIDs carry
// on, and the consumer reads every line exactly once, the buffered ones
// first (it fails on a gap or a repeat).
func TestPipelineTree(t *testing.T) {
	needRoot(t)
	pl := fixture.Pipeline(t)
	root, producer, consumer := pl.Pid(), pl.Producer, pl.Consumer
	last, snap, desc := haltPipeline(t, pl)
	if !regexp.MustCompile(`pipe \d+ size \d+ buffered [1-9]`).Match(desc) {
		t.Errorf("snapshot has no buffered pipe data:\n%s", desc)
	}
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, root, producer, consumer)
	consumerFlows(t, th, last, 10)
	expectTree(t, th, root, producer, consumer)
}

// haltPipeline stops the pipeline's consumer once it has printed a line,
// lets the producer fill what joins them, freezes the tree with -halt and
// returns the consumer's last line, the snapshot and pthaw -debug's
// description of it.
func haltPipeline(t *testing.T, pl *fixture.Tree) (int, string, []byte) {
	t.Helper()
	last := atoi(t, pl.Lines.Expect(t, `^got (\d+)$`, waitFor)[1])
	if err := syscall.Kill(pl.Consumer, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the producer fills the pipe meanwhile
	snap := haltTreeToFile(t, pl.Proc, pl.Producer, pl.Consumer)
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil {
		t.Fatalf("pthaw -debug: %v: %s", err, desc)
	}
	return last, snap, desc
}

// TestFIFOTree is TestPipelineTree through a named FIFO: the data
// buffered in it comes back, the restored producer's stdout names the
// FIFO's path again, and lines keep flowing through it.
func TestFIFOTree(t *testing.T) {
	needRoot(t)
	pl, fifo := fixture.PipelineFIFO(t)
	root, producer, consumer := pl.Pid(), pl.Producer, pl.Consumer
	last, snap, desc := haltPipeline(t, pl)
	if !regexp.MustCompile(`fifo "` + regexp.QuoteMeta(fifo) + `" .* pipe \d+ size \d+ buffered [1-9]`).Match(desc) {
		t.Errorf("snapshot has no FIFO %s with buffered data:\n%s", fifo, desc)
	}
	// While someone else's bytes sit in the FIFO, the saved ones would
	// come on top of them: refused, nothing left behind.
	other, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.WriteString("not ours\n"); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(binDir, "pthaw"), "-src", snap).CombinedOutput()
	other.Close()
	if err == nil || !strings.Contains(string(out), "already holds 9 bytes") || strings.Count(string(out), "\n") != 1 {
		t.Fatalf("pthaw with a busy FIFO: %v: %q", err, out)
	}
	if fixture.Alive(root) {
		t.Fatalf("pid %d runs after a refused thaw", root)
	}
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, root, producer, consumer)
	consumerFlows(t, th, last, 10)
	expectTree(t, th, root, producer, consumer)
	for _, end := range []struct{ pid, fd int }{{producer, 1}, {consumer, 0}} {
		if link, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", end.pid, end.fd)); link != fifo {
			t.Errorf("restored pid %d fd %d is %q, want the FIFO %s", end.pid, end.fd, link, fifo)
		}
	}
}

// statOf returns fields 3.. of /proc/PID/stat (index 0 is the state).
func statOf(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
}

// zombiesOf returns the zombie children of pid (fixture.Children lists
// only live ones).
func zombiesOf(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", n))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		if len(f) > 1 && f[0] == "Z" && f[1] == strconv.Itoa(pid) {
			out = append(out, n)
		}
	}
	return out
}

// TestZombieTree moves a process with three unreaped children, one exited
// with status 3, one killed by SIGTERM, one by SIGKILL (zdtm's zombie00):
// after thaw all are zombies again, children of the restored parent, with
// the same PIDs and wait statuses.
func TestZombieTree(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, "/bin/sh", "-c", `(exit 3) & sh -c 'kill -TERM $$' & sh -c 'kill -KILL $$' & exec "$0" 5`, fixture.Build(t, "countforever"))
	p.Lines.Expect(t, `^\d+$`, waitFor)
	var zombies []int
	deadline := time.Now().Add(waitFor)
	for len(zombies) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("no three zombie children of %d (have %v)", p.Pid(), zombies)
		}
		time.Sleep(10 * time.Millisecond)
		zombies = zombiesOf(p.Pid())
	}
	status := map[int]string{}
	for _, z := range zombies {
		status[z] = statOf(t, z)[52-3]
	}
	root := p.Pid()
	snap := haltTreeToFile(t, p, zombies...)
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, root)
	if _, err := th.out.Match(`^\d+$`, waitFor); err != nil {
		t.Fatalf("%v; pthaw: %s", err, th.stderr.String())
	}
	if got := th.restoredPid(t); got != root {
		t.Errorf("restored root pid %d, want %d", got, root)
	}
	for _, z := range zombies {
		st := statOf(t, z)
		if st[0] != "Z" || atoi(t, st[1]) != root || st[52-3] != status[z] {
			t.Errorf("pid %d after thaw: state %s ppid %s exit status %s, want Z, %d, %s", z, st[0], st[1], st[52-3], root, status[z])
		}
	}
	if want := map[string]bool{"768": true, "15": true, "9": true}; !want[status[zombies[0]]] || !want[status[zombies[1]]] || !want[status[zombies[2]]] {
		t.Errorf("zombies' statuses %v, want 768 (exit 3), 15 (SIGTERM) and 9 (SIGKILL)", status)
	}
	th.out.Expect(t, `^\d+$`, waitFor)
}

// TestTreeFailedFreezeResumes: a tree whose freeze fails after every
// member is stopped (the root, countforever, is already described when
// its child forkserver is refused for a pipe to outside the tree at fd 3)
// is resumed whole, even with -halt: every member carries on.
func TestTreeFailedFreezeResumes(t *testing.T) {
	needRoot(t)
	// The forkserver child holds fd 3 on a file deleted from its path
	// but still linked under another, which pfreeze does not carry (a
	// copy would split it from its other name).
	gone := filepath.Join(t.TempDir(), "gone")
	p := fixture.StartGroup(t, "/bin/sh", "-c", `exec 3>"$2"; ln "$2" "$2.kept"; rm -f "$2"; "$1" & exec 3>&- "$0" 5`,
		fixture.Build(t, "countforever"), fixture.Build(t, "forkserver"), gone)
	p.Lines.Expect(t, `^fork tick 2 `, waitFor)
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-tree", "-halt", "-dest", filepath.Join(t.TempDir(), "snap"))
	out, err := cmd.CombinedOutput()
	msg := string(out)
	if err == nil || strings.Count(msg, "\n") != 1 || !strings.Contains(msg, "fd 3 ("+gone+" (deleted)): file deleted from this path but still linked elsewhere") {
		t.Fatalf("pfreeze: %v: %q, want one line refusing fd 3", err, msg)
	}
	last := 0
	for i := 0; i < 3; i++ {
		n, _, _, _ := forkTick(t, p.Lines)
		if n <= last {
			t.Fatalf("fork tick %d after tick %d", n, last)
		}
		last = n
	}
	p.Lines.Expect(t, `^\d+$`, waitFor)
}

// TestForkServerTreeClone clones the forkserver tree (a checkpoint: the
// original keeps running and holds every PID): the clone's members get
// new PIDs, said on stderr, keep their parent/child links and one process
// group led by the new root, and count on in a page of their own.
func TestForkServerTreeClone(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "forkserver"))
	m := p.Lines.Expect(t, `^workers (\d+) (\d+)$`, waitFor)
	forkTick(t, p.Lines)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-dest", snap)
	th := thaw(t, "-src", snap)
	clone := th.restoredPid(t)
	killTreeAtCleanup(t, clone)
	for i := 0; i < 5; i++ {
		forkTick(t, th.out)
	}
	// Only now is the whole tree built and running: pthaw has a child as
	// soon as it starts building.
	kids, err := fixture.Children(clone)
	if err != nil {
		t.Fatal(err)
	}
	killTreeAtCleanup(t, clone, kids...)
	forkTick(t, p.Lines) // the original carries on too
	if clone == p.Pid() || len(kids) != 2 {
		t.Fatalf("clone %d with children %v (original %d)", clone, kids, p.Pid())
	}
	for _, pid := range append([]int{clone}, kids...) {
		if g := pgidOf(t, pid); g != clone {
			t.Errorf("pid %d in process group %d, want %d", pid, g, clone)
		}
	}
	for _, w := range m[1:] {
		if !strings.Contains(th.stderr.String(), fmt.Sprintf("pid %s is taken on this host; restored as pid", w)) {
			t.Errorf("pthaw stderr %q does not say worker %s got a new pid", th.stderr.String(), w)
		}
	}
}

// TestPipelineTreeOverTCP migrates the shell pipeline on one host through
// a socket with -halt: pthaw builds the tree while the originals, frozen,
// still hold their PIDs, so every member gets a new PID (said on stderr;
// trees are not moved into their PIDs late); the data flows on without a
// gap or a repeat, and the originals are gone.
func TestPipelineTreeOverTCP(t *testing.T) {
	needRoot(t)
	pl := fixture.Pipeline(t)
	last := atoi(t, pl.Lines.Expect(t, `^got (\d+)$`, waitFor)[1])
	th := thaw(t, "-src", "tcp:127.0.0.1:0")
	addr := th.listening(t)
	fr := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(pl.Pid()), "-tree", "-halt", "-compress", "zstd", "-dest", "tcp:"+addr)
	if out, err := fr.CombinedOutput(); err != nil {
		t.Fatalf("pfreeze: %v: %s; pthaw: %s", err, out, th.stderr.String())
	}
	root := th.restoredPid(t)
	killTreeAtCleanup(t, root)
	consumerFlows(t, th, last, 5)
	for _, pid := range []int{pl.Producer, pl.Consumer} {
		if err := fixture.WaitExit(pid, waitFor); err != nil {
			t.Errorf("original: %v", err)
		}
	}
	select {
	case <-pl.Exited():
	case <-time.After(waitFor):
		t.Fatal("the original sh still runs after pfreeze -halt")
	}
	if kids, _ := fixture.Children(root); len(kids) != 2 {
		t.Errorf("restored sh %d has children %v, want 2", root, kids)
	}
}

// TestRedis: a real server from Debian's packages (redis 7: four threads,
// an epoll instance, a pipe to itself, a TCP listener), filled through its
// own protocol, frozen, thawed, and still answering with that data.
func TestRedis(t *testing.T) {
	needRoot(t)
	p, addr := fixture.StartRedisTCP(t)
	for i := 0; i < 1000; i++ {
		if _, err := fixture.RedisDo(addr, fmt.Sprintf("SET key%d value%d", i, i)); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := fixture.RedisDo(addr, "INCRBY counter 41"); err != nil || got != ":41" {
		t.Fatalf("INCRBY: %q, %v", got, err)
	}
	// A one-process tree: -tree carries its pipe to itself.
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-halt", "-dest", snap)
	<-p.Exited()
	th := thaw(t, "-src", snap)
	if got := th.restoredPid(t); got != p.Pid() {
		t.Errorf("restored pid %d, want %d", got, p.Pid())
	}
	var got string
	var err error
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if got, err = fixture.RedisDo(addr, "INCR counter"); err == nil {
			break
		}
	}
	if err != nil || got != ":42" {
		t.Fatalf("INCR after thaw: %q, %v; pthaw: %s", got, err, th.stderr.String())
	}
	for _, i := range []int{0, 500, 999} {
		if got, err := fixture.RedisDo(addr, fmt.Sprintf("GET key%d", i)); err != nil || !strings.Contains(got, fmt.Sprintf("value%d", i)) {
			t.Errorf("GET key%d after thaw: %q, %v", i, got, err)
		}
	}
}

// expectTree checks that pthaw's child is root again and that root's
// children are exactly kids; it returns them.
func expectTree(t *testing.T, th *thawed, root int, kids ...int) []int {
	t.Helper()
	if got := th.restoredPid(t); got != root {
		t.Errorf("restored root pid %d, want %d", got, root)
	}
	got, err := fixture.Children(root)
	if err != nil {
		t.Fatal(err)
	}
	sort.Ints(got)
	want := append([]int(nil), kids...)
	sort.Ints(want)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("children of %d after thaw %v, want %v", root, got, want)
	}
	return got
}

// consumerFlows expects n more "got N" lines of the pipeline's consumer,
// each above the last, and returns the last N.
func consumerFlows(t *testing.T, th *thawed, last, n int) int {
	t.Helper()
	for i := 0; i < n; i++ {
		line := th.out.Expect(t, `^(got (\d+)|FAIL.*|eof.*)$`, waitFor)[0]
		if !strings.HasPrefix(line, "got ") {
			t.Fatalf("after thaw: %q", line)
		}
		got := atoi(t, strings.TrimPrefix(line, "got "))
		if got <= last {
			t.Fatalf("after thaw got %d, want more than %d", got, last)
		}
		last = got
	}
	return last
}
