package main

import (
	"encoding/json"
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

	"github.com/pcluster/pcluster/internal/fixture"
)

// A container made by unshare (new PID, mount, UTS, IPC and network
// namespaces; the fixture "container" as its init sets a host name,
// mounts a tmpfs with a file it holds open, makes a System V segment,
// brings lo up with a listener on it and forks a child) is frozen whole
// with -tree on its init and restored with -pidns into new namespaces of
// every kind, twice; each time the init reports, from inside, the same
// host name, segment, file, connection and PIDs.

// containerCheck is what the container's init reports while it runs as
// it did when it started.
const containerCheck = "host=ctrbox shm=sysv ok/1 tcp=ok file=tmpfs data/tmpfs data links=2 pid=1 procs=1,2"

// containerKey is the key of the fixture's System V segment.
const containerKey = 0x5c0ffee0

// startContainer starts unshare with the fixture container as the init of
// its namespaces, the tmpfs on dir, and returns unshare and the init.
func startContainer(t *testing.T, dir string) (*fixture.Proc, int) {
	t.Helper()
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skipf("unshare not found: %v", err)
	}
	p := fixture.Start(t, unshare, "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net", fixture.Build(t, "container"), dir, "7777")
	p.Lines.Expect(t, `^ready shm \d+$`, waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v), want the container's init", p.Pid(), kids, err)
	}
	t.Cleanup(func() { p.Wait(waitFor) }) // after the init's end
	killNSAtCleanup(t, kids[0])
	return p, kids[0]
}

// nsLinks returns pid's namespace links of the kinds a container carries.
func nsLinks(t *testing.T, pid int) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, k := range []string{"pid", "uts", "ipc", "net", "mnt"} {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, k))
		if err != nil {
			t.Fatalf("pid %d: %v", pid, err)
		}
		out[k] = l
	}
	return out
}

// hostHasSegment reports whether this host's IPC namespace has a System
// V segment with key.
func hostHasSegment(t *testing.T, key uint32) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/sysvipc/shm")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 0 && f[0] == strconv.FormatInt(int64(int32(key)), 10) {
			return true
		}
	}
	return false
}

func TestContainerUnshare(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	p, init := startContainer(t, dir)
	if err := p.WriteLine("check"); err != nil {
		t.Fatal(err)
	}
	p.Lines.Expect(t, "^"+containerCheck+"$", waitFor)
	own := nsLinks(t, os.Getpid())
	if hostHasSegment(t, containerKey) {
		t.Fatalf("the container's segment %#x is in this host's IPC namespace", containerKey)
	}

	snap := filepath.Join(t.TempDir(), "snap")
	stderr := freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-dest", snap)
	if strings.Contains(stderr, "not carried") {
		t.Fatalf("pfreeze: %s", stderr)
	}
	if _, err := p.Wait(waitFor); err != nil {
		t.Fatalf("unshare after pfreeze -halt: %v", err)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Fatalf("the container's tmpfs shows on this host: %s has %v (%v)", dir, ents, err)
	}
	// -debug shows what the snapshot carries of each namespace.
	debug, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).CombinedOutput()
	if err != nil {
		t.Fatalf("pthaw -debug: %v: %s", err, debug)
	}
	for _, want := range []string{"Container namespaces:\n", `  uts: hostname "ctrbox"`, "  ipc: own", "  net: lo up true, addresses [127.0.0.1/8 ::1/128]",
		"    /proc proc proc (proc) root / ", fmt.Sprintf("    %s tmpfs ctrtmp (tmpfs) root / flags 0x200006 options size=1024k,mode=750 private, 2 files, 10 bytes", dir)} {
		if !strings.Contains(string(debug), want) {
			t.Errorf("pthaw -debug lacks %q:\n%s", want, debug)
		}
	}

	for round := 1; round <= 2; round++ {
		th := thaw(t, "-src", snap, "-pidns")
		init = th.restoredPid(t)
		killNSAtCleanup(t, init)
		th.said(t, `restored the container in new uts, ipc, net, mount namespaces`)
		for k, l := range nsLinks(t, init) {
			if l == own[k] {
				t.Errorf("round %d: the restored init %d is in this host's %s namespace", round, init, k)
			}
		}
		if _, err := th.stdin.WriteString("check\n"); err != nil {
			t.Fatal(err)
		}
		th.out.Expect(t, "^"+containerCheck+"$", waitFor)
		if hostHasSegment(t, containerKey) {
			t.Fatalf("round %d: the container's segment %#x is in this host's IPC namespace", round, containerKey)
		}
		if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
			t.Fatalf("round %d: the container's tmpfs shows on this host: %s has %v (%v)", round, dir, ents, err)
		}
		if round == 2 {
			// The end of its input ends it: its status comes through pthaw.
			th.stdin.Close()
			if code := th.exit(t); code != 0 {
				t.Fatalf("pthaw exit code %d, want 0: %s", code, th.stderr.String())
			}
			break
		}
		// The restored container is frozen again.
		snap = filepath.Join(t.TempDir(), "snap")
		freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-dest", snap)
		th.exit(t)
	}
}

