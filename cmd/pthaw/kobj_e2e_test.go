package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
)

// Kernel objects beyond files and memory (seccomp filters, timers,
// anonymous inodes): each is frozen with -halt, thawed, and checked by
// what it does afterwards.

// debugOf runs pfreeze -debug on pid and returns its description.
func debugOf(t *testing.T, pid int) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(pid), "-debug").CombinedOutput()
	if err != nil {
		t.Fatalf("pfreeze -debug: %v: %s", err, out)
	}
	return string(out)
}

// statusField returns a field of /proc/PID/task/TID/status.
func statusField(t *testing.T, pid, tid int, key string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", pid, tid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + key + `:\s*(.*)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no %s in the status of %d/%d", key, pid, tid)
	}
	return string(m[1])
}

// TestSeccompFilters moves a process under three seccomp filters, two
// shared by its threads (one with SECCOMP_FILTER_FLAG_LOG) and one of its
// second thread alone: after the thaw each thread's calls are still
// refused with the errno its filters give, and the other calls still work.
func TestSeccompFilters(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "seccomp"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	p.WriteLine("check")
	p.Lines.Expect(t, `^main EPERM EACCES ok$`, waitFor)
	p.Lines.Expect(t, `^thread EPERM EACCES EXDEV$`, waitFor)
	desc := debugOf(t, p.Pid())
	if n := len(regexp.MustCompile(`(?m)^Seccomp filter \d+: 7 instructions`).FindAllString(desc, -1)); n != 2 {
		t.Errorf("pfreeze -debug shows %d shared seccomp filters, want 2:\n%s", n, desc)
	}
	if !regexp.MustCompile(`(?m)^  Seccomp filter 0: 7 instructions flags 0x0`).MatchString(desc) {
		t.Errorf("pfreeze -debug does not show the thread's own filter:\n%s", desc)
	}
	if !strings.Contains(desc, "flags 0x2 ") { // SECCOMP_FILTER_FLAG_LOG
		t.Errorf("pfreeze -debug does not show the LOG flag:\n%s", desc)
	}

	th := migrate(t, p)
	pid := th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^main EPERM EACCES ok$`, waitFor)
	th.out.Expect(t, `^thread EPERM EACCES EXDEV$`, waitFor)
	tasks, err := fixture.Tasks(pid)
	if err != nil || len(tasks) != 2 {
		t.Fatalf("restored process has tasks %v (%v), want 2", tasks, err)
	}
	for _, tid := range tasks {
		want := "2"
		if tid != pid {
			want = "3"
		}
		if got := statusField(t, pid, tid, "Seccomp_filters"); got != want {
			t.Errorf("thread %d has %s seccomp filters, want %s", tid, got, want)
		}
		if got := statusField(t, pid, tid, "NoNewPrivs"); got != "1" {
			t.Errorf("thread %d: NoNewPrivs %s, want 1", tid, got)
		}
	}
}

// TestVirtPIDFreezeAgain: a process restored with pthaw -virtpid (under
// a new PID, seeing its saved one through pthaw's seccomp filter) can be
// frozen again; the snapshot holds the PID it sees, not pthaw's filter,
// so thawed again with -virtpid it still sees its first PID.
func TestVirtPIDFreezeAgain(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "getpid"))
	pid := atoi(t, p.Lines.Expect(t, `^pid=(\d+) ppid=\d+$`, waitFor)[1])
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(pid), "-dest", snap)
	th := thaw(t, "-src", snap, "-virtpid")
	real := th.restoredPid(t)
	if real == pid {
		t.Fatalf("restored with the original's pid %d while it runs", pid)
	}
	th.out.Expect(t, `^no change \d+$`, waitFor)

	snap2 := filepath.Join(t.TempDir(), "snap2")
	freeze(t, "-pid", strconv.Itoa(real), "-halt", "-dest", snap2)
	if code := th.exit(t); code != 137 {
		t.Errorf("the first copy's pthaw exited %d, want 137 (killed by pfreeze -halt)", code)
	}
	desc, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap2).CombinedOutput()
	if err != nil {
		t.Fatalf("pthaw -debug: %v: %s", err, desc)
	}
	if !strings.Contains(string(desc), fmt.Sprintf("(pid %d)", pid)) || strings.Contains(string(desc), "Seccomp filter") {
		t.Errorf("the second snapshot should hold pid %d and no seccomp filter:\n%s", pid, desc)
	}
	th2 := thaw(t, "-src", snap2, "-virtpid")
	if real2 := th2.restoredPid(t); real2 == pid {
		t.Fatalf("restored with the original's pid %d while it runs", pid)
	}
	line := th2.out.Expect(t, `^(no change \d+|PID changed.*)$`, waitFor)[0]
	if strings.HasPrefix(line, "PID changed") {
		t.Fatalf("got %q, want no PID change", line)
	}
	th2.said(t, fmt.Sprintf("answer %d", pid))
}

// TestAnonFDs moves a process holding timerfds, a signalfd and an
// inotify instance (fixture anonfds) and waits 1.5 s between the freeze
// and the check: the periodic timer has counted its expirations meanwhile
// as the kernel would (at least 15 of 100 ms) and keeps its interval, the
// one-shot timer due 1 s after the start has fired once, the hour-long one
// kept its remaining time; the signal pending when frozen is read from the
// signalfd; and the inotify watches report, under their descriptors (1
// and 3: 2 was removed before the freeze), a file created and one written
// after the thaw.
func TestAnonFDs(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	p := fixture.Start(t, fixture.Build(t, "anonfds"), dir)
	p.Lines.Expect(t, `^ready$`, waitFor)
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	desc := debugOf(t, p.Pid())
	for _, want := range []string{
		`timerfd "anon_inode:\[timerfd\]" .* clock 1 value \d+ns interval 100000000ns`,
		`signalfd "anon_inode:\[signalfd\]" .* sigmask 0x200`,
		`inotify "anon_inode:inotify" .* \[wd 1 mask 0x100 ` + regexp.QuoteMeta(dir) + `\] \[wd 3 mask 0x2 ` + regexp.QuoteMeta(dir+"/f") + `\]`,
	} {
		if !regexp.MustCompile(want).MatchString(desc) {
			t.Errorf("pfreeze -debug does not match %s:\n%s", want, desc)
		}
	}
	snap := haltToFile(t, p)
	// The timers were read during the freeze, before this: 1.5 s from
	// now is at least 1.5 s after that.
	time.Sleep(1500 * time.Millisecond)
	th := thaw(t, "-src", snap)
	th.restoredPid(t)
	if err := os.WriteFile(filepath.Join(dir, "new"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(th.stdin, "check")
	m := th.out.Expect(t, `^periodic ticks=(\d+) interval_ms=(\d+)$`, waitFor)
	if n := atoi(t, m[1]); n < 15 || m[2] != "100" {
		t.Errorf("periodic timer: %d ticks, interval %s ms; want at least 15 ticks (1.5 s frozen), interval 100 ms", n, m[2])
	}
	th.out.Expect(t, `^oneshot ticks=1$`, waitFor)
	if left := atoi(t, th.out.Expect(t, `^long remaining_s=(\d+)$`, waitFor)[1]); left > 3598 || left < 3500 {
		t.Errorf("hour-long timer has %d s left, want about 3598", left)
	}
	th.out.Expect(t, `^signalfd 10$`, waitFor)
	th.out.Expect(t, `^inotify 1 100 new$`, waitFor)
	th.out.Expect(t, `^inotify 3 2 -$`, waitFor)
	th.out.Expect(t, `^end$`, waitFor)
}

// TestPosixTimers moves a process with three POSIX timers (fixture
// posixtimers) and waits 1.5 s between the freeze and the check: the
// timers answer timer_gettime under their saved ids; the one-shot timer
// A, due 1 s after the start, has fired once with its sigev_value and id;
// B (SIGEV_NONE) kept its hour less the time passed; C keeps signalling
// only the thread it names every 100 ms.
func TestPosixTimers(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "posixtimers"))
	ids := p.Lines.Expect(t, `^ready ids (\d+) (\d+) (\d+)$`, waitFor)[1:]
	desc := debugOf(t, p.Pid())
	for _, want := range []string{
		`POSIX timer ` + ids[0] + `: clock 1 notify 0 signal 10 value 0x1234 `,
		`POSIX timer ` + ids[1] + `: clock 0 notify 1 `,
		`POSIX timer ` + ids[2] + `: clock 1 notify 4 signal 12 value 0x0 tid \d+ left \d+ns interval 100000000ns`,
	} {
		if !regexp.MustCompile(want).MatchString(desc) {
			t.Errorf("pfreeze -debug does not match %s:\n%s", want, desc)
		}
	}
	snap := haltToFile(t, p)
	// The timers were read during the freeze, before this: 1.5 s from
	// now is at least 1.5 s after that.
	time.Sleep(1500 * time.Millisecond)
	th := thaw(t, "-src", snap)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^A fired=1 value=1234 id=`+ids[0]+` gettime=ok$`, waitFor)
	if left := atoi(t, th.out.Expect(t, `^B remaining_s=(\d+) gettime=ok$`, waitFor)[1]); left > 3598 || left < 3500 {
		t.Errorf("timer B has %d s left, want about 3598", left)
	}
	first := atoi(t, th.out.Expect(t, `^C thread=(\d+) other=0 interval_ms=100 gettime=ok$`, waitFor)[1])
	// C keeps firing: wait for the thread to have taken more.
	for deadline := time.Now().Add(waitFor); ; {
		if time.Now().After(deadline) {
			t.Fatalf("timer C did not signal its thread again within %v", waitFor)
		}
		fmt.Fprintln(th.stdin, "check")
		th.out.Expect(t, `^A `, waitFor)
		th.out.Expect(t, `^B `, waitFor)
		if atoi(t, th.out.Expect(t, `^C thread=(\d+) other=0 interval_ms=100 gettime=ok$`, waitFor)[1]) > first {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMemfdsAndDeletedFiles moves a process holding files no path leads
// to (fixture memfds): a sealed memfd that is open and mapped shared, a
// memfd only mapped, and a deleted file open and mapped shared and
// privately. After the thaw the memfd has its name, seals (growing it
// fails) and contents, and its mapping still shares pages with its fd; the
// mapped-only memfd and the deleted file keep their contents and sharing;
// the private mapping keeps its own change; the memfd keeps its mode and
// the deleted file its owner and mode (zdtm's memfd00, unlink_fstat00).
func TestMemfdsAndDeletedFiles(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	p := fixture.Start(t, fixture.Build(t, "memfds"), dir)
	p.Lines.Expect(t, `^ready$`, waitFor)
	desc := debugOf(t, p.Pid())
	for _, want := range []string{
		`File object 0x[0-9a-f]+: memfd "pcluster-memfd" size 12288 mode 0100642 seals 0x6`,
		`File object 0x[0-9a-f]+: memfd "pcluster-maponly" size 4096`,
		`File object 0x[0-9a-f]+: deleted "` + regexp.QuoteMeta(dir) + `/gone" size 4096 mode 0100640`,
		`fd 3: file "/memfd:pcluster-memfd \(deleted\)" .* object 0x`,
	} {
		if !regexp.MustCompile(want).MatchString(desc) {
			t.Errorf("pfreeze -debug does not match %s:\n%s", want, desc)
		}
	}
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^memfd link=/memfd:pcluster-memfd \(deleted\) seals=6 size=12288 grow=EPERM head=hello memfd shared=yes mode=642$`, waitFor)
	th.out.Expect(t, `^maponly only in the map$`, waitFor)
	th.out.Expect(t, `^deleted data=deleted contents shared=yes private=Deleted contents owner=1:2 mode=640$`, waitFor)
	// The copy of the deleted file is hidden: nothing new in its
	// directory, and pthaw holds none of them once the process runs.
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("the deleted file's directory holds %v (%v), want nothing", ents, err)
	}
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", th.cmd.Process.Pid))
	for _, fd := range fds {
		if l, _ := os.Readlink(fd); strings.Contains(l, "memfd:pcluster-") || strings.Contains(l, "(deleted)") {
			t.Errorf("pthaw still holds %s (%s)", fd, l)
		}
	}
}

// vforkChild waits for p, a vforker, to wait in vfork, and returns its
// child.
func vforkChild(t *testing.T, p *fixture.Proc) (parent, child int) {
	t.Helper()
	parent = p.Pid()
	p.Lines.Expect(t, `^parent `+strconv.Itoa(parent)+`$`, waitFor)
	waitState(t, parent, 'D')
	kids, err := fixture.Children(parent)
	if err != nil || len(kids) != 1 {
		t.Fatalf("vforker %d has children %v (%v), want one", parent, kids, err)
	}
	return parent, kids[0]
}

// TestFreezeVforkExecsLate: a vfork child that execs 500 ms after the
// vfork is waited for, by a freeze of the child as by one of its parent
// (with -tree), and both are then frozen as they are after the exec.
func TestFreezeVforkExecsLate(t *testing.T) {
	needRoot(t)
	count := fixture.Build(t, "countforever")
	t.Run("child", func(t *testing.T) {
		p := fixture.StartGroup(t, fixture.Build(t, "vforker"), "exec", "500", count, "1")
		_, child := vforkChild(t, p)
		desc := debugOf(t, child)
		if !strings.HasPrefix(desc, "Process: countforever (pid "+strconv.Itoa(child)+")") {
			t.Errorf("pfreeze -debug of the vfork child did not wait for its exec:\n%.200s", desc)
		}
		p.Lines.Expect(t, `^execd `+strconv.Itoa(child)+`$`, waitFor)
	})
	t.Run("parent", func(t *testing.T) {
		p := fixture.StartGroup(t, fixture.Build(t, "vforker"), "exec", "500", count, "1")
		parent, child := vforkChild(t, p)
		out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(parent), "-tree", "-debug").CombinedOutput()
		if err != nil {
			t.Fatalf("pfreeze -tree -debug of the vfork parent: %v: %s", err, out)
		}
		if !strings.HasPrefix(string(out), "Tree of 2 processes:") || !strings.Contains(string(out), "Process: countforever (pid "+strconv.Itoa(child)+")") {
			t.Errorf("pfreeze -tree -debug of the vfork parent:\n%.400s", out)
		}
	})
}

// TestFreezeVforkChildNeverExecs: a vfork child that does not exec is
// refused with one line once VforkExecWait has passed, not waited for
// without end, and left as it was.
func TestFreezeVforkChildNeverExecs(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "vforker"))
	parent, child := vforkChild(t, p)
	t.Cleanup(func() {
		syscall.Kill(child, syscall.SIGKILL)
		p.Lines.Expect(t, `^parent resumed child=9$`, waitFor)
	})
	out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(child), "-debug").CombinedOutput()
	want := fmt.Sprintf("pfreeze: freeze %d: a vfork child of %d that has not exec'd within 2s (freeze it after it execs)\n", child, parent)
	if err == nil || string(out) != want {
		t.Errorf("pfreeze of the vfork child: %v, output %q; want %q", err, out, want)
	}
	untouched(t, child)
	p.Lines.Drain()
	p.Lines.Expect(t, `^child `+strconv.Itoa(child)+` tick \d+$`, waitFor)
}

// TestMemfdTree: a parent and its child share a memfd (fixture
// memfdtree); frozen with -tree and thawed, they still share one file:
// the count the restored child keeps in it goes on rising in the
// parent's mapping and through the parent's fd, and -debug of the tree
// saved the file once.
func TestMemfdTree(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "memfdtree"))
	child := atoi(t, p.Lines.Expect(t, `^ready (\d+)$`, waitFor)[1])
	out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-tree", "-debug").CombinedOutput()
	if err != nil {
		t.Fatalf("pfreeze -tree -debug: %v: %s", err, out)
	}
	if n := strings.Count(string(out), `memfd "pcluster-shared"`); n != 1 {
		t.Errorf("the shared memfd is saved %d times, want once:\n%s", n, out)
	}
	root := p.Pid()
	snap := haltTreeToFile(t, p, child)
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, root, child)
	th.restoredPid(t)
	counter := func() (int, int) {
		fmt.Fprintln(th.stdin, "check")
		m := th.out.Expect(t, `^counter map=(\d+) fd=(\d+)$`, waitFor)
		return atoi(t, m[1]), atoi(t, m[2])
	}
	first, _ := counter()
	for deadline := time.Now().Add(waitFor); ; time.Sleep(50 * time.Millisecond) {
		byMap, byFd := counter()
		if byMap > first+2 && byFd > first+2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restored child's count in the shared memfd stays at %d (map) / %d (fd), first %d", byMap, byFd, first)
		}
	}
}

// removeShmAtCleanup removes System V segment id when the test ends.
func removeShmAtCleanup(t *testing.T, id int) {
	t.Cleanup(func() { unix.SysvShmCtl(id, unix.IPC_RMID, nil) })
}

// TestSysVShm moves a process attached to two System V segments (fixture
// sysvshm): A, marked for removal, is gone once the original is killed
// and is made again under its id; B, which outlives it, is attached as
// it is. After the thaw both answer IPC_STAT under their ids with their
// attachments (nattch), contents and modes, A's two attachments share
// pages, and B's unmapped middle page stays unmapped. Frozen again and B
// removed meanwhile, B is made again under its id and key too.
func TestSysVShm(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "sysvshm"))
	m := p.Lines.Expect(t, `^ready A (\d+) B (\d+)$`, waitFor)
	a, b := atoi(t, m[1]), atoi(t, m[2])
	removeShmAtCleanup(t, a)
	removeShmAtCleanup(t, b)
	key := fmt.Sprintf("%x", 0x5c000000|p.Pid())
	desc := debugOf(t, p.Pid())
	for _, want := range []string{
		fmt.Sprintf(`sysv "SYSV00000000" size 8192 mode 0600 seals 0x0 key 0x0 shmid %d uid 0 gid 0 removed true`, a),
		fmt.Sprintf(`sysv "SYSV%s" size 12288 mode 0640 seals 0x0 key 0x%s shmid %d uid 0 gid 0 removed false`, key, key, b),
	} {
		if !strings.Contains(desc, want) {
			t.Errorf("pfreeze -debug does not say %s:\n%s", want, desc)
		}
	}
	check := func(th *thawed) {
		t.Helper()
		fmt.Fprintln(th.stdin, "check")
		th.out.Expect(t, `^A stat=ok nattch=2 mode=600 a1=segment A a2=segment A shared=yes$`, waitFor)
		th.out.Expect(t, `^B stat=ok key=`+key+` nattch=2 mode=640 head=segment B tail=tail hole=unmapped$`, waitFor)
	}
	th := migrate(t, p)
	pid := th.restoredPid(t)
	check(th)

	snap := filepath.Join(t.TempDir(), "snap2")
	freeze(t, "-pid", strconv.Itoa(pid), "-halt", "-dest", snap)
	th.exit(t)
	if _, err := unix.SysvShmCtl(b, unix.IPC_RMID, nil); err != nil {
		t.Fatalf("remove segment B %d: %v", b, err)
	}
	check(thaw(t, "-src", snap))
}

// TestFanotify moves a process with a fanotify group (fixture fanotify):
// after the thaw its inode mark still reports FAN_MODIFY and its mount
// mark FAN_CLOSE_WRITE for a file written then, and its ignore mark
// still silences the other file.
func TestFanotify(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	p := fixture.Start(t, fixture.Build(t, "fanotify"), dir)
	p.Lines.Expect(t, `^ready$`, waitFor)
	desc := debugOf(t, p.Pid())
	for _, want := range []string{
		`fanotify "anon_inode:\[fanotify\]" .* flags 0x3 event-flags 0x8000 `,
		`fanotify .*\[inode ` + regexp.QuoteMeta(dir+"/f") + ` mask 0x2 ignored 0x0 flags 0x0\]`,
		`fanotify .*\[mount \S+ mask 0x8 ignored 0x0 flags 0x0\]`,
		`fanotify .*\[inode ` + regexp.QuoteMeta(dir+"/quiet") + ` mask 0x0 ignored 0x8 flags 0x40\]`,
	} {
		if !regexp.MustCompile(want).MatchString(desc) {
			t.Errorf("pfreeze -debug does not match %s:\n%s", want, desc)
		}
	}
	th := migrate(t, p)
	th.restoredPid(t)
	for _, name := range []string{"f", "quiet"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^f mask=a quiet mask=0$`, waitFor)
}

// TestEpollClosedFd moves a process whose epoll instance watches two
// eventfds under fd numbers closed since (one now taken by another file),
// each still held by a dup (fixture epollclosed): after the thaw both
// still report through the instance, with their data.
func TestEpollClosedFd(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "epollclosed"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	desc := debugOf(t, p.Pid())
	for _, want := range []string{`epoll .*\[fd 4 \(now fd 5\) events 0x19 data 0x2c\]`, `epoll .*\[fd 6 \(now fd 7\) events 0x19 data 0x42\]`} {
		if !regexp.MustCompile(want).MatchString(desc) {
			t.Errorf("pfreeze -debug does not match %s:\n%s", want, desc)
		}
	}
	th := migrate(t, p)
	pid := th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^events 44 66$`, waitFor)
	if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/4", pid)); l != "/dev/null" {
		t.Errorf("restored fd 4 is %q, want /dev/null", l)
	}
	if _, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/6", pid)); err == nil {
		t.Errorf("restored fd 6 is open, want it closed as it was")
	}
}

// TestMapFileProt moves a process with a shared file mapping that is
// read-only but was mapped from a read-write fd (fixture mapprot, zdtm's
// maps_file_prot): after the thaw it can still be made writable, and
// what it writes reaches the file.
func TestMapFileProt(t *testing.T) {
	needRoot(t)
	file := filepath.Join(t.TempDir(), "mapped")
	p := fixture.Start(t, fixture.Build(t, "mapprot"), file)
	p.Lines.Expect(t, `^ready$`, waitFor)
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "write")
	th.out.Expect(t, `^mprotect=ok$`, waitFor)
	if b, err := os.ReadFile(file); err != nil || !strings.HasPrefix(string(b), "written\x00") {
		t.Errorf("file holds %.16q (%v), want \"written\" from the restored mapping", b, err)
	}
}

// TestThreadCredentials moves a process whose second thread has its own
// credentials (fixture threadcreds: uid and gid 1000 in that thread
// alone): after the thaw each thread has its own ids again.
func TestThreadCredentials(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "threadcreds"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	if desc := debugOf(t, p.Pid()); !strings.Contains(desc, "credentials of its own: uid [1000 1000 1000 1000] gid [1000 1000 1000 1000]") {
		t.Errorf("pfreeze -debug does not show the thread's own credentials:\n%s", desc)
	}
	th := migrate(t, p)
	pid := th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^main uid=0,0 gid=0,0$`, waitFor)
	th.out.Expect(t, `^thread uid=1000,1000 gid=1000,1000$`, waitFor)
	tasks, err := fixture.Tasks(pid)
	if err != nil || len(tasks) != 2 {
		t.Fatalf("restored process has tasks %v (%v), want 2", tasks, err)
	}
	for _, tid := range tasks {
		want := "0\t0\t0\t0"
		if tid != pid {
			want = "1000\t1000\t1000\t1000"
		}
		if got := statusField(t, pid, tid, "Uid"); got != want {
			t.Errorf("thread %d: Uid %q, want %q", tid, got, want)
		}
	}
}

