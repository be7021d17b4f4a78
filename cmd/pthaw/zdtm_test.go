package main

import (
	"bytes"
	"errors"
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

	"golang.org/x/sys/unix"
)

// TestZdtm runs a subset of CRIU's own zdtm static suite (docs/zdtm.md)
// raw, as zdtm's host flavour does: start the test (it daemonizes and
// writes a pidfile), freeze it with pfreeze -halt (-tree when it has
// children), thaw it with pthaw -detach, send SIGTERM and read the verdict
// the test writes to its .out file. With CRIU=/path/to/criu the same tests
// go through criu dump / criu restore -d as well, for the comparison.
//
// The suite is not ours and cannot be fetched by CI, so the test runs only
// when ZDTM names the test/zdtm directory of a CRIU source tree (the test
// builds zdtm's lib and the tests it runs); `make zdtm ZDTM=...
// [CRIU=...]` runs it. ZDTM_TESTS narrows the list (space
// separated); ZDTM_REPORT names a file to which the table of results is
// written in the markdown of docs/zdtm.md.
func TestZdtm(t *testing.T) {
	dir := os.Getenv("ZDTM")
	if dir == "" {
		t.Skip("ZDTM is not set: it names a CRIU source tree's built test/zdtm directory (make zdtm ZDTM=...)")
	}
	needRoot(t)
	static := filepath.Join(dir, "static")
	tests := zdtmTests
	if s := os.Getenv("ZDTM_TESTS"); s != "" {
		tests = strings.Fields(s)
	}
	if out, err := runIn(dir, "make", "--no-print-directory", "-s", "-C", "lib"); err != nil {
		t.Fatalf("building zdtm's lib in %s: %v\n%s", dir, err, out)
	}
	if out, err := runIn(static, "make", append([]string{"--no-print-directory", "-s"}, tests...)...); err != nil {
		t.Fatalf("building the zdtm tests in %s: %v\n%s", static, err, out)
	}
	criu := os.Getenv("CRIU")
	// The tests daemonize: as a child subreaper the test process gets
	// them (and whatever a restore leaves) as children, to wait for and
	// to clean up, instead of PID 1.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })

	type row struct{ name, pc, criu string }
	var rows []row
	for _, name := range tests {
		r := row{name: name}
		// Only pcluster's failures fail the test: CRIU is the tool we
		// compare with, and what it fails here (docs/zdtm.md) is in the
		// table and the log, not in make zdtm's exit status.
		t.Run(name+"/pcluster", func(t *testing.T) {
			r.pc = zdtmRun(t, static, name, pclusterEngine{})
			if r.pc != "pass" {
				t.Error(r.pc)
			}
		})
		if criu != "" {
			t.Run(name+"/criu", func(t *testing.T) {
				r.criu = zdtmRun(t, static, name, criuEngine{bin: criu})
				if r.criu != "pass" {
					t.Logf("criu (for comparison, not a failure): %s", r.criu)
				}
			})
		}
		rows = append(rows, r)
	}

	var b bytes.Buffer
	npc, ncriu := 0, 0
	fmt.Fprintf(&b, "| test | pcluster | CRIU |\n|---|---|---|\n")
	for _, r := range rows {
		if r.pc == "pass" {
			npc++
		}
		if r.criu == "pass" {
			ncriu++
		}
		c := r.criu
		if criu == "" {
			c = "not run"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", r.name, cell(r.pc), cell(c))
	}
	fmt.Fprintf(&b, "| **passed** | **%d of %d** | **%d of %d** |\n", npc, len(rows), ncriu, len(rows))
	t.Logf("zdtm results:\n%s", b.String())
	if path := os.Getenv("ZDTM_REPORT"); path != "" {
		if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// cell makes a reason fit one markdown table cell.
func cell(s string) string {
	s = strings.ReplaceAll(s, "|", "\\|")
	if len(s) > 160 {
		s = s[:160] + "…"
	}
	return s
}

// zdtmTests is the subset: single processes, threads and small trees with
// files, pipes, sockets, memory, timers and signals, in zdtm's host
// flavour. Left out: tests zdtm runs only inside namespaces of its own
// (ns/uns flavours: shm, sem, msgque, session*, zombie_leader), tests
// zdtm marks noauto or crfail, and tests needing mounts, cgroups, ttys
// or network devices the machine does not give.
var zdtmTests = []string{
	"busyloop00", "sleeping00", "pid00", "wait00", "zombie00", "zombie01",
	"fpu00", "fpu01", "fpu02", "sse00", "mprotect00", "futex", "futex-rl",
	"pthread00", "pthread01", "rseq00", "vdso00", "vdso01", "caps00",
	"pdeath_sig", "umask00", "env00", "rlimits00", "pstree", "sigaltstack",
	"sigpending", "posix_timers", "timers", "timerfd", "signalfd00",
	"eventfs00", "epoll", "epoll01", "inotify00", "pipe00", "pipe01",
	"pipe02", "fifo", "sockets01", "sockets02", "sockets_spair",
	"socket_queues", "sk-unix-unconn", "socket_listen", "socket_listen6",
	"socket_udp", "socket6_udp", "socket-tcp", "socket-tcp6",
	"socket-tcpbuf", "sock_opts00", "sock_opts01", "maps01", "maps02",
	"maps04", "maps05", "file_fown", "file_cloexec", "selfexe00", "xids00",
	"groups", "cow00", "memfd00", "write_read00", "file_append",
	"unlink_fstat00", "seccomp_filter", "different_creds", "maps_file_prot",
}

// engine checkpoints a running zdtm test into dir, halting it, and
// restores it from there, returning the restored PID.
type engine interface {
	dump(static, name, dir string, pid int) error
	restore(static, name, dir string) (int, error)
}

type pclusterEngine struct{}

func (pclusterEngine) dump(static, name, dir string, pid int) error {
	args := []string{"-pid", strconv.Itoa(pid), "-halt", "-dest", filepath.Join(dir, "snap")}
	if hasChildren(pid) {
		args = append(args, "-tree")
	}
	if out, err := runIn(static, filepath.Join(binDir, "pfreeze"), args...); err != nil {
		return errors.New(lastLine(out, err)) // "pfreeze: ..."
	}
	return nil
}

func (pclusterEngine) restore(static, name, dir string) (int, error) {
	out, err := runIn(static, filepath.Join(binDir, "pthaw"), "-src", filepath.Join(dir, "snap"), "-detach")
	if err != nil {
		return 0, errors.New(lastLine(out, err)) // "pthaw: ..."
	}
	m := regexp.MustCompile(`(?m)^(\d+)$`).FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("pthaw -detach printed no pid: %s", lastLine(out, nil))
	}
	return strconv.Atoi(m[1])
}

type criuEngine struct{ bin string }

func (c criuEngine) dump(static, name, dir string, pid int) error {
	opts := zdtmDescOpts(filepath.Join(static, name+".desc"))
	args := append([]string{"dump", "--no-default-config", "-t", strconv.Itoa(pid), "-D", dir, "-o", "dump.log", "-v4"}, opts...)
	if out, err := runIn(static, c.bin, args...); err != nil {
		return fmt.Errorf("criu dump: %s%s", lastLine(out, err), criuError(filepath.Join(dir, "dump.log")))
	}
	return nil
}

func (c criuEngine) restore(static, name, dir string) (int, error) {
	opts := zdtmDescOpts(filepath.Join(static, name+".desc"))
	pidfile := filepath.Join(dir, "restored.pid")
	args := append([]string{"restore", "--no-default-config", "-D", dir, "-o", "restore.log", "-v4", "-d", "--pidfile", pidfile}, opts...)
	if out, err := runIn(static, c.bin, args...); err != nil {
		return 0, fmt.Errorf("criu restore: %s%s", lastLine(out, err), criuError(filepath.Join(dir, "restore.log")))
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// criuError returns the first error line of a CRIU log, the cause, for
// the table (not the harmless one that without CAP_SYS_RESOURCE it cannot
// raise its own RLIMIT_NOFILE, and it carries on).
func criuError(log string) string {
	b, _ := os.ReadFile(log)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "Error (") && !strings.Contains(l, "RLIMIT_NOFILE for self") {
			return ": " + strings.TrimSpace(l)
		}
	}
	return ""
}

// zdtmDescOpts returns the CRIU options a test's .desc asks for
// ({'opts': '--tcp-established', ...}).
func zdtmDescOpts(desc string) []string {
	b, err := os.ReadFile(desc)
	if err != nil {
		return nil
	}
	m := regexp.MustCompile(`'opts'\s*:\s*'([^']*)'`).FindSubmatch(b)
	if m == nil {
		return nil
	}
	return strings.Fields(string(m[1]))
}

// zdtmRun runs one zdtm test through e and returns "pass" or why not; t
// only owns the cleanup, the caller decides whether a failure fails it.
func zdtmRun(t *testing.T, static, name string, e engine) string {
	files := func() []string {
		m, _ := filepath.Glob(filepath.Join(static, name+".*"))
		var out []string
		for _, f := range m {
			if ext := f[len(filepath.Join(static, name)):]; ext != ".c" && ext != ".desc" && ext != ".o" && ext != ".d" && ext != ".hook" && ext != ".checkskip" && ext != ".opts" {
				out = append(out, f)
			}
		}
		return out
	}
	for _, f := range files() {
		os.RemoveAll(f)
	}
	t.Cleanup(func() {
		killChildren()
		for _, f := range files() {
			os.RemoveAll(f)
		}
	})
	if out, err := runIn(static, "make", "--no-print-directory", "-s", name+".pid"); err != nil {
		return "start: " + lastLine(out, err)
	}
	b, err := os.ReadFile(filepath.Join(static, name+".pid"))
	if err != nil {
		return "start: " + err.Error()
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return "start: pidfile: " + err.Error()
	}
	dir := t.TempDir()
	tree := zdtmTree(pid)
	if err := e.dump(static, name, dir, pid); err != nil {
		return err.Error()
	}
	// The halted tree's processes are our children (we are their
	// subreaper): reaped, their PIDs are free for the restore.
	for _, p := range tree {
		if !waitGone(p, 60*time.Second) {
			return fmt.Sprintf("pid %d still running 60s after the dump", p)
		}
	}
	restored, err := e.restore(static, name, dir)
	if err != nil {
		return err.Error()
	}
	if err := syscall.Kill(restored, syscall.SIGTERM); err != nil {
		return fmt.Sprintf("SIGTERM to restored pid %d: %v", restored, err)
	}
	if !waitGone(restored, 60*time.Second) {
		return fmt.Sprintf("restored pid %d still running 60s after SIGTERM", restored)
	}
	out, err := os.ReadFile(filepath.Join(static, name+".out"))
	if err != nil {
		// The test renames its .out.inprogress at exit only when it
		// is still the PID it started as (zdtm counts that as a
		// failure too).
		if b, err2 := os.ReadFile(filepath.Join(static, name+".out.inprogress")); err2 == nil {
			return "check: no .out (exit handler not run as the original pid): " + lastLine(string(b), nil)
		}
		return "result: " + err.Error()
	}
	for _, w := range strings.Fields(string(out)) {
		if w == "PASS" {
			return "pass"
		}
	}
	return "check: " + lastLine(string(out), nil)
}

// runIn runs a command in dir and returns its combined output.
func runIn(dir, bin string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// lastLine returns out's last non-empty line, or err when there is none.
func lastLine(out string, err error) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if l := strings.TrimSpace(lines[len(lines)-1]); l != "" {
		return l
	}
	if err != nil {
		return err.Error()
	}
	return "(nothing)"
}

// zdtmTree returns pid and every process below it.
func zdtmTree(pid int) []int {
	out := []int{pid}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, s := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(s); err == nil {
				out = append(out, zdtmTree(c)...)
			}
		}
	}
	return out
}

