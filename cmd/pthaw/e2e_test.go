package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// These tests run the real pfreeze and pthaw binaries on the real programs
// of internal/fixture. They need root (ptrace, clone3 with set_tid).

var binDir string

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	code := func() int {
		if os.Geteuid() != 0 {
			return m.Run() // every test skips with its reason
		}
		dir, err := os.MkdirTemp("", "pthaw-test-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		out, err := exec.Command("go", "build", "-o", dir+"/", "github.com/pcluster/pcluster/cmd/pfreeze", "github.com/pcluster/pcluster/cmd/pthaw").CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
			return 1
		}
		binDir = dir
		return m.Run()
	}()
	fixture.Cleanup()
	os.Exit(code)
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace and clone3(set_tid) (CI runs as root)")
	}
}

const waitFor = 10 * time.Second

// freeze runs pfreeze with args and returns its stderr, failing the test
// if it does not exit 0.
func freeze(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("pfreeze %v: %v: %s", args, err, stderr.String())
	}
	return stderr.String()
}

// thawed is a running pthaw.
type thawed struct {
	cmd    *exec.Cmd
	out    *fixture.Lines
	stdin  *os.File
	stderr syncBuf
	done   chan struct{}
}

// syncBuf is a bytes.Buffer safe to read while a command writes it.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// listening waits for pthaw to say where it listens.
func (th *thawed) listening(t testing.TB) string {
	t.Helper()
	rx := regexp.MustCompile(`pthaw: listening on (\S+)`)
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		if m := rx.FindStringSubmatch(th.stderr.String()); m != nil {
			return m[1]
		}
		select {
		case <-th.done:
			t.Fatalf("pthaw exited: %s", th.stderr.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Fatalf("pthaw does not listen: %s", th.stderr.String())
	return ""
}

// said waits for pthaw's stderr to match rx while it keeps running.
func (th *thawed) said(t testing.TB, rx string) {
	t.Helper()
	re := regexp.MustCompile(rx)
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		if re.MatchString(th.stderr.String()) {
			return
		}
		select {
		case <-th.done:
			t.Fatalf("pthaw exited: %s", th.stderr.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Fatalf("pthaw did not say %q: %s", rx, th.stderr.String())
}

// thaw starts pthaw with args, its stdin a pipe (th.stdin); t.Cleanup
// stops it (SIGTERM reaches the restored process) and waits for it.
func thaw(t *testing.T, args ...string) *thawed {
	t.Helper()
	return thawCmd(t, exec.Command(filepath.Join(binDir, "pthaw"), args...))
}

// thawCmd starts cmd, a pthaw (perhaps run through nsenter), as thaw does.
func thawCmd(t testing.TB, cmd *exec.Cmd) *thawed {
	t.Helper()
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	th := &thawed{cmd: cmd, stdin: inW}
	t.Cleanup(func() { inW.Close() })
	return startThawCmd(t, th, inR)
}

// child returns pthaw's child, or 0: the restored process once it runs,
// a stub while pthaw builds. Children are listed per thread, and pthaw's
// tracer thread is the parent.
func (th *thawed) child() int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", th.cmd.Process.Pid))
	for _, path := range tasks {
		b, _ := os.ReadFile(path)
		if f := strings.Fields(string(b)); len(f) > 0 {
			pid, _ := strconv.Atoi(f[0])
			return pid
		}
	}
	return 0
}

// started reports whether pthaw's child pid is the restored process (or
// the -pidns init) let run: no longer traced, and not a pthaw fork that
// has yet to exec a stub.
func (th *thawed) started(pid int) bool {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil || !regexp.MustCompile(`(?m)^TracerPid:\s+0$`).Match(status) {
		return false
	}
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	pthaw, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", th.cmd.Process.Pid))
	return exe != pthaw
}

// restoredPid waits for pthaw to have started its child and returns it.
func (th *thawed) restoredPid(t testing.TB) int {
	t.Helper()
	return th.waitChild(t, "a started child", th.started)
}

// waitChild waits until pthaw has a child for which ready holds, and
// returns it; pthaw exiting first, or waitFor passing, fails the test.
func (th *thawed) waitChild(t testing.TB, what string, ready func(pid int) bool) int {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		if pid := th.child(); pid > 0 && ready(pid) {
			return pid
		}
		select {
		case <-th.done:
			t.Fatalf("pthaw exited: %s", th.stderr.String())
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Fatalf("pthaw has no %s after %v: %s", what, waitFor, th.stderr.String())
	return 0
}

// exit waits for pthaw to exit and returns its exit code.
func (th *thawed) exit(t *testing.T) int {
	t.Helper()
	select {
	case <-th.done:
	case <-time.After(waitFor):
		t.Fatalf("pthaw still running after %v", waitFor)
	}
	return th.cmd.ProcessState.ExitCode()
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// haltToFile freezes p with -halt into a file, waits for it to be gone and
// returns the file.
func haltToFile(t *testing.T, p *fixture.Proc) string {
	t.Helper()
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap)
	select {
	case <-p.Exited():
	case <-time.After(waitFor):
		t.Fatalf("pid %d still running after pfreeze -halt", p.Pid())
	}
	return snap
}

// migrate moves p through a snapshot file: haltToFile, then pthaw.
func migrate(t *testing.T, p *fixture.Proc, thawArgs ...string) *thawed {
	t.Helper()
	return thaw(t, append([]string{"-src", haltToFile(t, p)}, thawArgs...)...)
}

// TestInheritedCopies moves a process whose fds 3 and 4 are copies of its
// stdout and stderr, as a shell's "exec 3>&1 4>&2" leaves them: they lead
// outside the process, so they come back as copies of pthaw's.
func TestInheritedCopies(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, "/bin/sh", "-c", `exec 3>&1 4>&2; exec "$0" 5`, fixture.Build(t, "countforever"))
	p.Lines.Expect(t, `^(\d+)$`, waitFor)
	th := migrate(t, p)
	th.out.Expect(t, `^(\d+)$`, waitFor)
	pid := th.restoredPid(t)
	// The fixture gave the original one pipe as stdout and stderr, so fd 4
	// was a copy of fd 1 as much as of fd 2; pthaw's are two pipes.
	out, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/1", th.cmd.Process.Pid))
	errs, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/2", th.cmd.Process.Pid))
	for _, fd := range []int{3, 4} {
		got, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd))
		if got == "" || (got != out && got != errs) {
			t.Errorf("restored fd %d is %q, want pthaw's stdout %q or stderr %q", fd, got, out, errs)
		}
	}
}

func testCountforever(t *testing.T, prog string) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, prog), "5")
	last := atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
	for i := 0; i < 3; i++ {
		last = atoi(t, p.Lines.Expect(t, `^(\d+)$`, waitFor)[1])
	}
	pid := p.Pid()
	th := migrate(t, p)
	// Lines printed between our last read and the freeze went to the old
	// pipe; the restored process carries on from its own counter.
	first := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1])
	if first <= last {
		t.Fatalf("restored process printed %d, want more than %d", first, last)
	}
	for i := 1; i <= 20; i++ {
		n := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1])
		if n != first+i {
			t.Fatalf("got %d, want %d", n, first+i)
		}
	}
	if got := th.restoredPid(t); got != pid {
		t.Errorf("restored pid %d, want %d", got, pid)
	}
}

