package cluster_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/node"
	"golang.org/x/sys/unix"
)

// sockDir returns a fresh directory every user can enter (t.TempDir is
// 0700), holding a copy of pclusterctl every user can run, both removed at
// the end of the test.
func sockDir(t *testing.T, c *testCluster) (dir, ctl string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "pcluster-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(c.ctlBin)
	if err != nil {
		t.Fatal(err)
	}
	ctl = filepath.Join(dir, "pclusterctl")
	if err := os.WriteFile(ctl, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir, ctl
}

// startDev starts pclusterd -dev with its socket at sock, under umask 0
// (the worst case for a socket's mode), and waits for it to lead.
func startDev(t *testing.T, c *testCluster, sock string, extra ...string) *testNode {
	t.Helper()
	tmp := t.TempDir()
	logPath := filepath.Join(tmp, "dev.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := append([]string{"-c", `umask 0 && exec "$0" "$@"`, c.daemon, "-dev", "-node", c.prefix + "-dev", "-socket", sock}, extra...)
	cmd := exec.Command("sh", args...)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		// -dev makes its data dir in TMPDIR and removes it at exit; the
		// workloads' cgroups are named after it (node.CgroupBase), and
		// a workload still running or not yet reaped at the shutdown
		// leaves its cgroup: remove them as a test node's.
		dataDirs, _ := filepath.Glob(filepath.Join(tmp, "pclusterd-dev-*"))
		cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		for _, d := range dataDirs {
			if err := node.RemoveCgroups(c.prefix+"-dev", d); err != nil {
				t.Errorf("dev node: %v", err)
			}
		}
	})
	nd := &testNode{name: c.prefix + "-dev", socket: sock, logPath: logPath}
	nd.client, _ = api.New(sock, nil)
	c.waitFor(15*time.Second, "dev cluster leader", func() error { return converged(nd, 1) })
	return nd
}

// asUser runs pclusterctl ctl with args as uid 65534 under setpriv with
// the given setpriv options; it returns stderr and the exit code.
func asUser(t *testing.T, ctl string, setpriv []string, args ...string) (string, int) {
	t.Helper()
	all := append(append([]string{"--reuid", "65534"}, setpriv...), "--", ctl)
	cmd := exec.Command("setpriv", append(all, args...)...)
	cmd.Env = append(os.Environ(), "PCLUSTER_ADDR=", "PCLUSTER_KEY_FILE=")
	cmd.Dir = "/"
	var errb strings.Builder
	cmd.Stdout, cmd.Stderr = io.Discard, &errb
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return errb.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("setpriv %v: %v", all, err)
	}
	return errb.String(), 0
}

// connectLoop starts a uid-65534 process that connects to sock over and
// over, from before pclusterd starts; the function returned stops it and
// returns what it reports ("" if it never got in).
func connectLoop(t *testing.T, sock string) func() string {
	t.Helper()
	const prog = `
import socket, sys
print("ready", flush=True)
while True:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
        print("connected", flush=True)
        sys.exit(0)
    except OSError:
        pass
    finally:
        s.close()
`
	cmd := exec.Command("/usr/bin/python3", "-c", prog, sock)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Skipf("no python3 to run the connect loop: %v", err)
	}
	r := bufio.NewReader(out)
	if line, err := r.ReadString('\n'); err != nil || line != "ready\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("connect loop: %q %v", line, err)
	}
	var once sync.Once
	var rest string
	stop := func() string {
		once.Do(func() {
			cmd.Process.Kill()
			b, _ := io.ReadAll(r)
			cmd.Wait()
			rest = strings.TrimSpace(string(b))
		})
		return rest
	}
	t.Cleanup(func() { stop() })
	return stop
}

