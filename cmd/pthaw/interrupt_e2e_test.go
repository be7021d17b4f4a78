package main

import (
	"bytes"
	"fmt"
	"io"
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
)

// Issue 9: pfreeze or pthaw interrupted or killed at any moment. A frozen
// process must carry on as if nothing happened (pfreeze puts everything
// back after each injected call, before the long memory copy), no partial
// snapshot may be left, and a half-built process must die with pthaw.

// interruptSignals are the signals each case is tried with: the catchable
// ones pfreeze and pthaw handle, and SIGKILL, which they cannot.
var interruptSignals = []syscall.Signal{syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT, syscall.SIGKILL}

// startPfreeze starts pfreeze with args; the returned channel is closed
// once it is gone (then cmd.ProcessState says how it ended).
func startPfreeze(t *testing.T, args ...string) (*exec.Cmd, *bytes.Buffer, <-chan struct{}) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), args...)
	stderr := new(bytes.Buffer)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	return cmd, stderr, done
}

// writingInto waits until process pid holds open a file under dir that
// has grown to at least n bytes (whether it has a name there or not: an
// O_TMPFILE shows as "dir/#ino (deleted)"), which for pfreeze means the
// memory copy is under way. pfreeze ending first fails the test.
func writingInto(t *testing.T, pid int, dir string, n int64, done <-chan struct{}, stderr *bytes.Buffer) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
		for _, fd := range fds {
			link, err := os.Readlink(fd)
			if err != nil || !strings.HasPrefix(link, dir+"/") {
				continue
			}
			if fi, err := os.Stat(fd); err == nil && fi.Size() >= n {
				return
			}
		}
		select {
		case <-done:
			t.Fatalf("pfreeze ended (%v) before writing %d bytes: %s", "exited", n, stderr)
		case <-time.After(time.Millisecond):
		}
	}
	t.Fatalf("pid %d did not write %d bytes into %s", pid, n, dir)
}

// interruptedFreeze runs pfreeze args (writing into dir), sends it sig
// once the memory copy is under way, and checks how it ended: a catchable
// signal makes it exit 1 with the one line want; SIGKILL kills it. Nothing
// may be left in dir.
func interruptedFreeze(t *testing.T, sig syscall.Signal, dir, want string, args ...string) {
	t.Helper()
	cmd, stderr, done := startPfreeze(t, args...)
	writingInto(t, cmd.Process.Pid, dir, 4<<20, done, stderr)
	if err := cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatalf("pfreeze still running a minute after %v", sig)
	}
	err := cmd.ProcessState
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if sig == syscall.SIGKILL {
		if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("pfreeze ended with %v after SIGKILL: %s", err, stderr)
		}
	} else {
		if ws.Signaled() || ws.ExitStatus() != 1 {
			t.Errorf("pfreeze ended with %v after %v, want exit status 1: %s", err, unix.SignalName(sig), stderr)
		}
		if got := stderr.String(); got != want {
			t.Errorf("pfreeze said %q, want %q", got, want)
		}
	}
	left, _ := os.ReadDir(dir)
	for _, e := range left {
		t.Errorf("pfreeze left %s behind after %v", filepath.Join(dir, e.Name()), unix.SignalName(sig))
	}
}