func TestCountforeverDynamic(t *testing.T) { testCountforever(t, "countforever") }
func TestCountforeverStatic(t *testing.T)  { testCountforever(t, "countforever-static") }

// TestClonePipe is the seed's A.1.4: pfreeze | pthaw clones a running
// process; the clone gets a new PID (the original still has its own) and
// pthaw says so.
func TestClonePipe(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "getpid"))
	m := p.Lines.Expect(t, `^pid=(\d+) ppid=(\d+)$`, waitFor)
	pid := atoi(t, m[1])
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	fr := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(pid))
	fr.Stdout = pw
	var frErr bytes.Buffer
	fr.Stderr = &frErr
	if err := fr.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	th := thawWithStdin(t, &thawed{}, pr)
	if err := fr.Wait(); err != nil {
		t.Fatalf("pfreeze: %v: %s", err, frErr.String())
	}
	clone := th.restoredPid(t)
	if clone == pid {
		t.Fatalf("clone has the original's pid %d", pid)
	}
	th.out.Expect(t, fmt.Sprintf(`^PID changed from %d to %d$`, pid, clone), waitFor)
	th.out.Expect(t, `^PPID changed from \d+ to \d+$`, waitFor)
	// The original carries on untouched.
	p.Lines.Expect(t, `^no change \d+$`, waitFor)
	if !strings.Contains(th.stderr.String(), fmt.Sprintf("pid %d is taken on this host; restored as pid %d", pid, clone)) {
		t.Errorf("pthaw stderr %q does not say the pid was taken", th.stderr.String())
	}
}

// thawWithStdin starts pthaw reading the snapshot from stdin.
func thawWithStdin(t *testing.T, th *thawed, stdin *os.File) *thawed {
	t.Helper()
	th.cmd = exec.Command(filepath.Join(binDir, "pthaw"))
	return startThawCmd(t, th, stdin)
}

