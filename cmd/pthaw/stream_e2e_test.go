package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

// keyDir makes a directory holding one 32-byte key, site.key.
func keyDir(t testing.TB) (dir, keyfile string) {
	t.Helper()
	dir = t.TempDir()
	key := make([]byte, 32)
	rand.Read(key)
	keyfile = filepath.Join(dir, "site.key")
	if err := os.WriteFile(keyfile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, keyfile
}

// sendCmd returns a pfreeze command, run on host h (nil: here).
func sendCmd(h *netlab.Host, args ...string) *exec.Cmd {
	if h != nil {
		return h.Command(filepath.Join(binDir, "pfreeze"), args...)
	}
	return exec.Command(filepath.Join(binDir, "pfreeze"), args...)
}

// TestLayersMatrix moves a process through every compression ×
// encryption × endpoint combination, each with -halt (through a pipe,
// which cannot carry -halt, it copies it).
func TestLayersMatrix(t *testing.T) {
	needRoot(t)
	dir, keyfile := keyDir(t)
	bin := fixture.Build(t, "countforever")
	for _, sink := range []string{"file", "pipe", "tcp", "unix"} {
		for _, comp := range []string{"none", "auto", "gzip", "flate", "snappy", "zstd"} {
			for _, enc := range []string{"none", "aes-gcm", "chacha20-poly1305"} {
				t.Run(sink+"/"+comp+"/"+enc, func(t *testing.T) {
					p := fixture.Start(t, bin, "5")
					p.Lines.Expect(t, `^2$`, waitFor)
					args := []string{"-pid", strconv.Itoa(p.Pid()), "-compress", comp}
					if sink != "pipe" {
						// A pipe acknowledges nothing: -halt to one is
						// refused (TestHaltToPipeRefused), so through a
						// pipe the process is copied, under a new PID.
						args = append(args, "-halt")
					}
					var thawArgs []string
					if enc != "none" {
						args = append(args, "-encrypt", enc+":"+keyfile)
						thawArgs = append(thawArgs, "-keydir", dir)
					}
					var th *thawed
					fr := sendCmd(nil)
					switch sink {
					case "file":
						snap := filepath.Join(t.TempDir(), "snap")
						args = append(args, "-dest", snap)
						fr.Args = append(fr.Args, args...)
						if out, err := fr.CombinedOutput(); err != nil {
							t.Fatalf("pfreeze: %v: %s", err, out)
						}
						th = thaw(t, append(thawArgs, "-src", snap)...)
					case "pipe":
						pr, pw, err := os.Pipe()
						if err != nil {
							t.Fatal(err)
						}
						fr.Args = append(fr.Args, args...)
						fr.Stdout = pw
						if err := fr.Start(); err != nil {
							t.Fatal(err)
						}
						pw.Close()
						th = startThawCmd(t, &thawed{cmd: exec.Command(filepath.Join(binDir, "pthaw"), append(thawArgs, "-new-pid")...)}, pr)
						if err := fr.Wait(); err != nil {
							t.Fatalf("pfreeze: %v", err)
						}
					case "tcp", "unix":
						src := "tcp:127.0.0.1:0"
						if sink == "unix" {
							src = "unix:" + filepath.Join(t.TempDir(), "sock")
						}
						th = thaw(t, append(thawArgs, "-src", src)...)
						addr := th.listening(t)
						if sink == "unix" {
							addr = strings.TrimPrefix(src, "unix:")
						}
						fr.Args = append(fr.Args, append(args, "-dest", sink+":"+addr)...)
						if out, err := fr.CombinedOutput(); err != nil {
							t.Fatalf("pfreeze: %v: %s; pthaw: %s", err, out, th.stderr.String())
						}
					}
					th.out.Expect(t, `^\d+$`, waitFor)
					if sink == "pipe" {
						if got := th.restoredPid(t); got == p.Pid() {
							t.Errorf("restored pid %d with -new-pid, want another", got)
						}
						return
					}
					if got := th.restoredPid(t); got != p.Pid() {
						t.Errorf("restored pid %d, want %d", got, p.Pid())
					}
					select {
					case <-p.Exited():
					case <-time.After(waitFor):
						t.Fatal("the original still runs after pfreeze -halt")
					}
				})
			}
		}
	}
}

// TestMigrateBetweenHosts moves a counter from one test host to another
// over tcp, compressed and encrypted: it carries on there, and the
// original is gone.
func TestMigrateBetweenHosts(t *testing.T) {
	needRoot(t)
	lab := netlab.New(t, 2, 10)
	a, b := lab.Hosts[0], lab.Hosts[1]
	dir, keyfile := keyDir(t)
	p := fixture.Start(t, "nsenter", append([]string{"--net=/run/netns/" + a.NS, "--"}, fixture.Build(t, "countforever"), "5")...)
	p.Lines.Expect(t, `^3$`, waitFor)
	th := thawCmd(t, b.Command(filepath.Join(binDir, "pthaw"), "-src", "tcp:"+b.Addr+":25088", "-keydir", dir))
	th.listening(t)
	fr := sendCmd(a, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+b.Addr+":25088",
		"-compress", "zstd", "-encrypt", "aes-gcm:"+keyfile, "-halt")
	if out, err := fr.CombinedOutput(); err != nil {
		t.Fatalf("pfreeze: %v: %s; pthaw: %s", err, out, th.stderr.String())
	}
	n := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1])
	th.out.Expect(t, fmt.Sprintf(`^%d$`, n+1), waitFor)
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatal("the original still runs after the migration")
	}
	// The restored process lives in host b's network namespace.
	pid := th.restoredPid(t)
	mine, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
	want, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", th.cmd.Process.Pid))
	if mine != want {
		t.Errorf("restored process in net namespace %s, want host b's %s", mine, want)
	}
}