// TestContainerRefusals: what a container freeze does not carry is
// refused with one line naming it, and the container runs on: an
// interface other than lo, a System V semaphore set, a process outside
// the container in its network namespace, a POSIX message queue; a
// process of the container frozen without its init is refused for its
// mount namespace.
func TestContainerRefusals(t *testing.T) {
	needRoot(t)
	for _, c := range []struct{ name, setup, want string }{
		{"bridge", "ip link add ctrb0 type bridge", "net namespace: interface ctrb0 (bridge) is not carried (only lo)"},
		{"sem", "ipcmk -S 1 >/dev/null", "ipc namespace: System V semaphore set"},
		// A file made in an mqueue filesystem is a queue.
		{"mqueue", "mount -t mqueue ctrmq /mnt && touch /mnt/ctrq", "ipc namespace: POSIX message queue /ctrq is not carried"},
	} {
		t.Run(c.name, func(t *testing.T) {
			unshare, err := exec.LookPath("unshare")
			if err != nil {
				t.Skipf("unshare not found: %v", err)
			}
			p := fixture.Start(t, unshare, "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net", "sh", "-c", c.setup+" && echo ready && exec sleep 1000")
			p.Lines.Expect(t, "^ready$", waitFor)
			kids, err := fixture.Children(p.Pid())
			if err != nil || len(kids) != 1 {
				t.Fatalf("unshare %d has children %v (%v)", p.Pid(), kids, err)
			}
			t.Cleanup(func() { p.Wait(waitFor) })
			killNSAtCleanup(t, kids[0])
			refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: %s", kids[0], c.want), "-pid", strconv.Itoa(kids[0]), "-tree")
			if !alive(kids[0]) {
				t.Fatalf("the container's init %d is gone after a refused freeze", kids[0])
			}
		})
	}
	t.Run("outsider", func(t *testing.T) {
		dir := t.TempDir()
		p, init := startContainer(t, dir)
		out := exec.Command("nsenter", "-t", strconv.Itoa(init), "-n", "sleep", "1000")
		if err := out.Start(); err != nil {
			t.Skipf("nsenter: %v", err)
		}
		t.Cleanup(func() { out.Process.Kill(); out.Wait() })
		waitNS(t, out.Process.Pid, "net", nsLinks(t, init)["net"])
		refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: pid %d, outside the tree, shares the net namespace of %d", init, out.Process.Pid, init), "-pid", strconv.Itoa(init), "-tree")
		p.WriteLine("check")
		p.Lines.Expect(t, "^"+containerCheck+"$", waitFor)
		kids, _ := fixture.Children(init)
		if len(kids) != 1 {
			t.Fatalf("the container's init %d has children %v, want its one", init, kids)
		}
		refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: process is in another mnt namespace (a container is frozen whole: the init of its PID namespace, with -tree)", kids[0]), "-pid", strconv.Itoa(kids[0]))
		// Nor is a process in UTS and IPC namespaces of its own, not a
		// PID namespace's init: its host name and segments stay behind.
		uts := fixture.Start(t, "/usr/bin/unshare", "--uts", "--ipc", "sh", "-c", "echo ready && exec sleep 1000")
		uts.Lines.Expect(t, "^ready$", waitFor)
		waitExe(t, uts.Pid(), "/sleep")
		refusedFreeze(t, fmt.Sprintf("pfreeze: freeze %d: process is in another uts namespace (a container is frozen whole: the init of its PID namespace, with -tree)", uts.Pid()), "-pid", strconv.Itoa(uts.Pid()))
	})
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	return err == nil && !strings.Contains(string(b), ") Z ")
}

