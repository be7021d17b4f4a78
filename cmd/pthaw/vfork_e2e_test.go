package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestFreezeVforkParent freezes a parent waiting in vfork for a child
// that never execs (fixture vforker), with -tree and alone. The parent
// cannot reach a ptrace stop until its child execs or exits, so pfreeze
// must refuse with one line naming the child, and both processes must
// carry on as they were: neither traced nor stopped, no signal pending,
// the child still ticking. (Before the fix, pfreeze -tree waited for the
// parent's stop forever: the guard below gives up on it.)
func TestFreezeVforkParent(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "vforker"))
	parent := p.Pid()
	p.Expect(t, `^parent `+strconv.Itoa(parent)+`$`, waitFor)
	child, err := strconv.Atoi(p.Expect(t, `^child (\d+) tick \d+$`, waitFor)[1])
	if err != nil {
		t.Fatal(err)
	}
	// The parent must reap its child: killed first (by the group kill
	// at cleanup), the child would be left to init as a zombie.
	t.Cleanup(func() {
		syscall.Kill(child, syscall.SIGKILL)
		p.Expect(t, `^parent resumed child=9$`, waitFor)
	})
	// The child runs before the parent sleeps in the kernel's vfork
	// wait: wait for that.
	waitState(t, parent, 'D')
	for _, args := range [][]string{{"-tree"}, nil} {
		t.Run(fmt.Sprintf("args=%v", args), func(t *testing.T) {
			snap := filepath.Join(t.TempDir(), "snap")
			// A hang guard, not a speed check: a pfreeze that waits for
			// a stop is killed (its tracer thread's exit releases the
			// parent) once every bound it has would have passed.
			ctx, cancel := context.WithTimeout(context.Background(), 3*ptrace.StopTimeout)
			defer cancel()
			cmd := exec.CommandContext(ctx, filepath.Join(binDir, "pfreeze"),
				append([]string{"-pid", strconv.Itoa(parent), "-dest", snap}, args...)...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("pfreeze %v did not exit within %v: it waits for a stop the vfork parent cannot reach", args, 3*ptrace.StopTimeout)
			}
			if err == nil {
				t.Fatalf("pfreeze %v of a parent waiting in vfork succeeded", args)
			}
			msg := stderr.String()
			want := fmt.Sprintf("waiting in vfork for its child %d", child)
			if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pfreeze: ") || !strings.Contains(msg, want) {
				t.Errorf("stderr %q, want one line starting with \"pfreeze: \" saying %q", msg, want)
			}
			for _, pid := range []int{parent, child} {
				untouched(t, pid)
			}
			// The child carries on; the parent still waits for it.
			p.Drain()
			p.Expect(t, `^child `+strconv.Itoa(child)+` tick \d+$`, waitFor)
			waitState(t, parent, 'D')
		})
	}
}

// waitState waits until pid's state (from /proc/PID/stat) is want.
func waitState(t *testing.T, pid int, want byte) {
	t.Helper()
	for deadline := time.Now().Add(waitFor); ; {
		st := procState(pid)
		if st == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d in state %c, want %c", pid, st, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

// untouched checks that pid is as a freeze that gave up must leave it:
// not traced, not stopped, no signal pending.
func untouched(t *testing.T, pid int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("pid %d: %v", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		v = strings.TrimSpace(v)
		switch k {
		case "State":
			if strings.HasPrefix(v, "t") || strings.HasPrefix(v, "T") {
				t.Errorf("pid %d left stopped (%s)", pid, v)
			}
		case "TracerPid":
			if v != "0" {
				t.Errorf("pid %d left traced by %s", pid, v)
			}
		case "SigPnd", "ShdPnd":
			if strings.Trim(v, "0") != "" {
				t.Errorf("pid %d has signals pending (%s %s)", pid, k, v)
			}
		}
	}
}

// TestUnboundedTimeoutsRefused: a timeout of 0 would make a wait of
// pfreeze (with the process frozen) or pthaw unbounded; each is refused
// with one line naming the flag, before anything is touched.
func TestUnboundedTimeoutsRefused(t *testing.T) {
	needRoot(t)
	for _, c := range []struct {
		cmd  string
		args []string
	}{
		{"pfreeze", []string{"-dial-timeout", "0"}},
		{"pfreeze", []string{"-write-timeout", "0"}},
		{"pfreeze", []string{"-ready-timeout", "-1s"}},
		{"pthaw", []string{"-read-timeout", "0"}},
		{"pthaw", []string{"-commit-timeout", "0"}},
	} {
		t.Run(c.cmd+" "+strings.Join(c.args, " "), func(t *testing.T) {
			args := c.args
			if c.cmd == "pfreeze" {
				// A PID no process can have (pid_max is at most 2^22):
				// nothing to freeze, whatever is checked first.
				args = append([]string{"-pid", "4194304", "-dest", filepath.Join(t.TempDir(), "snap")}, args...)
			} else {
				args = append([]string{"-src", filepath.Join(t.TempDir(), "none")}, args...)
			}
			cmd := exec.Command(filepath.Join(binDir, c.cmd), args...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Run(); err == nil {
				t.Fatalf("%s %v succeeded", c.cmd, args)
			}
			msg := stderr.String()
			if want := c.cmd + ": " + c.args[0] + " "; strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, want) || !strings.Contains(msg, "must be positive") {
				t.Errorf("stderr %q, want one line starting with %q saying it must be positive", msg, want)
			}
		})
	}
}
