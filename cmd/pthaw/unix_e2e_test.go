package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestInheritFD: pfreeze -halt of a process whose fds 3 and 4 are FIFOs
// leading outside says what becomes of them, and pthaw -inherit-fd 3=3
// -inherit-fd 4=4 gives the copy pipes of its own there instead: the copy
// reads what we put in the one and its write arrives in the other.
func TestInheritFD(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	rf, wf := filepath.Join(dir, "r"), filepath.Join(dir, "w")
	for _, f := range []string{rf, wf} {
		if err := syscall.Mkfifo(f, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	reader, err := os.OpenFile(wf, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "unixpair"), "outpipe", rf, wf)
	orig.Expect(t, `^ready$`, waitFor)
	snap := filepath.Join(dir, "snap")
	out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(pid), "-halt", "-dest", snap).CombinedOutput()
	if err != nil {
		t.Fatalf("pfreeze: %v: %s", err, out)
	}
	for _, want := range []string{"pfreeze: fd 3 (", "pfreeze: fd 4 (", "leads outside the process", "pthaw -inherit-fd 3=FD"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("pfreeze said %q, want %q", out, want)
		}
	}

	// A bad -inherit-fd is refused in one line.
	bad, err := exec.Command(filepath.Join(binDir, "pthaw"), "-src", snap, "-inherit-fd", "3=99").CombinedOutput()
	if err == nil || !strings.Contains(string(bad), "pthaw's fd 99 is not open") {
		t.Errorf("pthaw -inherit-fd 3=99: %v: %s", err, bad)
	}

	r3, w3, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r3.Close()
	w3.WriteString("fresh")
	w3.Close()
	r4, w4, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r4.Close()
	cmd := exec.Command(filepath.Join(binDir, "pthaw"), "-src", snap, "-inherit-fd", "3=3", "-inherit-fd", "4=4")
	cmd.ExtraFiles = []*os.File{r3, w4}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	cmd.Stdout, cmd.Stderr = pw, pw
	lines := fixture.FollowReader(t, pr)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	w4.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	// The copy has the original's PID (free once it was killed); it
	// runs once pthaw has let it go.
	deadline := time.Now().Add(waitFor)
	for !runsFree(pid, "unixpair") {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never ran", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	lines.Expect(t, `^read: fresh$`, waitFor)
	lines.Expect(t, `^eof$`, waitFor)
	lines.Expect(t, `^wrote$`, waitFor)
	b := make([]byte, 1)
	r4.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := r4.Read(b); err != nil || b[0] != 'w' {
		t.Errorf("read %q (%v) from the pipe given as fd 4, want \"w\"", b, err)
	}
	if err := <-done; err != nil {
		t.Errorf("pthaw: %v", err)
	}
	done <- nil // for the cleanup
}

// runsFree reports whether pid is a process named name that nobody
// traces: a restored process pthaw has let go.
func runsFree(pid int, name string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	return err == nil && strings.Contains(string(b), "Name:\t"+name+"\n") && strings.Contains(string(b), "TracerPid:\t0\n")
}