// waitNS waits until pid is in namespace ns of kind (nsenter has entered
// it and exec'd sleep).
func waitNS(t *testing.T, pid int, kind, ns string) {
	t.Helper()
	waitExe(t, pid, "/sleep")
	if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, kind)); l != ns {
		t.Fatalf("pid %d is in %s, want %s", pid, l, ns)
	}
}

// waitExe waits until pid runs a program whose path ends in suffix.
func waitExe(t *testing.T, pid int, suffix string) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); strings.HasSuffix(exe, suffix) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("pid %d never ran a program ending in %s", pid, suffix)
}

// TestContainerCrun: a container of a real runtime (crun with the config
// `crun spec` writes — read-only rootfs, /dev a tmpfs with device nodes,
// devpts, mqueue, read-only sysfs and cgroup2, masked and read-only /proc
// paths — its rootfs a directory holding the static fixture,
// pivot_root'ed into it) moves with its namespaces; the restored init
// reports from inside as the original did, its root the rootfs, its
// mounts the runtime's.
func TestContainerCrun(t *testing.T) {
	needRoot(t)
	crun, err := exec.LookPath("crun")
	if err != nil {
		t.Skipf("crun not found (apt-get install crun): %v", err)
	}
	bundle := t.TempDir()
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{"proc", "mnt", "dev", "sys"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin, err := os.ReadFile(fixture.Build(t, "container-static"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "container"), bin, 0o755); err != nil {
		t.Fatal(err)
	}
	crunSpec(t, crun, bundle)
	state, id := t.TempDir(), fmt.Sprintf("pcl-ctr-%d", os.Getpid())
	crunCmd := fmt.Sprintf("%s --root %s --cgroup-manager=disabled", crun, state)
	t.Cleanup(func() { exec.Command("sh", "-c", crunCmd+" delete -f "+id).Run() })
	// crun 1.8 refuses this host's hybrid cgroup layout: it runs in a
	// mount namespace of its own whose /sys/fs/cgroup is cgroup2 alone
	// (no cgroup is made: --cgroup-manager=disabled).
	p := fixture.Start(t, "/usr/bin/unshare", "-m", "sh", "-c",
		"mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec "+crunCmd+" run --bundle "+bundle+" "+id)
	p.Lines.Expect(t, `^ready shm \d+$`, waitFor)
	init := containerInit(t, p.Pid())
	t.Cleanup(func() { p.Wait(waitFor) })
	killNSAtCleanup(t, init)
	if err := p.WriteLine("check"); err != nil {
		t.Fatal(err)
	}
	p.Lines.Expect(t, "^"+containerCheck+"$", waitFor)

	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-dest", snap)
	if _, err := p.Wait(waitFor); err != nil {
		t.Fatalf("crun after pfreeze -halt: %v", err)
	}
	th := thaw(t, "-src", snap, "-pidns")
	init = th.restoredPid(t)
	killNSAtCleanup(t, init)
	if _, err := th.stdin.WriteString("check\n"); err != nil {
		t.Fatal(err)
	}
	th.out.Expect(t, "^"+containerCheck+"$", waitFor)
	var st, rst syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d/root/container", init), &st); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(filepath.Join(rootfs, "container"), &rst); err != nil || st.Ino != rst.Ino || st.Dev != rst.Dev {
		t.Fatalf("the restored init's root is not the container's rootfs %s (%v)", rootfs, err)
	}
	// The runtime's mounts, as the container sees them.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", init))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{` / ro,relatime - ext4 `, ` /dev rw,nosuid - tmpfs `, ` /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666`,
		` /dev/mqueue rw,nosuid,nodev,noexec,relatime - mqueue `, ` /sys ro,nosuid,nodev,noexec,relatime - sysfs `, ` /proc/sys ro,relatime - proc `,
		` /proc/keys ro,relatime - `, ` /mnt rw,nosuid,nodev,relatime - tmpfs ctrtmp rw,size=1024k,mode=750`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("the restored container's mounts lack %q:\n%s", want, b)
		}
	}
	if st, err := os.Stat(fmt.Sprintf("/proc/%d/root/dev/null", init)); err != nil || st.Mode()&os.ModeCharDevice == 0 {
		t.Errorf("the restored container's /dev/null: %v (%v)", st, err)
	}
	th.stdin.Close()
	if code := th.exit(t); code != 0 {
		t.Fatalf("pthaw exit code %d, want 0: %s", code, th.stderr.String())
	}
}

