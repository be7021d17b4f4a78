package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
)

// vmFlags returns the VmFlags /proc/PID/smaps reports for the area that
// starts at addr (hex, as smaps prints it).
func vmFlags(t *testing.T, pid int, addr string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	in := false
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":") {
			in = strings.HasPrefix(f[0], addr+"-")
		} else if in && strings.HasPrefix(l, "VmFlags:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "VmFlags:"))
		}
	}
	t.Fatalf("pid %d has no area at %s", pid, addr)
	return ""
}

// TestMadviseFlags moves a process whose anonymous areas carry each
// mapping flag and advice smaps reports (fixture madvise; zdtm's maps02):
// sequential, random, mlocked, MAP_NORESERVE, MAP_DROPPABLE, dontfork,
// dontdump. After the thaw each area has the VmFlags it had.
func TestMadviseFlags(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "madvise"))
	before := map[string]string{}
	names := map[string]string{}
	for len(names) < 7 {
		m := p.Lines.Expect(t, `^area ([0-9a-f]+) (\w+)$`, waitFor)
		before[m[1]] = vmFlags(t, p.Pid(), m[1])
		names[m[1]] = m[2]
	}
	p.Lines.Expect(t, `^ready$`, waitFor)
	th := migrate(t, p)
	pid := th.restoredPid(t)
	for addr, want := range before {
		if got := vmFlags(t, pid, addr); got != want {
			t.Errorf("%s area %s: VmFlags %q after thaw, want %q", names[addr], addr, got, want)
		}
	}
}

// TestFileOwner moves a process whose pipe signals it when data arrives
// (fixture fown: O_ASYNC, F_SETOWN, F_SETSIG SIGUSR2; zdtm's file_fown):
// after the thaw a write into the pipe still brings the signal, and the
// read end has the same owner and signal.
func TestFileOwner(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "fown"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	if desc := debugOf(t, p.Pid()); !strings.Contains(desc, fmt.Sprintf("owner %d signal 12", p.Pid())) {
		t.Errorf("pfreeze -debug does not show the pipe's owner %d and signal 12:\n%s", p.Pid(), desc)
	}
	th := migrate(t, p)
	pid := th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, fmt.Sprintf(`^signals=1 flags=20000 owner=%d sig=12 self=%d$`, pid, pid), waitFor)
}

// TestUnconnectedSockets moves a process holding sockets that were never
// connected (fixture sockopts; zdtm's sock_opts00, sock_opts01): a TCP
// socket neither bound nor connected with SOL_SOCKET options set
// (priority, rcvlowat, mark, dontroute, oobinline, nocheck, bound to the
// device lo), a TCP socket bound but not listening, a unix socket with
// SO_PASSCRED. They were refused ("state CLOSE"); after the thaw each
// reads back as it was, the bound one on its port.
func TestUnconnectedSockets(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "sockopts"))
	before := p.Lines.Expect(t, `^(tcp prio=5 lowat=3 mark=7 dontroute=1 oob=1 nocheck=1 dev=lo peer=ENOTCONN bound=[1-9]\d* unix passcred=1)$`, waitFor)[1]
	p.Lines.Expect(t, `^ready$`, waitFor)
	if desc := debugOf(t, p.Pid()); !strings.Contains(desc, "tcp-unconnected") || !strings.Contains(desc, `priority 5 rcvlowat 3 mark 7 dontroute true nocheck true oobinline true device "lo"`) || !strings.Contains(desc, "passcred true") {
		t.Errorf("pfreeze -debug does not show the unconnected sockets and their options:\n%s", desc)
	}
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^`+regexp.QuoteMeta(before)+`$`, waitFor)
}

// TestInotifyDeletedFile moves a process with an inotify watch on a file
// it deleted and still holds open (fixture inotifydel; zdtm's inotify00):
// it was refused ("has no path"); now the watch is added again on the
// copy of the deleted file, and a write into the file still reports
// IN_MODIFY under the same watch descriptor.
func TestInotifyDeletedFile(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	p := fixture.Start(t, fixture.Build(t, "inotifydel"), dir)
	p.Lines.Expect(t, `^ready$`, waitFor)
	if desc := debugOf(t, p.Pid()); !regexp.MustCompile(`\[wd 1 mask 0xa ` + regexp.QuoteMeta(dir) + `/f \(deleted\) object 0x[0-9a-f]+\]`).MatchString(desc) {
		t.Errorf("pfreeze -debug does not show the watch of the deleted file:\n%s", desc)
	}
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^event 1 2$`, waitFor)
	th.out.Expect(t, `^done$`, waitFor)
}

