package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// TestCheckpointKilledLeavesRemains: pfreeze (a copy-on-write
// checkpoint) killed with SIGKILL during the memory copy (blocked on a
// pipe nobody reads, the process let go) leaves the
// process running with the remains of its snapshot child, a zombie
// marked as ours (no exit signal, exit status 0x70); the next pfreeze of
// a single process is not refused for it ("child processes") and reaps
// it, and the process still has the memory it had.
func TestCheckpointKilledLeavesRemains(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "512", "9")
	hash := p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, time.Minute)[1]
	pid := strconv.Itoa(p.Pid())
	// pfreeze writes into a pipe nobody reads: it blocks in the copy,
	// after the process was let go, its snapshot child alive.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", pid)
	cmd.Stdout = pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	// Full (64 KiB, far more than the header pfreeze writes before it
	// stops the process): the snapshot's records come after the process
	// was let go.
	for deadline := time.Now().Add(waitFor); ; {
		if n, err := unix.IoctlGetInt(int(pr.Fd()), unix.TIOCINQ); err == nil && n >= 64<<10 {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("pfreeze did not fill its pipe")
		}
		time.Sleep(time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	// procfs.Children lists zombies too (fixture.Children does not).
	kids, err := procfs.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("pid %s has children %v (%v) after pfreeze was killed, want the snapshot child's remains", pid, kids, err)
	}
	remains := kids[0]
	for deadline := time.Now().Add(waitFor); procState(remains) != 'Z'; {
		if time.Now().After(deadline) {
			t.Fatalf("the snapshot child %d is in state %q, want a zombie (it exits once let go)", remains, procState(remains))
		}
		time.Sleep(time.Millisecond)
	}
	dir := t.TempDir()
	out, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", pid, "-dest", filepath.Join(dir, "snap")).CombinedOutput()
	if err != nil {
		t.Fatalf("pfreeze after the remains: %v: %s", err, out)
	}
	if kids, err := procfs.Children(p.Pid()); err != nil || len(kids) != 0 {
		t.Errorf("pid %s has children %v (%v) after the next checkpoint, want none (the remains reaped)", pid, kids, err)
	}
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	p.Lines.Expect(t, `^check hash=`+hash+` ok$`, time.Minute)
}