// crunSpec writes into bundle the config crun spec makes, running the
// fixture container (/container /mnt 7777) on plain pipes and with the
// capabilities it needs.
func crunSpec(t *testing.T, crun, bundle string) {
	t.Helper()
	if out, err := exec.Command(crun, "spec", "--bundle", bundle).CombinedOutput(); err != nil {
		t.Fatalf("crun spec: %v: %s", err, out)
	}
	file := filepath.Join(bundle, "config.json")
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"/container", "/mnt", "7777"}
	caps := []string{"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}
	proc["capabilities"] = map[string]any{"bounding": caps, "effective": caps, "permitted": caps}
	if b, err = json.Marshal(spec); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// containerInit returns the init of the container a runtime (pid) started:
// its descendant that is pid 1 of a PID namespace of its own.
func containerInit(t *testing.T, pid int) int {
	t.Helper()
	queue := []int{pid}
	for len(queue) > 0 {
		q := queue[0]
		queue = queue[1:]
		if pidNSOf(q) != pidNSOf(os.Getpid()) {
			return q
		}
		kids, _ := fixture.Children(q)
		queue = append(queue, kids...)
	}
	t.Fatalf("no container init under %d", pid)
	return 0
}

// TestContainerRestoreRefused: a container snapshot is restored only into
// a new PID namespace, and one whose bind mount's host directory is gone
// fails with one line naming the mount; neither leaves anything behind.
// The same snapshot then restores once the directory is back, the bind
// mount showing the host directory's file.
func TestContainerRestoreRefused(t *testing.T) {
	needRoot(t)
	dir, src, bind := t.TempDir(), filepath.Join(t.TempDir(), "src"), t.TempDir()
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "host"), []byte("from the host"), 0o644); err != nil {
		t.Fatal(err)
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skipf("unshare not found: %v", err)
	}
	p := fixture.Start(t, unshare, "--fork", "--pid", "--mount-proc", "--uts", "--ipc", "--net", "sh", "-c",
		fmt.Sprintf("mount --bind %s %s && exec %s %s 7777", src, bind, fixture.Build(t, "container"), dir))
	p.Lines.Expect(t, `^ready shm \d+$`, waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v)", p.Pid(), kids, err)
	}
	t.Cleanup(func() { p.Wait(waitFor) })
	killNSAtCleanup(t, kids[0])
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(kids[0]), "-tree", "-halt", "-dest", snap)
	p.Wait(waitFor)

	refused := func(want string, args ...string) {
		t.Helper()
		cmd := exec.Command(filepath.Join(binDir, "pthaw"), args...)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), want) || strings.Count(string(out), "\n") != 1 {
			t.Fatalf("pthaw %v: %v: %q, want one line with %q", args, err, out, want)
		}
		if hostHasSegment(t, containerKey) {
			t.Fatalf("pthaw %v failed but left the segment %#x in this host's IPC namespace", args, containerKey)
		}
	}
	refused("pthaw: thaw: the snapshot is a container (a PID namespace frozen with namespaces of its own): it is restored only into a new PID namespace", "-src", snap)
	moved := src + ".moved"
	if err := os.Rename(src, moved); err != nil {
		t.Fatal(err)
	}
	refused(fmt.Sprintf("pthaw: thaw: pid 1: mount %s (bind): bind %s: no such file or directory", bind, src), "-src", snap, "-pidns")
	if err := os.Rename(moved, src); err != nil {
		t.Fatal(err)
	}
	th := thaw(t, "-src", snap, "-pidns")
	init := th.restoredPid(t)
	killNSAtCleanup(t, init)
	th.stdin.WriteString("check\n")
	// Its child is pid 3 here: sh forked mount first.
	th.out.Expect(t, "^"+strings.Replace(containerCheck, "procs=1,2", "procs=1,3", 1)+"$", waitFor)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/root%s/host", init, bind))
	if err != nil || string(b) != "from the host" {
		t.Fatalf("the restored bind mount %s reads %q (%v), want the host file's %q", bind, b, err, "from the host")
	}
	th.stdin.Close()
	th.exit(t)
}