// TestListenerRefusals: every unauthenticated or unauthentic stream is
// refused with one line, nothing is restored, and a -halt sender resumes
// its process.
func TestListenerRefusals(t *testing.T) {
	needRoot(t)
	lab := netlab.New(t, 2, 11)
	b := lab.Hosts[1]
	dir, keyfile := keyDir(t)
	_, otherKey := keyDir(t)

	t.Run("non-loopback without keys", func(t *testing.T) {
		out, err := b.Command(filepath.Join(binDir, "pthaw"), "-src", "tcp:"+b.Addr+":25089").CombinedOutput()
		if err == nil || strings.Count(string(out), "\n") != 1 || !strings.Contains(string(out), "-keydir") {
			t.Fatalf("pthaw without -keydir on %s: err %v, output %q; want one line refusing", b.Addr, err, out)
		}
	})
	bin := fixture.Build(t, "countforever")
	// A stream the listener cannot authenticate does not take its one
	// turn: the sender is refused (and resumes its process), pthaw says so
	// and keeps listening for the key holder.
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"wrong key", []string{"-encrypt", "aes-gcm:" + otherKey}},
		{"plaintext to an encrypted listener", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := fixture.Start(t, bin, "5")
			p.Lines.Expect(t, `^2$`, waitFor)
			th := thaw(t, "-src", "tcp:127.0.0.1:0", "-keydir", dir)
			addr := th.listening(t)
			fr := sendCmd(nil, append([]string{"-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:" + addr, "-halt"}, tc.args...)...)
			out, err := fr.CombinedOutput()
			if err == nil || strings.Count(string(out), "\n") != 1 || strings.Contains(string(out), dir) {
				t.Fatalf("pfreeze: err %v, output %q; want one line refusing, without the receiver's key directory", err, out)
			}
			th.said(t, `dropped a connection from 127\.0\.0\.1:\d+: .*; still listening`)
			// The original resumed.
			n := atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
			p.Lines.Expect(t, fmt.Sprintf(`^%d$`, n+1), waitFor)
			if pids := processesOf(bin); len(pids) != 1 || pids[0] != p.Pid() {
				t.Errorf("processes running %s: %v, want only the original %d", bin, pids, p.Pid())
			}
			// The key holder still gets through.
			if out, err := sendCmd(nil, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+addr, "-encrypt", "aes-gcm:"+keyfile, "-halt").CombinedOutput(); err != nil {
				t.Fatalf("pfreeze with the key after a refused sender: %v: %s; pthaw: %s", err, out, th.stderr.String())
			}
			th.out.Expect(t, `^\d+$`, waitFor)
		})
	}
	// The sender's side: an unencrypted snapshot does not leave loopback
	// unless the user says -insecure (anyone listening there first could
	// read it, and acknowledge it to have -halt kill the original).
	t.Run("plaintext beyond loopback", func(t *testing.T) {
		a := lab.Hosts[0]
		p := fixture.Start(t, "nsenter", "--net=/run/netns/"+a.NS, "--", bin, "5")
		p.Lines.Expect(t, `^2$`, waitFor)
		th := thawCmd(t, b.Command(filepath.Join(binDir, "pthaw"), "-src", "tcp:"+b.Addr+":25091", "-insecure"))
		th.listening(t)
		out, err := sendCmd(a, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+b.Addr+":25091", "-halt").CombinedOutput()
		if err == nil || strings.Count(string(out), "\n") != 1 || !strings.Contains(string(out), "refusing to send an unencrypted snapshot beyond loopback") {
			t.Fatalf("pfreeze to %s without -encrypt or -insecure: err %v, output %q; want one line refusing", b.Addr, err, out)
		}
		if code := th.exit(t); code == 0 {
			t.Fatal("pthaw restored something")
		}
		n := atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
		p.Lines.Expect(t, fmt.Sprintf(`^%d$`, n+1), waitFor)
	})
	// Garbage, or a connection that says nothing, is dropped with a
	// warning and the listener takes the next: whoever reaches the port
	// first cannot make the real migration fail.
	t.Run("garbage, then the sender", func(t *testing.T) {
		th := thaw(t, "-src", "tcp:127.0.0.1:0", "-keydir", dir)
		addr := th.listening(t)
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		junk := make([]byte, 1<<16)
		rand.Read(junk)
		c.Write(junk)
		c.Close()
		th.said(t, `dropped a connection from 127\.0\.0\.1:\d+: not a pcluster sender \(bad greeting\); still listening`)
		gone, err := net.Dial("tcp", addr) // a port scanner: connects, says nothing, leaves
		if err != nil {
			t.Fatal(err)
		}
		gone.Close()
		th.said(t, `(?s)dropped a connection.*dropped a connection from [^ ]+: .*; still listening`)
		p := fixture.Start(t, bin, "5")
		p.Lines.Expect(t, `^2$`, waitFor)
		if out, err := sendCmd(nil, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+addr, "-encrypt", "aes-gcm:"+keyfile, "-halt").CombinedOutput(); err != nil {
			t.Fatalf("pfreeze after the garbage: %v: %s; pthaw: %s", err, out, th.stderr.String())
		}
		n := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1])
		th.out.Expect(t, fmt.Sprintf(`^%d$`, n+1), waitFor)
	})
}

