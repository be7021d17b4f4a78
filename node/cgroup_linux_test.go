package node

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
)

// TestCgroupHold: a workload born in its cgroup is held frozen by it
// beyond any tracer, thawed, killed through it, and the cgroups go.
func TestCgroupHold(t *testing.T) {
	dir := t.TempDir()
	cg, err := openCgroups("cgtest", dir)
	if err != nil {
		t.Skipf("no usable cgroup v2 here: %v", err)
	}
	defer func() {
		if err := RemoveCgroups("cgtest", dir); err != nil {
			t.Error(err)
		}
		if _, err := os.Stat(cg.base); !os.IsNotExist(err) {
			t.Errorf("%s left after RemoveCgroups: %v", cg.base, err)
		}
	}()
	f, err := cg.open("w1", 2)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	err = cmd.Start()
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	defer cmd.Process.Kill()
	if !cg.holds("w1", 2, pid) || cg.holds("w1", 1, pid) {
		t.Fatalf("pid %d: in w1.2 %v, in w1.1 %v; want only w1.2", pid, cg.holds("w1", 2, pid), cg.holds("w1", 1, pid))
	}
	d := cg.dir("w1", 2)
	if err := freeze(d, true); err != nil {
		t.Fatal(err)
	}
	if hs := cg.list(); len(hs) != 1 || hs[0].wid != "w1" || hs[0].attempt != 2 {
		t.Fatalf("held cgroups %+v, want w1 attempt 2", hs)
	}
	if err := freeze(d, false); err != nil {
		t.Fatal(err)
	}
	if hs := cg.list(); len(hs) != 0 {
		t.Fatalf("held cgroups after the thaw %+v, want none", hs)
	}
	if err := freeze(d, true); err != nil {
		t.Fatal(err)
	}
	if err := kill(d); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("frozen workload after kill: %v, want killed by SIGKILL", err)
	}
	freeze(d, false)
	if err := cg.remove("w1", 2); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d); !os.IsNotExist(err) {
		t.Fatalf("%s after remove: %v", d, err)
	}
}