// pairScript is a container's init and its child talking over a unix
// socket pair made before the fork: for each line on its stdin the child
// receives a message (the first is one queued before the freeze) and
// prints it; the parent answers every ping with a pong.
const pairScript = `
import os, socket, sys
a, b = socket.socketpair()
a.send(b"queued")
if os.fork() == 0:
    a.close()
    for line in sys.stdin:
        n = line.strip()
        if n != "1":
            b.send(b"ping" + n.encode())
        print("child got", b.recv(64).decode(), flush=True)
    sys.exit(0)
b.close()
print("ready", flush=True)
while True:
    m = a.recv(64)
    if not m:
        break
    a.send(b"pong" + m[4:])
os.wait()
`

// TestContainerSocketPair: a unix socket pair between a container's init
// and its child, with a message queued, moves with the container twice
// (made by pthaw in the container's new network namespace, where the
// next freeze finds it): the queued message arrives, then ping and pong.
func TestContainerSocketPair(t *testing.T) {
	needRoot(t)
	py := fixture.Python(t)
	script := filepath.Join(t.TempDir(), "pair.py")
	if err := os.WriteFile(script, []byte(pairScript), 0o644); err != nil {
		t.Fatal(err)
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skipf("unshare not found: %v", err)
	}
	p := fixture.Start(t, unshare, "--fork", "--pid", "--mount-proc", "--uts", "--net", py, script)
	p.Lines.Expect(t, "^ready$", waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v)", p.Pid(), kids, err)
	}
	t.Cleanup(func() { p.Wait(waitFor) })
	killNSAtCleanup(t, kids[0])
	// Both are running their loops once the child waits on its stdin.
	waitWchan(t, nsMembers(t, kids[0]), "anon_pipe_read|pipe_read")
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(kids[0]), "-tree", "-halt", "-dest", snap)
	p.Wait(waitFor)

	th := thaw(t, "-src", snap, "-pidns")
	init := th.restoredPid(t)
	killNSAtCleanup(t, init)
	th.stdin.WriteString("1\n")
	th.out.Expect(t, "^child got queued$", waitFor)
	th.stdin.WriteString("2\n")
	th.out.Expect(t, "^child got pong2$", waitFor)

	snap = filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(init), "-tree", "-halt", "-dest", snap)
	th.exit(t)
	th = thaw(t, "-src", snap, "-pidns")
	killNSAtCleanup(t, th.restoredPid(t))
	th.stdin.WriteString("3\n")
	th.out.Expect(t, "^child got pong3$", waitFor)
	th.stdin.Close()
	if code := th.exit(t); code != 0 {
		t.Fatalf("pthaw exit code %d, want 0: %s", code, th.stderr.String())
	}
}

