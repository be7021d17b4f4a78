package main

import (
	"bytes"
	"context"
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

// stallGuard is a hang guard, not a speed check: far beyond the 1 s
// timeouts the stall tests pass.
const stallGuard = 60 * time.Second

// TestFreezeToStalledPipe: pfreeze writes a snapshot to a pipe whose
// reader never reads. With the process frozen meanwhile, the write may
// wait at most -write-timeout: then pfreeze gives up with one line, and
// the process runs on as it was. (Before, pfreeze waited for ever with
// the process frozen.)
func TestFreezeToStalledPipe(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "8", "3")
	p.Expect(t, `^ready hash=[0-9a-f]+$`, waitFor)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close() // held open, never read: the pipe fills and stays full
	ctx, cancel := context.WithTimeout(context.Background(), stallGuard)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-write-timeout", "1s")
	cmd.Stdout = pw
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	pw.Close()
	if ctx.Err() != nil {
		t.Fatalf("pfreeze into a pipe nobody reads did not give up within %v", stallGuard)
	}
	if err == nil {
		t.Fatal("pfreeze into a pipe nobody reads succeeded")
	}
	if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pfreeze: ") || !strings.Contains(msg, "no progress for 1s") {
		t.Errorf("stderr %q, want one line starting with \"pfreeze: \" saying \"no progress for 1s\"", msg)
	}
	untouched(t, p.Pid())
	p.Drain()
	p.Expect(t, `^tick \d+$`, waitFor)
}

// TestThawFromStalledPipe: pthaw reads a snapshot from stdin, a pipe
// whose writer keeps it open and stops writing — at once, or after part
// of a tree snapshot (the members' stubs are built and stopped). Each
// read may wait at most -read-timeout: then pthaw gives up with one line,
// leaving nothing of the restore behind. (Before, pthaw waited for ever.)
func TestThawFromStalledPipe(t *testing.T) {
	needRoot(t)
	p, _, good := forkserverSnapshot(t)
	for _, c := range []struct {
		name string
		data []byte
	}{{"nothing", nil}, {"all but the last byte", good[:len(good)-1]}} {
		t.Run(c.name, func(t *testing.T) {
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer pw.Close() // held open: the reader never sees the end
			ctx, cancel := context.WithTimeout(context.Background(), stallGuard)
			defer cancel()
			cmd := exec.CommandContext(ctx, filepath.Join(binDir, "pthaw"), "-read-timeout", "1s")
			cmd.Stdin = pr
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			pr.Close()
			if _, err := pw.Write(c.data); err != nil {
				t.Fatal(err)
			}
			err = cmd.Wait()
			if ctx.Err() != nil {
				t.Fatalf("pthaw reading a stalled pipe did not give up within %v", stallGuard)
			}
			if err == nil {
				t.Fatal("pthaw restored from a stalled pipe")
			}
			if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pthaw: ") || !strings.Contains(msg, "no progress for 1s") {
				t.Errorf("stderr %q, want one line starting with \"pthaw: \" saying \"no progress for 1s\"", msg)
			}
			for _, q := range inSession(cmd.Process.Pid) {
				t.Errorf("pid %d (%s, state %c, parent %d) of the failed restore left behind", q.pid, q.comm, q.state, q.ppid)
				syscall.Kill(q.pid, syscall.SIGKILL)
			}
		})
	}
	forkTick(t, p.Lines) // the original carries on
}