// startThawCmd starts th.cmd (a pthaw) with stdin as its standard input,
// following its stdout; t.Cleanup kills the restored process and pthaw.
func startThawCmd(t testing.TB, th *thawed, stdin *os.File) *thawed {
	t.Helper()
	th.done = make(chan struct{})
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	th.cmd.Stdout = outW
	th.cmd.Stdin = stdin
	th.cmd.Stderr = &th.stderr
	th.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := th.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	outW.Close()
	stdin.Close()
	th.out = fixture.FollowReader(t, outR)
	go func() {
		th.cmd.Wait()
		close(th.done)
	}()
	t.Cleanup(func() {
		if pid := th.child(); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		th.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-th.done:
		case <-time.After(waitFor):
			th.cmd.Process.Kill()
			<-th.done
		}
		outR.Close()
	})
	return th
}

// TestGetpidSamePID moves the getpid demo: same PID, so it prints no PID
// change; its parent is now pthaw, which it does report (as in the seed).
func TestGetpidSamePID(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "getpid"))
	p.Lines.Expect(t, `^pid=\d+ ppid=\d+$`, waitFor)
	th := migrate(t, p)
	th.out.Expect(t, `^PPID changed from \d+ to \d+$`, waitFor)
	line := th.out.Expect(t, `^(no change|PID changed).*`, waitFor)[0]
	if strings.HasPrefix(line, "PID changed") {
		t.Fatalf("got %q, want no PID change", line)
	}
}

func TestFiles(t *testing.T) {
	needRoot(t)
	path := filepath.Join(t.TempDir(), "files_output.txt")
	p := fixture.Start(t, fixture.Build(t, "files"), path)
	p.Lines.Expect(t, `^fds r=3 w=4$`, waitFor)
	p.Lines.Expect(t, `^read: Hello world #3!$`, waitFor)
	before := map[int]string{3: fdFlags(t, p.Pid(), 3), 4: fdFlags(t, p.Pid(), 4)}
	th := migrate(t, p)
	first := atoi(t, th.out.Expect(t, `^read: Hello world #(\d+)!$`, waitFor)[1])
	for i := 1; i <= 5; i++ {
		th.out.Expect(t, fmt.Sprintf(`^read: Hello world #%d!$`, first+i), waitFor)
	}
	pid := th.restoredPid(t)
	for fd, want := range before {
		if got := fdFlags(t, pid, fd); got != want {
			t.Errorf("fd %d: flags %s after thaw, want %s", fd, got, want)
		}
	}
	if f := before[4]; f[len(f)-4] != '2' {
		t.Errorf("fd 4 flags %s lack O_APPEND", f)
	}
	// The file holds every line exactly once, in order.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	for i, l := range lines {
		if want := fmt.Sprintf("Hello world #%d!", i); l != want {
			t.Fatalf("line %d of the file: got %q, want %q", i, l, want)
		}
	}
}

// fdFlags returns the flags line of /proc/PID/fdinfo/FD.
func fdFlags(t *testing.T, pid, fd int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:\t"); ok {
			return v
		}
	}
	t.Fatalf("no flags in fdinfo %q", b)
	return ""
}

func TestBigheap(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "256", "7")
	hash := p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, 60*time.Second)[1]
	th := migrate(t, p)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	pid := th.restoredPid(t)
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	th.out.Expect(t, fmt.Sprintf(`^check hash=%s ok$`, hash), 60*time.Second)

	// pthaw filled the heap through a userfaultfd: nothing of it is
	// left registered ("um"/"uw" in VmFlags).
	smaps, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(smaps), "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == "VmFlags:" && (slices.Contains(f, "um") || slices.Contains(f, "uw")) {
			t.Errorf("restored area still registered with a userfaultfd: %q", l)
		}
	}
}

func TestBlockedRead(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "blockread"))
	p.Lines.Expect(t, `^ready$`, waitFor)
	p.WriteLine("one")
	p.Lines.Expect(t, `^got 1: one$`, waitFor)
	time.Sleep(50 * time.Millisecond) // let it block in read() again
	th := migrate(t, p)
	th.restoredPid(t)
	fmt.Fprintln(th.stdin, "two")
	th.out.Expect(t, `^got 2: two$`, waitFor)
	th.stdin.Close()
	th.out.Expect(t, `^eof$`, waitFor)
	if code := th.exit(t); code != 0 {
		t.Errorf("pthaw exit code %d, want 0: %s", code, th.stderr.String())
	}
}

func TestSleeper(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "sleeper"))
	p.Lines.Expect(t, `^slept 2 `, waitFor)
	th := migrate(t, p)
	for i := 0; i < 4; i++ {
		line := th.out.Expect(t, `^slept \d+ |EINTR`, waitFor)[0]
		if strings.Contains(line, "EINTR") {
			t.Fatalf("got %q: the interrupted sleep was not resumed", line)
		}
	}
}