// TestHaltFaults breaks a -halt migration in the middle: the original must
// be running afterwards with its memory intact, and nothing restored.
func TestHaltFaults(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "bigheap")
	start := func(t *testing.T, h *netlab.Host) (*fixture.Proc, string) {
		args := []string{bin, "256", "5"}
		if h != nil {
			args = append([]string{"--net=/run/netns/" + h.NS, "--"}, args...)
			p := fixture.Start(t, "nsenter", args...)
			return p, p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, 60*time.Second)[1]
		}
		p := fixture.Start(t, args[0], args[1:]...)
		return p, p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, 60*time.Second)[1]
	}
	intact := func(t *testing.T, p *fixture.Proc, hash string) {
		t.Helper()
		if err := p.Signal(syscall.SIGUSR1); err != nil {
			t.Fatalf("the original is gone: %v", err)
		}
		p.Lines.Expect(t, fmt.Sprintf(`^check hash=%s ok$`, hash), 60*time.Second)
		if pids := processesOf(bin); len(pids) != 1 {
			t.Errorf("processes running %s: %v, want only the original", bin, pids)
		}
	}
	// waitStub waits until pthaw is building (it has a child).
	waitStub := func(t *testing.T, th *thawed) {
		t.Helper()
		th.waitChild(t, "child", func(int) bool { return true })
	}

	t.Run("pthaw killed mid-transfer", func(t *testing.T) {
		p, hash := start(t, nil)
		th := thaw(t, "-src", "tcp:127.0.0.1:0")
		addr := th.listening(t)
		fr := sendCmd(nil, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+addr, "-halt", "-compress", "gzip")
		var frOut bytes.Buffer
		fr.Stderr = &frOut
		if err := fr.Start(); err != nil {
			t.Fatal(err)
		}
		waitStub(t, th)
		th.cmd.Process.Kill()
		if err := fr.Wait(); err == nil {
			t.Fatal("pfreeze succeeded although the receiver died")
		}
		if strings.Count(frOut.String(), "\n") != 1 {
			t.Errorf("pfreeze stderr %q, want one line", frOut.String())
		}
		intact(t, p, hash)
	})

	t.Run("link cut", func(t *testing.T) {
		lab := netlab.New(t, 2, 12)
		a, b := lab.Hosts[0], lab.Hosts[1]
		p, hash := start(t, a)
		th := thawCmd(t, b.Command(filepath.Join(binDir, "pthaw"), "-src", "tcp:"+b.Addr+":25090", "-insecure", "-read-timeout", "2s"))
		th.listening(t)
		fr := sendCmd(a, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+b.Addr+":25090", "-insecure", "-halt", "-compress", "gzip", "-write-timeout", "2s")
		if err := fr.Start(); err != nil {
			t.Fatal(err)
		}
		waitStub(t, th)
		lab.Cut(t, 1, true)
		if err := fr.Wait(); err == nil {
			t.Fatal("pfreeze succeeded over a cut link")
		}
		if code := th.exit(t); code == 0 {
			t.Fatal("pthaw succeeded over a cut link")
		}
		intact(t, p, hash)
	})

	t.Run("restore fails", func(t *testing.T) {
		// pthaw runs where the program's directory is hidden by an empty
		// tmpfs: it cannot map the executable, and says so to pfreeze.
		p, hash := start(t, nil)
		cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
			`mount -t tmpfs none "$1" && exec "$2" -src tcp:127.0.0.1:0`, "sh", filepath.Dir(bin), filepath.Join(binDir, "pthaw"))
		th := thawCmd(t, cmd)
		addr := th.listening(t)
		out, err := sendCmd(nil, "-pid", strconv.Itoa(p.Pid()), "-dest", "tcp:"+addr, "-halt").CombinedOutput()
		if err == nil {
			t.Fatal("pfreeze succeeded although the restore failed")
		}
		if !strings.Contains(string(out), "no such file") {
			t.Errorf("pfreeze said %q, want the receiver's reason", out)
		}
		if code := th.exit(t); code == 0 {
			t.Fatal("pthaw succeeded")
		}
		intact(t, p, hash)
	})
}