// waitWchan waits until one of the processes pids (a map of any key to
// our pid) sleeps in a kernel function matching rx.
func waitWchan(t *testing.T, pids map[int]int, rx string) {
	t.Helper()
	re := regexp.MustCompile("^(" + rx + ")$")
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		for _, pid := range pids {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", pid)); re.Match(b) {
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("none of %v sleeps in %s", pids, rx)
}

// listenScript is a container's init listening on a unix socket in its
// tmpfs (argv[1]) and on an abstract name, answering each connection;
// for each line on its stdin its child connects to both and prints the
// answers.
const listenScript = `
import os, select, socket, sys
path, abstract = sys.argv[1] + "/app.sock", "\0pcl-ctr-abstract"
l = socket.socket(socket.AF_UNIX)
l.bind(path)
l.listen(4)
a = socket.socket(socket.AF_UNIX)
a.bind(abstract)
a.listen(4)
if os.fork() == 0:
    l.close()
    a.close()
    for line in sys.stdin:
        for name in (path, abstract):
            c = socket.socket(socket.AF_UNIX)
            c.connect(name)
            c.send(line.strip().encode())
            print("reply", c.recv(64).decode(), flush=True)
            c.close()
    sys.exit(0)
print("ready", flush=True)
while True:
    for s in select.select([l, a], [], [])[0]:
        c, _ = s.accept()
        c.send(c.recv(64) + (b"-path" if s is l else b"-abstract"))
        c.close()
`

// TestContainerUnixListeners: a container's listening unix sockets, one
// on a path in its tmpfs and one on an abstract name of its network
// namespace, move with it: after the thaw both accept its child's
// connections, and neither name is this host's.
func TestContainerUnixListeners(t *testing.T) {
	needRoot(t)
	py := fixture.Python(t)
	dir, script := t.TempDir(), filepath.Join(t.TempDir(), "listen.py")
	if err := os.WriteFile(script, []byte(listenScript), 0o644); err != nil {
		t.Fatal(err)
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skipf("unshare not found: %v", err)
	}
	p := fixture.Start(t, unshare, "--fork", "--pid", "--mount-proc", "--uts", "--net", "sh", "-c",
		fmt.Sprintf("mount -t tmpfs ctrsock %s && exec %s %s %s", dir, py, script, dir))
	p.Lines.Expect(t, "^ready$", waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("unshare %d has children %v (%v)", p.Pid(), kids, err)
	}
	t.Cleanup(func() { p.Wait(waitFor) })
	killNSAtCleanup(t, kids[0])
	p.WriteLine("a")
	p.Lines.Expect(t, "^reply a-path$", waitFor)
	p.Lines.Expect(t, "^reply a-abstract$", waitFor)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(kids[0]), "-tree", "-halt", "-dest", snap)
	p.Wait(waitFor)

	th := thaw(t, "-src", snap, "-pidns")
	killNSAtCleanup(t, th.restoredPid(t))
	th.stdin.WriteString("b\n")
	th.out.Expect(t, "^reply b-path$", waitFor)
	th.out.Expect(t, "^reply b-abstract$", waitFor)
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("the container's socket file shows on this host: %s has %v (%v)", dir, ents, err)
	}
	if b, _ := os.ReadFile("/proc/net/unix"); strings.Contains(string(b), "@pcl-ctr-abstract") {
		t.Errorf("the container's abstract name is in this host's network namespace")
	}
	// The init serves forever: killing it at cleanup ends pthaw.
}