func TestAVX(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "avx"), "3", "24")
	if p.Lines.Expect(t, `^(ok \d+|noavx)$`, waitFor)[0] == "noavx" {
		t.Skip("CPU without AVX2")
	}
	th := migrate(t, p)
	for i := 0; i < 3; i++ {
		if line := th.out.Expect(t, `^(ok \d+|FAIL.*)$`, waitFor)[0]; strings.HasPrefix(line, "FAIL") {
			t.Fatalf("got %q after thaw", line)
		}
	}
}

func TestPython(t *testing.T) {
	needRoot(t)
	py := fixture.Python(t)
	p := fixture.Start(t, py, fixture.Build(t, "pyloop"))
	sum := p.Lines.Expect(t, `^ready sum=(\d+)$`, 30*time.Second)[1]
	p.Lines.Expect(t, `^count 5$`, waitFor)
	th := migrate(t, p)
	th.out.Expect(t, `^count \d+$`, waitFor)
	th.out.Expect(t, fmt.Sprintf(`^py n=\d+ sum=%s ok$`, sum), waitFor)
}

// TestUid1000 restores a process of an unprivileged user as that user.
func TestUid1000(t *testing.T) {
	needRoot(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	bin := fixture.Build(t, "countforever")
	os.Chmod(filepath.Dir(bin), 0o755)
	p := fixture.Start(t, setpriv, "--reuid", "1000", "--regid", "1000", "--clear-groups", bin, "10")
	p.Lines.Expect(t, `^3$`, waitFor)
	th := migrate(t, p)
	th.out.Expect(t, `^\d+$`, waitFor)
	pid := th.restoredPid(t)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Uid:\t1000\t1000\t1000\t1000", "Gid:\t1000\t1000\t1000\t1000", "CapEff:\t0000000000000000", "CapPrm:\t0000000000000000"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("restored status lacks %q:\n%s", want, b)
		}
	}
}

// TestRestoreTenTimes thaws one snapshot ten times in a row, each time
// into the same PID.
func TestRestoreTenTimes(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "countforever"), "5")
	p.Lines.Expect(t, `^3$`, waitFor)
	pid := p.Pid()
	snap := haltToFile(t, p)
	var first int
	for i := 0; i < 10; i++ {
		th := thaw(t, "-src", snap)
		n := atoi(t, th.out.Expect(t, `^(\d+)$`, waitFor)[1])
		if i == 0 {
			first = n
		} else if n != first {
			t.Fatalf("restore %d printed %d first, want %d", i, n, first)
		}
		if got := th.restoredPid(t); got != pid {
			t.Fatalf("restore %d: pid %d, want %d", i, got, pid)
		}
		syscall.Kill(pid, syscall.SIGKILL)
		if code := th.exit(t); code != 128+int(syscall.SIGKILL) {
			t.Fatalf("restore %d: pthaw exit code %d, want %d", i, code, 128+int(syscall.SIGKILL))
		}
	}
}

func TestExitStatus(t *testing.T) { testExitStatus(t) }

// testExitStatus moves exitcode with thawArgs and has it exit 7: pthaw
// exits 7 too.
func testExitStatus(t *testing.T, thawArgs ...string) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "exitcode"))
	p.Lines.Expect(t, `^tick 2$`, waitFor)
	th := migrate(t, p, thawArgs...)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	fmt.Fprintln(th.stdin, "quit")
	th.out.Expect(t, `^exit 7$`, waitFor)
	if code := th.exit(t); code != 7 {
		t.Fatalf("pthaw exit code %d, want 7", code)
	}
}

// TestDetach leaves the restored process running and prints its PID.
func TestDetach(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "countforever"), "5")
	p.Lines.Expect(t, `^3$`, waitFor)
	pid := p.Pid()
	snap := haltToFile(t, p)
	// The detached process keeps pthaw's stdout: a file, not a pipe we
	// would wait on forever.
	outPath := filepath.Join(t.TempDir(), "out")
	outF, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer outF.Close()
	cmd := exec.Command(filepath.Join(binDir, "pthaw"), "-detach", "-src", snap)
	cmd.Stdout = outF
	if err := cmd.Run(); err != nil {
		t.Fatalf("pthaw -detach: %v", err)
	}
	fixture.KillAtCleanup(t, pid)
	// The restored process writes to the same file: pthaw's line is one
	// of the lines there, not necessarily the first.
	out, err := os.ReadFile(outPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains("\n"+string(out), fmt.Sprintf("\n%d\n", pid)) {
		t.Fatalf("pthaw -detach printed %q, want a line %d", out, pid)
	}
	time.Sleep(100 * time.Millisecond)
	if !fixture.Alive(pid) {
		t.Fatalf("detached process %d is not running", pid)
	}
}
