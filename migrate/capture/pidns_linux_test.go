package capture

import (
	"errors"
	"fmt"
	"os"
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