// hasChildren reports whether any thread of pid has children.
func hasChildren(pid int) bool {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		if b, _ := os.ReadFile(f); len(strings.TrimSpace(string(b))) > 0 {
			return true
		}
	}
	return false
}

// waitGone waits for pid, a child of ours (we are a subreaper), to end
// and reaps it; for one that is not our child it waits for it to vanish.
func waitGone(pid int, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(pid, &ws, syscall.WNOHANG|syscall.WALL, nil)
		if got == pid {
			return true
		}
		if errors.Is(err, syscall.ECHILD) && syscall.Kill(pid, 0) != nil {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// killChildren kills and reaps every child of this process: the zdtm
// tests, their children and whatever a restore left, all of which come to
// us as the subreaper. The go tool's and exec's children are waited
// already.
func killChildren() {
	for range 50 {
		var pids []int
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", os.Getpid()))
		for _, f := range tasks {
			b, _ := os.ReadFile(f)
			for _, s := range strings.Fields(string(b)) {
				if p, err := strconv.Atoi(s); err == nil {
					pids = append(pids, p)
				}
			}
		}
		if len(pids) == 0 {
			return
		}
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
			var ws syscall.WaitStatus
			syscall.Wait4(p, &ws, syscall.WALL, nil)
		}
	}
}
