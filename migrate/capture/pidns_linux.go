package capture

import (
	"fmt"
	"os"
	"strconv"

	"github.com/pcluster/pcluster/migrate/procfs"
)

// Freezing a PID namespace. A process in another PID namespace than
// pfreeze's is frozen only as that whole namespace: the tree of its init
// (pid 1 there), when the namespace is a direct child of pfreeze's and
// every process in it descends from its init (none entered it with
// setns). The snapshot then records the numbers the members see — PIDs,
// TIDs, parents, process groups and sessions of the namespace — which
// pthaw -pidns restores as a new namespace whose init is the saved pid 1:
// a namespace frozen, restored and frozen again keeps its numbers however
// many times it moves. pfreeze's own work (ptrace, /proc/PID, kill) keeps
// using this host's numbers: Frozen.Pid and thread.tid are ours.

// ownPidNS returns pfreeze's PID namespace.
func ownPidNS() (string, error) { return os.Readlink("/proc/self/ns/pid") }

// childNSInit returns the PID namespace of pid when pid is the init of a
// PID namespace that is a direct child of ours, and "" when pid is in our
// namespace. Anything else is refused with the reason.
func childNSInit(pid int) (string, error) {
	mine, err := ownPidNS()
	if err != nil {
		return "", fmt.Errorf("pid namespace: %w", err)
	}
	theirs, err := procfs.PidNS(pid)
	if err != nil {
		return "", fmt.Errorf("pid namespace: %w", err)
	}
	if theirs == mine {
		return "", nil
	}
	st, err := procfs.Status(pid)
	if err != nil {
		return "", err
	}
	ids, err := procfs.NSIDs(st, "NSpid")
	if err != nil {
		return "", err
	}
	if len(ids) == 2 && ids[1] == 1 {
		return theirs, nil
	}
	return "", otherPidNS(pid, theirs, ids)
}

// otherPidNS explains why a process in PID namespace ns, with ids
// (NSpid), is refused: it is not the init of a child of ours.
func otherPidNS(pid int, ns string, ids []int) error {
	if len(ids) != 2 {
		return unsupported("process is in a pid namespace nested %d levels below pfreeze's (only a direct child's init can be frozen, with -tree)", len(ids)-1)
	}
	if init := nsInit(ns); init > 0 {
		return unsupported("process is in another pid namespace, as its pid %d (freeze the namespace's init, pid %d, with -tree)", ids[1], init)
	}
	return unsupported("process is in another pid namespace, as its pid %d (freeze the namespace's init with -tree)", ids[1])
}

// checkPidNS refuses a process whose PID namespace is neither ours nor
// allowed (the namespace of the tree being frozen, "" for none). A
// namespace's init frozen alone is told to freeze it with -tree.
func checkPidNS(pid int, st map[string]string, allowed string) error {
	mine, err1 := ownPidNS()
	theirs, err2 := procfs.PidNS(pid)
	if err1 != nil || err2 != nil || theirs == mine || theirs == allowed {
		return nil
	}
	ids, err := procfs.NSIDs(st, "NSpid")
	if err != nil {
		return err
	}
	if allowed != "" {
		return unsupported("process is in a pid namespace nested in the frozen one")
	}
	if len(ids) == 2 && ids[1] == 1 {
		return unsupported("process is the init of another pid namespace (freeze the whole namespace with -tree)")
	}
	return otherPidNS(pid, theirs, ids)
}

// nsInit returns our number of the init of PID namespace ns, or 0.
func nsInit(ns string) int {
	for _, pid := range inPidNS(ns) {
		st, err := procfs.Status(pid)
		if err != nil {
			continue
		}
		if ids, err := procfs.NSIDs(st, "NSpid"); err == nil && ids[len(ids)-1] == 1 {
			return pid
		}
	}
	return 0
}

// inPidNS lists the processes (our numbers) of PID namespace ns.
func inPidNS(ns string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if theirs, err := procfs.PidNS(pid); err == nil && theirs == ns {
			out = append(out, pid)
		}
	}
	return out
}

// innermost returns the last id of a status line such as NSpid: the
// number in the process's own PID namespace.
func innermost(st map[string]string, key string) (int, error) {
	ids, err := procfs.NSIDs(st, key)
	if err != nil {
		return 0, err
	}
	return ids[len(ids)-1], nil
}

// checkWholeNS refuses a frozen namespace with a process that is not in
// the tree of its init (in): one that entered it with setns and fork
// would be left behind, or killed by the init's end, and its parent is
// outside the namespace, where no restore can put it. The members are
// stopped, so none of theirs can appear; one entering from outside from
// now on is not seen.
func (t *FrozenTree) checkWholeNS(in map[int]bool) error {
	for _, pid := range inPidNS(t.pidNS) {
		if !in[pid] && !isSnapshotRemains(pid) {
			return unsupported("pid %d is in the pid namespace of %d but not in its tree (entered with setns): the namespace cannot move without it", pid, t.Pid)
		}
	}
	return nil
}

// nsNumbers replaces our numbers in the tree record with those of the
// namespace, as its members see them: the root, its init, is pid 1 with
// no parent, and a group or session led from outside the namespace is 0.
// The members record their PIDs and TIDs the same way (Frozen.inner).
func (t *FrozenTree) nsNumbers() error {
	sts := make([]map[string]string, len(t.procs))
	ns := map[int]int{}
	for i, m := range t.procs {
		st, err := procfs.Status(m.Pid)
		if err != nil {
			return fmt.Errorf("pid %d: %w", m.Pid, err)
		}
		ids, err := procfs.NSIDs(st, "NSpid")
		if err != nil {
			return fmt.Errorf("pid %d: %w", m.Pid, err)
		}
		if len(ids) != 2 {
			return unsupported("pid %d: in a pid namespace nested in the frozen one", m.Pid)
		}
		sts[i], ns[m.Pid] = st, ids[1]
	}
	for i := range t.procs {
		m := &t.procs[i]
		pgid, err := innermost(sts[i], "NSpgid")
		if err != nil {
			return fmt.Errorf("pid %d: %w", m.Pid, err)
		}
		sid, err := innermost(sts[i], "NSsid")
		if err != nil {
			return fmt.Errorf("pid %d: %w", m.Pid, err)
		}
		m.Pid, m.PPid, m.Pgid, m.Sid = ns[m.Pid], ns[m.PPid], pgid, sid
	}
	for _, f := range t.members {
		f.inner = true
	}
	return nil
}
