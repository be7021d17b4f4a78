package capture

import (
	"os"
	"os/exec"
	"testing"

	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestAttachTreeChildrenExiting stops, again and again, a shell that
// forks short-lived children without pause (as a workload's script does
// with each `sleep`): a child that ends between being listed and being
// stopped is recorded as its stopped parent's zombie, never a failed
// freeze (CI saw a migration aborted with "tid N exited with status 0").
func TestAttachTreeChildrenExiting(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace (CI runs as root)")
	}
	tr := ptrace.NewTracer()
	t.Cleanup(tr.Close)
	sh := exec.Command("/bin/sh", "-c", "while :; do /bin/true; done")
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sh.Process.Kill()
		sh.Wait()
	})
	zombies := 0
	for i := 0; i < 300; i++ {
		ft, err := AttachTree(tr, sh.Process.Pid)
		if err != nil {
			t.Fatalf("freeze %d: %v", i, err)
		}
		for _, m := range ft.procs[1:] {
			if m.Zombie {
				zombies++
			}
		}
		if err := ft.Resume(); err != nil {
			t.Fatalf("resume %d: %v", i, err)
		}
	}
	t.Logf("300 freezes, %d with an ended child recorded as a zombie", zombies)
}
