package capture

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestAttachTreePIDNamespace stops nsinit's PID namespace through its
// init, in process: the tree record holds the numbers the namespace
// sees (init pid 1 with no parent, leading its session; the worker pid 2,
// leading its group, with its two threads; with nsinit outside, a group
// and session led from outside the namespace are 0), every member
// records its own the same way, and the workload runs on once resumed.
// The worker alone is refused, naming the init.
func TestAttachTreePIDNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace and unshare(CLONE_NEWPID) (CI runs as root)")
	}
	for _, tc := range []struct {
		args []string
		want []image.TreeProc
	}{
		{nil, []image.TreeProc{{Pid: 1, PPid: 0, Pgid: 1, Sid: 1, Threads: 1}, {Pid: 2, PPid: 1, Pgid: 2, Sid: 1, Threads: 2}}},
		{[]string{"outside"}, []image.TreeProc{{Pid: 1, Threads: 1}, {Pid: 2, PPid: 1, Threads: 2}}},
	} {
		t.Run(fmt.Sprint("nsinit", tc.args), func(t *testing.T) { attachTreePIDNamespace(t, tc.args, tc.want) })
	}
}

func attachTreePIDNamespace(t *testing.T, args []string, wantProcs []image.TreeProc) {
	tr := ptrace.NewTracer() // before the fixture: see TestStopTimeoutLetsGo
	t.Cleanup(tr.Close)
	p := fixture.Start(t, fixture.Build(t, "nsinit"), args...)
	p.Expect(t, `^count 1 `, waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("nsinit %d has children %v (%v), want its namespace's init", p.Pid(), kids, err)
	}
	init := kids[0]
	t.Cleanup(func() {
		syscall.Kill(init, syscall.SIGKILL)
		p.Wait(waitFor)
	})
	workers, err := fixture.Children(init)
	if err != nil || len(workers) != 1 {
		t.Fatalf("init %d has children %v (%v), want the worker", init, workers, err)
	}
	worker := workers[0]

	_, err = Attach(tr, worker)
	want := fmt.Sprintf("freeze %d: process is in another pid namespace, as its pid 2 (freeze the namespace's init, pid %d, with -tree)", worker, init)
	if err == nil || err.Error() != want || !errors.Is(err, ErrUnsupported) {
		t.Errorf("Attach(worker %d) = %v, want %q (ErrUnsupported)", worker, err, want)
	}

	ft, err := AttachTree(tr, init)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ft.procs, wantProcs) {
		t.Errorf("tree record %+v, want %+v", ft.procs, wantProcs)
	}
	for _, f := range ft.members {
		if !f.inner {
			t.Errorf("pid %d records this host's numbers, want its namespace's", f.Pid)
		}
	}
	if err := ft.Resume(); err != nil {
		t.Fatal(err)
	}
	n := p.Expect(t, `^count (\d+) `, waitFor)[1]
	next, _ := strconv.Atoi(n)
	if line := p.Expect(t, `^count \d+ `, waitFor)[0]; !strings.HasPrefix(line, fmt.Sprintf("count %d ", next+1)) {
		t.Errorf("after resume nsinit printed %q, want count %d", line, next+1)
	}
}

// TestKillReapsPIDNamespaceInit halts (kill) a frozen PID namespace whose
// init has threads besides its leader (nsinit threads, as a Go init has
// its runtime's): the last of them to die runs zap_pid_ns_processes and
// waits until the namespace's other PIDs, the init's own traced threads
// included, are freed, which only our waits do. kill must reap every
// thread as it comes, give up on none, and leave the init a zombie with
// no thread left, its exit ready for its parent: this test itself (the
// init our child, as an agent's workload is, started in a new PID
// namespace by us), or nsinit's launcher (the init not our child, as
// after an agent's restart), which then exits with the init's SIGKILL.
func TestKillReapsPIDNamespaceInit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace and CLONE_NEWPID (CI runs as root)")
	}
	tr := ptrace.NewTracer() // before the fixture: see TestStopTimeoutLetsGo
	t.Cleanup(tr.Close)
	path := fixture.Build(t, "nsinit")
	// Which thread dies last is the scheduler's choice: a few rounds.
	for round := 1; round <= 5; round++ {
		t.Run(fmt.Sprint("ours/", round), func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(path, "self", "threads")
			cmd.Stdout, cmd.Stderr = w, w
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Cloneflags: syscall.CLONE_NEWPID}
			err = cmd.Start()
			w.Close()
			if err != nil {
				r.Close()
				t.Fatal(err)
			}
			init := cmd.Process.Pid
			reaped := false
			t.Cleanup(func() {
				if !reaped {
					syscall.Kill(init, syscall.SIGKILL)
					tr.Close() // releases what kill left traced
					var ws syscall.WaitStatus
					syscall.Wait4(init, &ws, 0, nil)
				}
				r.Close()
			})
			lines := fixture.FollowReader(t, r)
			lines.Expect(t, `^count 1 `, waitFor)
			killInit(t, tr, init)
			var ws syscall.WaitStatus
			got, err := syscall.Wait4(init, &ws, syscall.WNOHANG, nil)
			if err != nil || got != init || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("wait4(init %d, WNOHANG) once kill returned = %d, %#x (%v), want it, killed by SIGKILL", init, got, uint32(ws), err)
			}
			reaped = true
		})
		if t.Failed() {
			return
		}
		t.Run(fmt.Sprint("adopted/", round), func(t *testing.T) {
			p := fixture.Start(t, path, "threads")
			p.Expect(t, `^count 1 `, waitFor)
			kids, err := fixture.Children(p.Pid())
			if err != nil || len(kids) != 1 {
				t.Fatalf("nsinit %d has children %v (%v), want its namespace's init", p.Pid(), kids, err)
			}
			killInit(t, tr, kids[0])
			if code, err := p.Wait(waitFor); err != nil || code != 128+int(syscall.SIGKILL) {
				t.Errorf("nsinit exit code %d (%v), want %d: its init killed", code, err, 128+int(syscall.SIGKILL))
			}
		})
		if t.Failed() {
			return
		}
	}
}

// killInit freezes the namespace of init, a multi-threaded init, and
// kills it; when kill returns, init must be a zombie with no other
// thread, or gone.
func killInit(t *testing.T, tr *ptrace.Tracer, init int) {
	t.Helper()
	ft, err := AttachTree(tr, init)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(ft.members[0].threads); n < 4 {
		t.Fatalf("init %d has %d threads, want 4 (nsinit threads)", init, n)
	}
	left, err := kill(ft.members)
	if err != nil || len(left) > 0 {
		t.Fatalf("kill: %v; threads not reaped in %v: %v", err, ptrace.StopTimeout, left)
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", init))
	if err != nil {
		return // reaped by its parent already
	}
	if tasks, _ := fixture.Tasks(init); len(tasks) > 1 {
		t.Errorf("init %d still has threads %v once kill returned", init, tasks)
	}
	if _, after, _ := strings.Cut(string(st), ") "); !strings.HasPrefix(after, "Z") && !strings.HasPrefix(after, "X") {
		t.Errorf("init %d once kill returned: stat %q, want a zombie", init, st)
	}
}