// TestInterruptWhileListening: a pthaw waiting for a sender stops on
// SIGTERM or SIGINT with one line, having restored nothing.
func TestInterruptWhileListening(t *testing.T) {
	needRoot(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		th := thaw(t, "-src", "tcp:127.0.0.1:0")
		th.listening(t)
		th.cmd.Process.Signal(sig)
		if code := th.exit(t); code == 0 {
			t.Fatalf("pthaw exited 0 after %v", sig)
		}
		want := fmt.Sprintf("pthaw: interrupted by %s before the process was built: nothing restored\n", unix.SignalName(sig))
		if msg := th.stderr.String(); !strings.HasSuffix(msg, want) {
			t.Errorf("pthaw stderr %q, want it to end with %q", msg, want)
		}
	}
}

// TestLoopbackOtherUser: a plaintext loopback listener drops a sender
// running as another user (any local user can reach loopback) and keeps
// listening for its own.
func TestLoopbackOtherUser(t *testing.T) {
	needRoot(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	th := thaw(t, "-src", "tcp:127.0.0.1:0")
	host, port, _ := net.SplitHostPort(th.listening(t))
	// bash's /dev/tcp: a sender as uid 1000 with nothing else to install.
	script := fmt.Sprintf("exec 3<>/dev/tcp/%s/%s; echo PCLUSTER >&3; sleep 1", host, port)
	if out, err := exec.Command(setpriv, "--reuid", "1000", "--regid", "1000", "--clear-groups", "/bin/bash", "-c", script).CombinedOutput(); err != nil {
		t.Logf("sender: %v: %s", err, out)
	}
	th.said(t, `dropped a connection from 127\.0\.0\.1:\d+: sender runs as uid 1000, not ours \(0\) nor root.*; still listening`)
	if th.child() > 0 {
		t.Fatal("pthaw built a process from uid 1000's stream")
	}
}

// TestHaltToPipeRefused: "pfreeze -halt | pthaw" lost the process when
// pthaw failed after reading it all (here: pthaw as an unprivileged user,
// which fails at PR_SET_MM_MAP), since a pipe acknowledges nothing. -halt
// to a pipe or a FIFO is now refused with one line naming what to use
// instead, before the process is touched; -halt to a regular file, as
// stdout or named, still moves it.
func TestHaltToPipeRefused(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "countforever")
	p := fixture.Start(t, bin, "5")
	n := atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
	pid := strconv.Itoa(p.Pid())

	refused := func(what string, fr *exec.Cmd) {
		t.Helper()
		var stderr bytes.Buffer
		fr.Stderr = &stderr
		err := fr.Run()
		msg := stderr.String()
		if err == nil {
			t.Fatalf("%s: pfreeze -halt succeeded; want it refused", what)
		}
		if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pfreeze: ") || !strings.Contains(msg, "-dest tcp:HOST:PORT") {
			t.Errorf("%s: stderr %q, want one line naming -dest tcp:HOST:PORT", what, msg)
		}
		// Still running, and still counting.
		n = atoi(t, p.Lines.Expect(t, fmt.Sprintf(`^(%d)$`, n+1), waitFor)[1])
	}

	// The reviewer's pipeline: pfreeze -halt | setpriv --reuid 65534 ... pthaw.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	th := exec.Command("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", filepath.Join(binDir, "pthaw"))
	th.Stdin = pr
	if err := th.Start(); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	fr := sendCmd(nil, "-pid", pid, "-halt")
	fr.Stdout = pw
	refused("stdout a pipe", fr)
	pw.Close()
	th.Wait()

	// A FIFO with a reader (opened read-write, so that opening never waits).
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	rd, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	drained := make(chan struct{})
	go func() { io.Copy(io.Discard, rd); close(drained) }()
	refused("-dest FIFO", sendCmd(nil, "-pid", pid, "-halt", "-dest", fifo))
	rd.Close()
	<-drained

	// stdout redirected to a regular file: fsync'ed, then the kill.
	snap, err := os.Create(filepath.Join(t.TempDir(), "snap"))
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	fr = sendCmd(nil, "-pid", pid, "-halt")
	fr.Stdout = snap
	var stderr bytes.Buffer
	fr.Stderr = &stderr
	if err := fr.Run(); err != nil {
		t.Fatalf("pfreeze -halt > FILE: %v: %s", err, stderr.String())
	}
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatal("the original still runs after pfreeze -halt > FILE")
	}
	restored := thaw(t, "-src", snap.Name())
	if got := atoi(t, restored.out.Expect(t, `^(\d+)$`, waitFor)[1]); got <= n {
		t.Errorf("the restored counter says %d, want it past %d", got, n)
	}
	if got := restored.restoredPid(t); got != p.Pid() {
		t.Errorf("restored pid %d, want %d", got, p.Pid())
	}
}
