package demo

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	code := m.Run()
	fixture.Cleanup()
	os.Exit(code)
}

// demoLimit is how long the whole demo may take (README: under 3 minutes).
const demoLimit = 3 * time.Minute

// demo is one run of demo.sh with its own TMPDIR and binaries.
type demo struct {
	cmd  *exec.Cmd
	tmp  string
	mu   sync.Mutex
	out  bytes.Buffer
	line chan string // each output line, as it comes
	done chan struct{}
}

// startDemo builds the commands into a temporary directory and starts
// demo.sh with them (PCLUSTER_BIN) and TMPDIR a directory of its own, as
// the leader of a process group, as a terminal's Ctrl-C would reach it.
func startDemo(t *testing.T) *demo {
	t.Helper()
	if why := netlab.Available(); why != "" {
		t.Skip(why)
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("gcc not installed (make deps)")
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "../../cmd/...")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	d := &demo{tmp: t.TempDir(), line: make(chan string, 1000), done: make(chan struct{})}
	d.cmd = exec.Command("./demo.sh")
	d.cmd.Env = append(os.Environ(), "PCLUSTER_BIN="+bin, "TMPDIR="+d.tmp)
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	r, w := io.Pipe()
	d.cmd.Stdout, d.cmd.Stderr = w, w
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			d.mu.Lock()
			d.out.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			select {
			case d.line <- sc.Text():
			default:
			}
		}
		close(d.line)
	}()
	go func() { d.cmd.Wait(); w.Close(); close(d.done) }()
	t.Cleanup(func() {
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		<-d.done
	})
	return d
}

func (d *demo) output() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.out.String()
}

// wait waits for the demo to end within demoLimit and returns its exit
// code.
func (d *demo) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-d.done:
	case <-time.After(demoLimit):
		t.Fatalf("demo still running after %v:\n%s", demoLimit, d.output())
	}
	return d.cmd.ProcessState.ExitCode()
}

// checkNothingLeft checks that the demo left no file in its TMPDIR, no
// network namespace, and no process running a program from its TMPDIR.
func (d *demo) checkNothingLeft(t *testing.T) {
	t.Helper()
	if left, _ := os.ReadDir(d.tmp); len(left) != 0 {
		var names []string
		for _, e := range left {
			names = append(names, e.Name())
		}
		t.Errorf("left in TMPDIR: %v", names)
	}
	ns, _ := filepath.Glob(fmt.Sprintf("/run/netns/pcldemo%d-*", d.cmd.Process.Pid))
	if len(ns) != 0 {
		t.Errorf("network namespaces left: %v", ns)
	}
	exes, _ := filepath.Glob("/proc/[0-9]*/exe")
	for _, exe := range exes {
		if target, err := os.Readlink(exe); err == nil && strings.HasPrefix(target, d.tmp+"/") {
			t.Errorf("process %s left: %s", filepath.Dir(exe), target)
		}
	}
}

// TestDemo runs the demo to its end: it exits 0 within demoLimit, the
// drain moved the counter and its log went on with no gap, and it leaves
// nothing behind.
func TestDemo(t *testing.T) {
	d := startDemo(t)
	code := d.wait(t)
	out := d.output()
	if code != 0 {
		t.Fatalf("demo exit %d:\n%s", code, out)
	}
	for _, want := range []string{"node a drained in", ": no gap, no repeat", "== done"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	d.checkNothingLeft(t)
}

// TestDemoInterrupted interrupts the demo (SIGINT to its process group,
// as Ctrl-C does) while the 3-node cluster runs: it exits non-zero and
// leaves nothing behind.
func TestDemoInterrupted(t *testing.T) {
	d := startDemo(t)
	seen := false
	for l := range d.line {
		if strings.HasPrefix(l, "== pclusterctl run -node a") {
			seen = true
			break
		}
	}
	if !seen {
		t.Fatalf("the demo ended before the 3-node cluster ran a workload:\n%s", d.output())
	}
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGINT)
	if code := d.wait(t); code == 0 {
		t.Fatalf("interrupted demo exit 0:\n%s", d.output())
	}
	d.checkNothingLeft(t)
}
