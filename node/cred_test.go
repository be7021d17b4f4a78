package node

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strings"
	"syscall"
	"testing"

	"github.com/pcluster/pcluster/scheduler"
)

// idsOf returns the Uid, Gid and Groups lines of /proc/PID/status.
func idsOf(t *testing.T, pid int) (uid, gid, groups string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(l, ":")
		v = strings.Join(strings.Fields(v), " ")
		switch k {
		case "Uid":
			uid = v
		case "Gid":
			gid = v
		case "Groups":
			groups = v
		}
	}
	return uid, gid, groups
}

// TestAgentCredentials runs workloads as an unprivileged user of the host's
// user database and checks /proc/PID/status: exactly the uid, the primary
// group and the supplementary groups asked for (runuser's rules), never the
// agent's own groups; a uid without a passwd entry needs a gid.
func TestAgentCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: workloads change uid")
	}
	b := make([]byte, 3)
	rand.Read(b)
	sfx := hex.EncodeToString(b)
	uname, gname := "pcagu-"+sfx, "pcagg-"+sfx
	if out, err := exec.Command("groupadd", "--system", gname).CombinedOutput(); err != nil {
		t.Fatalf("groupadd: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("groupdel", gname).Run() })
	if out, err := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-U", "-G", gname, uname).CombinedOutput(); err != nil {
		t.Fatalf("useradd: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("userdel", uname).Run() })
	u, err := user.Lookup(uname)
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroup(gname)
	if err != nil {
		t.Fatal(err)
	}
	// The agent (this test process) gets an extra group that must not leak.
	if err := syscall.Setgroups([]int{0, 4242}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Setgroups([]int{0}) })
	// Kernel order: groups sorted ascending.
	sorted := func(a, b string) string {
		var x, y int
		fmt.Sscan(a, &x)
		fmt.Sscan(b, &y)
		if x > y {
			a, b = b, a
		}
		return a + " " + b
	}
	var noEntry int
	for noEntry = 4000000; ; noEntry++ {
		if _, err := user.LookupId(fmt.Sprint(noEntry)); err != nil {
			break
		}
	}

	l := &fakeLeader{fsm: scheduler.NewFSM()}
	if err := l.apply(scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: "a"}}); err != nil {
		t.Fatal(err)
	}
	var pids []int
	t.Cleanup(func() {
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
		// Those meant to be refused, in case they ran.
		l.fsm.Read(func(s *scheduler.State) {
			for _, id := range []string{"wnogid", "wnouser"} {
				if w, ok := s.Workloads[id]; ok && w.PID > 0 {
					syscall.Kill(w.PID, syscall.SIGKILL)
				}
			}
		})
	})
	runAgent(t, l, t.TempDir())
	atoi := func(s string) int {
		var n int
		fmt.Sscan(s, &n)
		return n
	}
	rep := func(s string) string { return strings.Repeat(s+" ", 3) + s }
	for _, c := range []struct {
		name                      string
		w                         scheduler.Workload
		wantUID, wantGID, wantGrp string
	}{
		{"uid alone", scheduler.Workload{UID: atoi(u.Uid), GID: -1}, u.Uid, u.Gid, sorted(u.Gid, g.Gid)},
		{"user name", scheduler.Workload{UID: -1, GID: -1, User: uname}, u.Uid, u.Gid, sorted(u.Gid, g.Gid)},
		{"uid and gid", scheduler.Workload{UID: atoi(u.Uid), GID: 4343}, u.Uid, "4343", sorted("4343", g.Gid)},
		{"user and group name", scheduler.Workload{UID: -1, GID: -1, User: uname, Group: gname}, u.Uid, g.Gid, g.Gid},
		{"uid without passwd entry, gid", scheduler.Workload{UID: noEntry, GID: 4343}, fmt.Sprint(noEntry), "4343", ""},
		{"nothing asked", scheduler.Workload{UID: -1, GID: -1}, "0", "0", "0"},
	} {
		id := fmt.Sprintf("w%d", len(pids))
		c.w.ID, c.w.Command, c.w.Args, c.w.DesiredNode = id, "sleep", []string{"300"}, "a"
		if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: c.w}); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		w := l.wait(t, id, scheduler.StateRunning)
		pids = append(pids, w.PID)
		uid, gid, groups := idsOf(t, w.PID)
		if uid != rep(c.wantUID) || gid != rep(c.wantGID) || groups != c.wantGrp {
			t.Errorf("%s: Uid %q Gid %q Groups %q; want Uid %q Gid %q Groups %q", c.name, uid, gid, groups,
				rep(c.wantUID), rep(c.wantGID), c.wantGrp)
		}
	}

	// A uid with no passwd entry and no gid: refused, saying what to give.
	w := scheduler.Workload{ID: "wnogid", Command: "sleep", Args: []string{"300"}, DesiredNode: "a", UID: noEntry, GID: -1}
	if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: w}); err != nil {
		t.Fatal(err)
	}
	if w := l.wait(t, "wnogid", scheduler.StateFailed); !strings.Contains(w.Message, "no passwd entry") || !strings.Contains(w.Message, "-gid") {
		t.Errorf("uid %d without a passwd entry nor a gid: message %q, want it refused asking for -gid", noEntry, w.Message)
	}
	w = scheduler.Workload{ID: "wnouser", Command: "sleep", Args: []string{"300"}, DesiredNode: "a", UID: -1, GID: -1, User: "no-such-user-" + sfx}
	if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: w}); err != nil {
		t.Fatal(err)
	}
	if w := l.wait(t, "wnouser", scheduler.StateFailed); !strings.Contains(w.Message, "no-such-user-"+sfx) {
		t.Errorf("unknown user: message %q, want it named", w.Message)
	}
}

// TestCredentialOutOfRange: the state holds whatever was committed, so a
// uid or gid an older pclusterd accepted (−5, 2^32) reaches the agent,
// which refuses it by name instead of running the workload as itself.
func TestCredentialOutOfRange(t *testing.T) {
	for _, w := range []scheduler.Workload{{UID: -5, GID: -1}, {UID: -1, GID: -7}, {UID: 1 << 32, GID: 0}} {
		if cred, err := credential(w, "a"); err == nil || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("uid %d gid %d: got %+v, %v; want refused, out of range", w.UID, w.GID, cred, err)
		}
	}
}