// TestFreezeInterrupted sends SIGTERM, SIGHUP, SIGINT and SIGKILL to
// pfreeze during the memory copy of a 512 MiB process, as a checkpoint and
// with -halt: every time the process carries on (it answers SIGUSR1 with
// its memory's hash, unchanged, and keeps ticking), no snapshot or partial
// file is left, and a catchable signal gives one line and exit status 1.
func TestFreezeInterrupted(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "512", "9")
	hash := p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, time.Minute)[1]
	pid := strconv.Itoa(p.Pid())
	for _, halt := range []bool{false, true} {
		for _, sig := range interruptSignals {
			name := unix.SignalName(sig)
			args := []string{"-pid", pid}
			if halt {
				name += "/halt"
				args = append(args, "-halt")
			}
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				want := fmt.Sprintf("pfreeze: interrupted by %s: process %s resumed\n", unix.SignalName(sig), pid)
				interruptedFreeze(t, sig, dir, want, append(args, "-dest", filepath.Join(dir, "snap"))...)
				// It runs: the check line comes after the signal we send
				// now, and its memory is what it was.
				if err := p.Signal(syscall.SIGUSR1); err != nil {
					t.Fatalf("pid %s: %v", pid, err)
				}
				p.Lines.Expect(t, `^check hash=`+hash+` ok$`, time.Minute)
				n := atoi(t, p.Lines.Expect(t, `^tick (\d+)$`, waitFor)[1])
				p.Lines.Expect(t, fmt.Sprintf(`^tick %d$`, n+1), waitFor)
			})
		}
	}
}

// TestFreezeTreeInterrupted is TestFreezeInterrupted for pfreeze -tree: a
// tree of four processes sharing 512 MiB carries on whole.
func TestFreezeTreeInterrupted(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "treeheap"), "4", "512", "5")
	m := p.Lines.Expect(t, `^ready procs=4 mib=512 pids=([\d,]+)$`, time.Minute)
	pids := strings.Split(m[1], ",")
	for _, halt := range []bool{false, true} {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			name := unix.SignalName(sig)
			args := []string{"-tree", "-pid", pids[0]}
			if halt {
				name += "/halt"
				args = append(args, "-halt")
			}
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				want := fmt.Sprintf("pfreeze: interrupted by %s: process tree %s resumed\n", unix.SignalName(sig), pids[0])
				interruptedFreeze(t, sig, dir, want, append(args, "-dest", filepath.Join(dir, "snap"))...)
				n := atoi(t, p.Lines.Expect(t, `^tick (\d+)$`, waitFor)[1])
				p.Lines.Expect(t, fmt.Sprintf(`^tick %d$`, n+1), waitFor)
				for _, s := range pids {
					if st := procState(atoi(t, s)); st != 'S' && st != 'R' {
						t.Errorf("member %s is in state %q, want running or sleeping", s, st)
					}
				}
			})
		}
	}
}

