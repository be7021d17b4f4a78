package node

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// watchdogsOf lists the processes running the watchdog of the agent whose
// lease token is owner.
func watchdogsOf(owner string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.HasPrefix(string(b), WatchdogName+"\x00") && strings.Contains(string(b), owner) {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestFenceWatchdog: an agent in contact with the majority runs w1, which
// a failover could restart elsewhere, and w3, which none could replace;
// its lease lists w1 only. The agent ends (as when pclusterd dies) and no
// new one comes: its watchdog freezes w1 once the lease's contact is
// older than the fence time, leaves w3 running, records w1 and exits. A
// new agent, in contact and with w1 still this node's, takes the record
// and thaws w1.
func TestFenceWatchdog(t *testing.T) {
	l, cfg, logs := fenceSetup(t, "fencewd")
	name, dir := cfg.Name, cfg.DataDir
	cfg.Watchdog = true
	a := New(cfg)
	if a.cg == nil {
		t.Skip("no cgroup v2 freezer here")
	}
	var owners []string
	stop := startRun(a)
	t.Cleanup(func() {
		stop()
		if err := RemoveCgroups(name, dir); err != nil {
			t.Error(err)
		}
		// The last agent's watchdog finds nothing left to freeze.
		for _, o := range owners {
			waitLogged(t, logs, "watchdog "+o+" to exit", func() bool { return len(watchdogsOf(o)) == 0 })
		}
	})
	for _, w := range []scheduler.Workload{
		{ID: "w1", Restart: scheduler.RestartPolicy{Mode: scheduler.RestartOnFailure}},
		{ID: "w3"},
	} {
		w.Command, w.Args, w.UID, w.GID, w.DesiredNode = "sleep", []string{"1000"}, -1, -1, name
		if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: w}); err != nil {
			t.Fatal(err)
		}
		l.wait(t, w.ID, scheduler.StateRunning)
	}
	isFrozen := func(id string) bool {
		b, err := os.ReadFile(filepath.Join(a.cg.dir(id, 1), "cgroup.events"))
		return err == nil && bytes.Contains(b, []byte("frozen 1"))
	}
	var ls lease
	waitLogged(t, logs, "the lease to list w1", func() bool {
		var err error
		ls, err = readLease(dir)
		return err == nil && len(ls.Cgroups) == 1 && ls.Cgroups[0].Workload == "w1"
	})
	owners = append(owners, ls.Owner)
	if len(watchdogsOf(ls.Owner)) != 1 {
		t.Fatalf("watchdogs of the agent: %v, want one", watchdogsOf(ls.Owner))
	}
	if isFrozen("w1") || isFrozen("w3") {
		t.Fatalf("frozen while the agent runs in contact: w1 %v, w3 %v", isFrozen("w1"), isFrozen("w3"))
	}

	stop()
	waitLogged(t, logs, "w1 frozen by the watchdog", func() bool { return isFrozen("w1") })
	waitLogged(t, logs, "the watchdog to exit", func() bool { return len(watchdogsOf(ls.Owner)) == 0 })
	if isFrozen("w3") || len(procsOf(a.cg.dir("w3", 1))) == 0 {
		t.Fatalf("w3 (no failover could replace it): frozen %v, alive %v; want it running", isFrozen("w3"), len(procsOf(a.cg.dir("w3", 1))) > 0)
	}
	if b, err := os.ReadFile(filepath.Join(dir, frozenFile)); err != nil || string(b) != "w1 1\n" {
		t.Fatalf("the watchdog's record: %q (%v), want \"w1 1\\n\"", b, err)
	}

	b := New(cfg)
	stop = startRun(b)
	waitLogged(t, logs, "w1 thawed by the new agent (still this node's)", func() bool { return !isFrozen("w1") })
	if s := logs.String(); !strings.Contains(s, "frozen by the fence's watchdog") {
		t.Errorf("the new agent's log does not say it took the watchdog's freeze:\n%s", s)
	}
	if _, err := os.Stat(filepath.Join(dir, frozenFile)); err == nil {
		t.Errorf("the watchdog's record is still there after the new agent took it")
	}
	if got := l.get("w1"); got.State != scheduler.StateRunning || len(procsOf(b.cg.dir("w1", 1))) == 0 {
		t.Errorf("w1 after the new agent: %s, %d processes; want running", got.State, len(procsOf(b.cg.dir("w1", 1))))
	}
	nl, err := readLease(dir)
	if err != nil || nl.Owner == ls.Owner {
		t.Fatalf("the new agent's lease: %+v (%v), want a new owner", nl, err)
	}
	owners = append(owners, nl.Owner)
}

// TestFenceInherited: a new agent that starts cut off, with a replica
// that does not have the node's workloads yet (a restarted follower's
// replica is its last snapshot until a leader speaks to it), takes over
// the lease from its predecessor (whose watchdog stands down without
// freezing anything) and fences what that lease listed.
func TestFenceInherited(t *testing.T) {
	l, cfg, logs := fenceSetup(t, "fenceinh")
	name, dir := cfg.Name, cfg.DataDir
	cfg.Watchdog = true
	a := New(cfg)
	if a.cg == nil {
		t.Skip("no cgroup v2 freezer here")
	}
	var owners []string
	stop := startRun(a)
	t.Cleanup(func() {
		stop()
		if err := RemoveCgroups(name, dir); err != nil {
			t.Error(err)
		}
		for _, o := range owners {
			waitLogged(t, logs, "watchdog "+o+" to exit", func() bool { return len(watchdogsOf(o)) == 0 })
		}
	})
	w := scheduler.Workload{ID: "w1", Command: "sleep", Args: []string{"1000"}, UID: -1, GID: -1, DesiredNode: name,
		Restart: scheduler.RestartPolicy{Mode: scheduler.RestartOnFailure}}
	if err := l.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: w}); err != nil {
		t.Fatal(err)
	}
	l.wait(t, "w1", scheduler.StateRunning)
	var old lease
	waitLogged(t, logs, "the lease to list w1", func() bool {
		var err error
		old, err = readLease(dir)
		return err == nil && len(old.Cgroups) == 1
	})
	owners = append(owners, old.Owner)
	dirW1 := a.cg.dir("w1", 1)

	stop()
	cut := cfg
	cut.FSM = scheduler.NewFSM() // not replayed yet: no workloads
	cut.Contact = func() time.Time { return time.Now().Add(-time.Hour) }
	cut.Leader = func() string { return "" }
	b := New(cut)
	stop = startRun(b)
	waitLogged(t, logs, "w1 frozen by the new agent's fence", func() bool {
		return frozen(dirW1) && strings.Contains(logs.String(), "fenced: workload frozen while this node is cut off")
	})
	waitLogged(t, logs, "the old watchdog to stand down", func() bool { return len(watchdogsOf(old.Owner)) == 0 })
	if _, err := os.Stat(filepath.Join(dir, frozenFile)); err == nil {
		t.Errorf("the old watchdog froze something (%s exists); the new agent took over before its deadline", frozenFile)
	}
	nl, err := readLease(dir)
	if err != nil || nl.Owner == old.Owner || len(nl.Cgroups) != 1 || nl.Cgroups[0].Dir != dirW1 {
		t.Fatalf("the new agent's lease: %+v (%v), want a new owner listing w1's cgroup", nl, err)
	}
	owners = append(owners, nl.Owner)
}