// TestItimerPendingExpiry moves a process whose interval ITIMER_REAL has
// expired with its SIGALRM still pending (fixture itimerpending; zdtm's
// timers failed this way under load): getitimer reports no time left,
// and set again as read the timer stayed disarmed, so after the pending
// SIGALRM no other came. After the thaw the alarms go on: more than the
// one pending in 500 ms of a 50 ms timer.
func TestItimerPendingExpiry(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "itimerpending"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	m := th.out.Expect(t, `^alarms=(\d+)$`, waitFor)
	if n := atoi(t, m[1]); n < 2 {
		t.Errorf("%d SIGALRMs in 500 ms after the thaw, want more than the pending one (the 50 ms timer stayed disarmed)", n)
	}
}

// TestUnixPeerClosed moves a process holding unix sockets whose peers it
// closed after writing into them (fixture unixorphan; zdtm's sockets02):
// they were refused (messages queued from other sockets); after the thaw
// each reads what was queued, with a seqpacket's boundaries, and then
// the end of the stream.
func TestUnixPeerClosed(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "unixorphan"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	if desc := debugOf(t, p.Pid()); !strings.Contains(desc, "its peer closed, queue 5 bytes") || !strings.Contains(desc, "its peer closed, queue 6 bytes") {
		t.Errorf("pfreeze -debug does not show the sockets whose peers closed:\n%s", desc)
	}
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^stream hello then eof$`, waitFor)
	th.out.Expect(t, `^seqpacket one two then eof$`, waitFor)
}

// TestZombieGroupLeaderGone moves a tree whose zombie child is in a
// process group whose leader was reaped before (fixture zombiegroup;
// zdtm's zombie01): it was refused (the group "is led from outside the
// tree"); now pthaw makes the group again with a helper of the leader's
// PID that it ends and reaps at once, and after the thaw the zombie is in
// that group with its exit status.
func TestZombieGroupLeaderGone(t *testing.T) {
	needRoot(t)
	// The halted zombie comes to the test, a subreaper meanwhile, to be
	// reaped: its PID, and with it the group's number, is then free.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	p := fixture.StartGroup(t, fixture.Build(t, "zombiegroup"))
	m := p.Lines.Expect(t, `^group (\d+) zombie (\d+)$`, waitFor)
	group, zombie := m[1], atoi(t, m[2])
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-tree", "-halt", "-dest", snap)
	<-p.Exited()
	var ws unix.WaitStatus
	if _, err := unix.Wait4(zombie, &ws, unix.WALL, nil); err != nil {
		t.Fatalf("reaping the halted zombie %d: %v", zombie, err)
	}
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, p.Pid())
	if got := th.restoredPid(t); got != p.Pid() {
		t.Errorf("restored pid %d, want %d", got, p.Pid())
	}
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^pgid=`+group+` status=7$`, waitFor)
	// The helper is gone: nothing has the group's PID.
	if _, err := os.Stat("/proc/" + group); err == nil {
		t.Errorf("pid %d (the group's helper) still exists after the thaw", atoi(t, group))
	}
}

// TestSharedObjectParts moves a tree whose shared anonymous object is
// mapped in two areas at different offsets (a page unmapped from its
// middle), shared with a child (fixture shmparts; zdtm's maps01): it was
// refused at the thaw ("shares only part of"); now the object is made
// whole for its first area and the others map it by offset, so after the
// thaw the contents are there and a byte the parent writes in one area is
// seen by the child and copied into the other.
func TestSharedObjectParts(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "shmparts"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("children of %d: %v %v", p.Pid(), kids, err)
	}
	snap := haltTreeToFile(t, p, kids...)
	th := thaw(t, "-src", snap)
	killTreeAtCleanup(t, p.Pid())
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^first=a third=c echo=A$`, waitFor)
	fmt.Fprintln(th.stdin, "check")
	th.out.Expect(t, `^first=a third=c echo=B$`, waitFor)
}