// TestFreezeThreadsInterrupted is TestFreezeInterrupted for a process of
// eight threads (each one's injected calls are put back): it keeps
// ticking, and no thread is left stopped or traced.
func TestFreezeThreadsInterrupted(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "threadheap"), "8", "512", "7")
	p.Lines.Expect(t, `^ready threads=8 mib=512$`, time.Minute)
	pid := strconv.Itoa(p.Pid())
	for _, c := range []struct {
		sig  syscall.Signal
		halt bool
	}{{syscall.SIGTERM, false}, {syscall.SIGKILL, true}} {
		name := unix.SignalName(c.sig)
		args := []string{"-pid", pid}
		if c.halt {
			name += "/halt"
			args = append(args, "-halt")
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			want := fmt.Sprintf("pfreeze: interrupted by %s: process %s resumed\n", unix.SignalName(c.sig), pid)
			interruptedFreeze(t, c.sig, dir, want, append(args, "-dest", filepath.Join(dir, "snap"))...)
			n := atoi(t, p.Lines.Expect(t, `^tick (\d+)$`, waitFor)[1])
			p.Lines.Expect(t, fmt.Sprintf(`^tick %d$`, n+1), waitFor)
			tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%s/task/*/status", pid))
			if len(tasks) != 9 {
				t.Errorf("%d threads, want 9", len(tasks))
			}
			for _, st := range tasks {
				b, _ := os.ReadFile(st)
				if !strings.Contains(string(b), "\nTracerPid:\t0\n") || strings.Contains(string(b), "\nState:\tt") {
					t.Errorf("%s: still traced or stopped:\n%s", st, b)
				}
			}
		})
	}
}

// proc names one process for good: its PID and start time.
type proc struct {
	pid   int
	start string
}

func (p proc) String() string { return strconv.Itoa(p.pid) }

// alive reports whether the process still runs (neither gone, a zombie,
// nor replaced by another under the same PID).
func (p proc) alive() bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 20 && f[19] == p.start && f[0] != "Z" && f[0] != "X"
}

// descendants lists pid's live descendants and their total resident memory.
func descendants(pid int) ([]proc, int64) {
	parent := map[int]int{}
	starts := map[int]string{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", n))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 20 && f[0] != "Z" {
			parent[n], _ = strconv.Atoi(f[1])
			starts[n] = f[19]
		}
	}
	var out []proc
	var rss int64
	for n := range parent {
		for a, hops := parent[n], 0; a > 1 && hops < 64; a, hops = parent[a], hops+1 {
			if a == pid {
				out = append(out, proc{n, starts[n]})
				status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", n))
				for _, l := range strings.Split(string(status), "\n") {
					if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
						kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
						rss += kb << 10
					}
				}
				break
			}
		}
	}
	return out, rss
}

// interruptedThaw restores snap with pthaw args, sends pthaw sig once its
// processes hold 128 MiB (the memory is streaming in) and checks that
// none of them is left, and that a catchable signal gives one line and
// exit status 1. pthaw reads snap from a pipe that gets only its first
// 256 MiB before the signal, so the restore cannot end first.
func interruptedThaw(t *testing.T, sig syscall.Signal, snap string, args ...string) {
	t.Helper()
	f, err := os.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	fed := make(chan struct{})
	go func() {
		defer close(fed)
		defer pw.Close()
		if _, err := io.CopyN(pw, f, 256<<20); err != nil {
			return
		}
		<-release
		io.Copy(pw, f) // fails at once once pthaw is gone
	}()
	defer func() { <-fed }()
	defer close(release)
	th := startThawCmd(t, &thawed{cmd: exec.Command(filepath.Join(binDir, "pthaw"), args...)}, pr)
	var procs []proc
	deadline := time.Now().Add(time.Minute)
	for {
		var rss int64
		procs, rss = descendants(th.cmd.Process.Pid)
		if rss >= 128<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pthaw's processes %v did not reach 128 MiB: %s", procs, th.stderr.String())
		}
		select {
		case <-th.done:
			t.Fatalf("pthaw ended before its processes held 128 MiB: %s", th.stderr.String())
		case <-time.After(time.Millisecond):
		}
	}
	if err := th.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	code := th.exit(t)
	if sig != syscall.SIGKILL {
		if code != 1 {
			t.Errorf("pthaw exited %d after %v, want 1: %s", code, unix.SignalName(sig), th.stderr.String())
		}
		want := fmt.Sprintf("pthaw: interrupted by %s before the process was built: nothing restored\n", unix.SignalName(sig))
		if got := th.stderr.String(); got != want {
			t.Errorf("pthaw said %q, want %q", got, want)
		}
	}
	for _, p := range procs {
		if err := fixture.WaitExit(p.pid, waitFor); err != nil && p.alive() {
			t.Errorf("pthaw's process %d (state %c) outlived it after %v", p.pid, procState(p.pid), unix.SignalName(sig))
			syscall.Kill(p.pid, syscall.SIGKILL)
		}
	}
}

// TestThawInterrupted kills or interrupts pthaw while it restores a
// 512 MiB process, in this PID namespace and in a new one: no process of
// the restore is left. (-virtpid: pthaw stays the tracer of every thread.)
func TestThawInterrupted(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "512", "11")
	p.Lines.Expect(t, `^ready hash=[0-9a-f]+$`, time.Minute)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-dest", snap)
	for _, mode := range []string{"", "-pidns", "-virtpid"} {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			t.Run(unix.SignalName(sig)+mode, func(t *testing.T) {
				var args []string
				if mode != "" {
					args = append(args, mode)
				}
				interruptedThaw(t, sig, snap, args...)
			})
		}
	}
}

// TestThawTreeInterrupted is TestThawInterrupted for a tree of four
// processes, restored in this PID namespace and in a new one.
func TestThawTreeInterrupted(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "treeheap"), "4", "512", "13")
	p.Lines.Expect(t, `^ready procs=4 mib=512 pids=[\d,]+$`, time.Minute)
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-tree", "-pid", strconv.Itoa(p.Pid()), "-dest", snap)
	for _, mode := range []string{"", "-pidns", "-virtpid"} {
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			t.Run(unix.SignalName(sig)+mode, func(t *testing.T) {
				var args []string
				if mode != "" {
					args = append(args, mode)
				}
				interruptedThaw(t, sig, snap, args...)
			})
		}
	}
}

// TestFreezeInterruptedNetwork: SIGTERM to a pfreeze -halt blocked on a
// receiver that stopped reading (a stopped pthaw) cuts its write short
// rather than waiting out its ten-minute write timeout: the process is
// resumed, not killed, and the receiver, once it runs again, restores
// nothing and leaves no process.
func TestFreezeInterruptedNetwork(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "512", "17")
	hash := p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, time.Minute)[1]
	th := thaw(t, "-src", "tcp:127.0.0.1:0")
	addr := th.listening(t)
	cmd, stderr, done := startPfreeze(t, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", "tcp:"+addr, "-write-timeout", "10m")
	// Once pthaw's stub holds memory the stream flows; then stop pthaw
	// and wait until pfreeze's socket is full: it is blocked in a write.
	var procs []proc
	deadline := time.Now().Add(time.Minute)
	for {
		var rss int64
		if procs, rss = descendants(th.cmd.Process.Pid); rss >= 64<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pthaw's processes %v did not reach 64 MiB: %s", procs, th.stderr.String())
		}
		select {
		case <-done:
			t.Fatalf("pfreeze ended: %s", stderr)
		case <-time.After(time.Millisecond):
		}
	}
	if err := th.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer th.cmd.Process.Signal(syscall.SIGCONT)
	// Full: the queue no longer changes (pthaw drains nothing, pfreeze
	// adds nothing) for 200 looks in a row.
	for last, same := int64(-1), 0; same < 200; {
		if q := sendQueue(t, cmd.Process.Pid); q > 0 && q == last {
			same++
		} else {
			last, same = q, 0
		}
		select {
		case <-done:
			t.Fatalf("pfreeze ended: %s", stderr)
		case <-time.After(time.Millisecond):
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatalf("pfreeze still blocked a minute after SIGTERM: %s", stderr)
	}
	want := fmt.Sprintf("pfreeze: interrupted by SIGTERM: process %d resumed\n", p.Pid())
	if code := cmd.ProcessState.ExitCode(); code != 1 || stderr.String() != want {
		t.Errorf("pfreeze exited %d saying %q, want 1 and %q", code, stderr, want)
	}
	th.cmd.Process.Signal(syscall.SIGCONT)
	if code := th.exit(t); code == 0 {
		t.Errorf("pthaw exited 0 from a broken stream: %s", th.stderr.String())
	}
	for _, q := range procs {
		if err := fixture.WaitExit(q.pid, waitFor); err != nil && q.alive() {
			t.Errorf("pthaw's process %d outlived it", q.pid)
		}
	}
	if err := p.Signal(syscall.SIGUSR1); err != nil {
		t.Fatalf("pid %d: %v", p.Pid(), err)
	}
	p.Lines.Expect(t, `^check hash=`+hash+` ok$`, time.Minute)
}

// sendQueue returns the bytes waiting in the send queues of pid's TCP
// sockets (tx_queue of /proc/net/tcp): a pfreeze whose receiver stopped
// reading has its own full.
func sendQueue(t *testing.T, pid int) int64 {
	inodes := map[string]bool{}
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	var n int64
	for _, table := range []string{"tcp", "tcp6"} {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || !inodes[f[9]] {
				continue
			}
			tx, _, _ := strings.Cut(f[4], ":")
			q, err := strconv.ParseInt(tx, 16, 64)
			if err != nil {
				t.Fatalf("/proc/net/%s: %q: %v", table, line, err)
			}
			n += q
		}
	}
	return n
}