// TestZombieLeader moves a process whose main thread ended with
// pthread_exit while two threads run on (fixture zombieleader, zdtm's
// zombie_leader): pfreeze -debug says so; after the thaw the main thread
// is a zombie again with the same PID and TIDs, the first thread's ticks
// go on, and once the last thread calls exit(7) the process's status,
// pthaw's, is 7.
func TestZombieLeader(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "zombieleader"))
	m := p.Lines.Expect(t, `^ready (\d+),(\d+)$`, waitFor)
	pid := p.Pid()
	if desc := debugOf(t, pid); !strings.Contains(desc, fmt.Sprintf("Main thread %d had exited (pthread_exit)", pid)) ||
		!strings.Contains(desc, "2 thread(s)") {
		t.Errorf("pfreeze -debug does not show the exited main thread and 2 threads:\n%s", desc)
	}
	th := migrate(t, p)
	if got := th.restoredPid(t); got != pid {
		t.Fatalf("restored pid %d, want %d", got, pid)
	}
	// Ticks after the thaw come from the restored first thread.
	th.out.Expect(t, `^tick \d+$`, waitFor)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := statusField(t, pid, pid, "State"); !strings.HasPrefix(got, "Z") {
		t.Errorf("restored main thread state %q, want Z (zombie)", got)
	}
	tasks, err := fixture.Tasks(pid)
	want := []int{pid, atoi(t, m[1]), atoi(t, m[2])}
	slices.Sort(want)
	if err != nil || fmt.Sprint(tasks) != fmt.Sprint(want) {
		t.Errorf("restored tasks %v (%v), want %v", tasks, err, want)
	}
	for _, tid := range []int{atoi(t, m[1]), atoi(t, m[2])} {
		if got := statusField(t, pid, tid, "State"); strings.HasPrefix(got, "Z") {
			t.Errorf("restored thread %d state %q, want running", tid, got)
		}
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	th.out.Expect(t, `^bye$`, waitFor)
	if code := th.exit(t); code != 7 {
		t.Errorf("pthaw exit code %d, want the process's 7", code)
	}
}