// TestSocketCreatedWithFinalMode starts pclusterd under umask 0 and watches
// the socket's directory with inotify: the socket's name must never be
// created in place (bind then chmod leaves a window in which any local user
// can connect), only renamed there with its final mode, 0600. A uid-65534
// connect loop running across the start never gets in, and a uid-65534
// client cannot use the socket afterwards.
func TestSocketCreatedWithFinalMode(t *testing.T) {
	c := newTestCluster(t)
	dir, ctl := sockDir(t, c)
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "d.sock")
	loop := connectLoop(t, sock)
	nd := startDev(t, c, sock)
	if got := loop(); got != "" {
		t.Errorf("uid 65534 connected to the socket while pclusterd started: %s", got)
	}

	created, moved := false, false
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		for b := buf[:n]; len(b) >= unix.SizeofInotifyEvent; {
			mask := binary.NativeEndian.Uint32(b[4:8])
			nameLen := int(binary.NativeEndian.Uint32(b[12:16]))
			name := strings.TrimRight(string(b[unix.SizeofInotifyEvent:unix.SizeofInotifyEvent+nameLen]), "\x00")
			if name == "d.sock" {
				created = created || mask&unix.IN_CREATE != 0
				moved = moved || mask&unix.IN_MOVED_TO != 0
			}
			b = b[unix.SizeofInotifyEvent+nameLen:]
		}
	}
	if created || !moved {
		t.Errorf("socket %s: created in place %v, renamed into place %v; want only renamed, with its final mode", sock, created, moved)
	}
	st, err := os.Lstat(sock)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode under umask 0: %v %v, want 0600", st.Mode(), err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".pclusterd-sock-*")); len(left) != 0 {
		t.Errorf("private bind directories left behind: %v", left)
	}
	if errs, code := asUser(t, ctl, []string{"--regid", "65534", "--clear-groups"}, "run", "-address", sock, "--", "/bin/true"); code == 0 {
		t.Errorf("uid 65534 ran a workload through the 0600 socket: %s", errs)
	}
	if ws, err := nd.client.Workloads(context.Background()); err != nil || len(ws) != 0 {
		t.Errorf("workloads: %v %v, want none", ws, err)
	}
}

// TestSocketPeerCred checks the socket's second lock, the peer credentials
// (SO_PEERCRED) checked on every connection: with the file made reachable by
// everyone, uid 65534 is refused with 403 and one line naming its uid, and
// the daemon logs it.
func TestSocketPeerCred(t *testing.T) {
	c := newTestCluster(t)
	dir, ctl := sockDir(t, c)
	sock := filepath.Join(dir, "d.sock")
	nd := startDev(t, c, sock)
	// Whatever makes the file reachable (a chmod, a bind mount), the peer
	// check still refuses.
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	errs, code := asUser(t, ctl, []string{"--regid", "65534", "--clear-groups"}, "run", "-address", sock, "--", "/bin/true")
	if code != 1 || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, "peer uid 65534") {
		t.Errorf("uid 65534 on a reachable socket: exit %d, stderr %q; want exit 1 and one line naming uid 65534", code, errs)
	}
	if ws, err := nd.client.Workloads(context.Background()); err != nil || len(ws) != 0 {
		t.Errorf("workloads after the refused peer: %v %v, want none", ws, err)
	}
	if b, _ := os.ReadFile(nd.logPath); !strings.Contains(string(b), "socket peer refused") || !strings.Contains(string(b), "peer uid 65534") {
		t.Errorf("daemon log does not name the refused peer")
	}
}

// TestSocketGroup checks -socket-group: the socket is 0660 and the group's,
// a uid outside it is kept out, and members (by supplementary group, read
// with SO_PEERGROUPS, or by primary gid) are served.
func TestSocketGroup(t *testing.T) {
	c := newTestCluster(t)
	group := "pcsg-" + c.prefix
	if out, err := exec.Command("groupadd", "--system", group).CombinedOutput(); err != nil {
		t.Fatalf("groupadd: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("groupdel", group).Run() })
	dir, ctl := sockDir(t, c)
	sock := filepath.Join(dir, "d.sock")
	nd := startDev(t, c, sock, "-socket-group", group)

	st, err := os.Lstat(sock)
	if err != nil || st.Mode().Perm() != 0o660 {
		t.Errorf("socket mode with -socket-group: %v %v, want 0660", st.Mode(), err)
	}
	if errs, code := asUser(t, ctl, []string{"--regid", "65534", "--clear-groups"}, "run", "-address", sock, "--", "/bin/true"); code == 0 {
		t.Errorf("uid 65534 outside the group ran a workload: %s", errs)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	if errs, code := asUser(t, ctl, []string{"--regid", "65534", "--clear-groups"}, "run", "-address", sock, "--", "/bin/true"); code != 1 {
		t.Errorf("uid 65534 outside the group on a reachable socket: exit %d, %s; want 1", code, errs)
	}
	if ws, err := nd.client.Workloads(context.Background()); err != nil || len(ws) != 0 {
		t.Errorf("workloads after refused peers: %v %v, want none", ws, err)
	}
	if err := os.Chmod(sock, 0o660); err != nil {
		t.Fatal(err)
	}
	for name, opts := range map[string][]string{
		"supplementary group": {"--regid", "65534", "--groups", group},
		"primary group":       {"--regid", group, "--clear-groups"},
	} {
		if errs, code := asUser(t, ctl, opts, "members", "-address", sock); code != 0 {
			t.Errorf("uid 65534 with %s %s: exit %d: %s", name, group, code, errs)
		}
	}
}
