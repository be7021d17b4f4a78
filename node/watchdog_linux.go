package node

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The fence's dead-man switch (docs/cluster.md, "Fencing"). The fence of
// fence.go runs in pclusterd: while pclusterd is down nothing would
// freeze this node's workloads, and a failover could run a second copy
// of each until pclusterd is back. So every agent that fences starts a
// watchdog, pclusterd started again as WatchdogName, a process of its own
// outside the workloads' cgroups, that outlives the agent:
//
//   - the agent writes a lease, the file fence.lease in its data
//     directory, at every fence check (200 ms): who wrote it (a token of
//     this agent's), its last contact with the raft majority on the
//     host's CLOCK_MONOTONIC, its fence time, and the cgroups the fence
//     would freeze now (scheduler.FenceApplies, from its replica);
//   - the watchdog holds the read end of a pipe whose write end only the
//     agent holds: the pipe's end (the agent's process died, or its Run
//     ended) starts the watchdog's clock. From then on it reads the lease
//     every 100 ms; once its contact is older than its fence time it
//     freezes every listed cgroup that still holds processes, appends
//     each to the file fence.frozen (which the next agent settles as
//     its own fence's: thaw if still this node's, kill if not) and
//     exits;
//   - a new agent that writes the lease first (a pclusterd restarted
//     before the fence time: another token) takes over: the watchdog
//     exits without freezing anything. The new agent's fence counts from
//     the lease's contact, not from its own start (cluster: the server's
//     fence clock), so a restart does not push the fence past the
//     leader's failover.

// WatchdogName is argv[0] of a fence watchdog: pclusterd started so is
// the watchdog (IsWatchdog).
const WatchdogName = "pcluster-fence"

// leaseFile and frozenFile are the lease and the watchdog's record of
// what it froze, in the data directory.
const (
	leaseFile  = "fence.lease"
	frozenFile = "fence.frozen"
)

// watchdogPoll is how often a watchdog whose agent ended reads the lease.
const watchdogPoll = 100 * time.Millisecond

// lease is what an agent leaves its watchdog.
type lease struct {
	Owner      string        `json:"owner"`       // the writing agent's token
	Contact    int64         `json:"contact"`     // CLOCK_MONOTONIC ns of its last majority contact
	FenceAfter time.Duration `json:"fence_after"` // its fence time
	// Cgroups are the cgroup directories of the workloads the fence
	// would freeze now, with the workload and attempt each holds.
	Cgroups []leaseCgroup `json:"cgroups,omitempty"`
}

type leaseCgroup struct {
	Dir      string `json:"dir"`
	Workload string `json:"workload"`
	Attempt  int    `json:"attempt"`
}

// monotonic returns the host's CLOCK_MONOTONIC, which every process of
// the host shares (unlike Go's monotonic readings).
func monotonic() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// IsWatchdog reports whether this process was started as a fence
// watchdog.
func IsWatchdog() bool { return len(os.Args) > 0 && os.Args[0] == WatchdogName }

// readLease reads the lease in dataDir.
func readLease(dataDir string) (lease, error) {
	var l lease
	b, err := os.ReadFile(filepath.Join(dataDir, leaseFile))
	if err != nil {
		return l, fmt.Errorf("fence lease: %w", err)
	}
	if err := json.Unmarshal(b, &l); err != nil {
		return l, fmt.Errorf("fence lease %s: %w", filepath.Join(dataDir, leaseFile), err)
	}
	return l, nil
}

// writeLease replaces the lease in dataDir (a rename: a reader never
// sees half of one).
func writeLease(dataDir string, l lease) error {
	b, err := json.Marshal(l)
	if err != nil {
		return fmt.Errorf("fence lease: %w", err)
	}
	p := filepath.Join(dataDir, leaseFile)
	if err := os.WriteFile(p+".tmp", b, 0o600); err != nil {
		return fmt.Errorf("fence lease: %w", err)
	}
	if err := os.Rename(p+".tmp", p); err != nil {
		return fmt.Errorf("fence lease: %w", err)
	}
	return nil
}

// LeaseContact returns when the agent that last wrote the lease in
// dataDir was last in contact with the raft majority, as a time of this
// process's clock; ok is false when there is no lease. A daemon starting
// on the data directory fences from this contact, not from its start.
func LeaseContact(dataDir string) (time.Time, bool) {
	l, err := readLease(dataDir)
	if err != nil || l.Contact == 0 {
		return time.Time{}, false
	}
	return time.Now().Add(-(monotonic() - time.Duration(l.Contact))), true
}

// startWatchdog starts this agent's watchdog, writing its first lease
// before (so that an earlier agent's watchdog stands down and the new
// one finds its owner's lease), and returns the write end of the pipe
// that the agent keeps open for its life. The watchdog's output goes to
// the agent's stderr.
func (a *Agent) startWatchdog(contact time.Time) (*os.File, error) {
	tok := make([]byte, 8)
	rand.Read(tok)
	a.leaseOwner = fmt.Sprintf("%d-%s", os.Getpid(), hex.EncodeToString(tok))
	cgs, idx := a.fenceCandidates()
	if a.writeLease(contact, cgs) {
		a.leaseIdx.Store(idx)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("fence watchdog: %w", err)
	}
	defer r.Close()
	cmd := exec.Command("/proc/self/exe", a.cfg.DataDir, a.leaseOwner)
	cmd.Args[0] = WatchdogName
	cmd.Env = []string{"PCLUSTER_NODE=" + a.cfg.Name, "GOMAXPROCS=1"}
	cmd.Dir = "/"
	cmd.Stderr = os.Stderr
	cmd.ExtraFiles = []*os.File{r} // fd 3
	// A session of its own: a signal to the daemon's process group (a
	// terminal's ^C) is not one to the watchdog.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return nil, fmt.Errorf("fence watchdog: %w", err)
	}
	// Reaped when it exits while this agent runs; otherwise the
	// daemon's exit leaves it to init.
	go cmd.Wait()
	return w, nil
}

// writeLease renews the lease: contact and the cgroups the fence would
// freeze now; false if it could not.
func (a *Agent) writeLease(contact time.Time, cgs []leaseCgroup) bool {
	l := lease{Owner: a.leaseOwner, Contact: int64(monotonic() - time.Since(contact)), FenceAfter: a.cfg.FenceAfter, Cgroups: cgs}
	err := writeLease(a.cfg.DataDir, l)
	if err != nil && !a.leaseErr {
		a.log.Error("cannot renew the fence lease: the workloads are not fenced if pclusterd dies", "err", err)
	}
	a.leaseErr = err != nil
	return err == nil
}

// takeWatchdogFrozen adopts as fenced what a watchdog froze (fence.frozen):
// settleFence decides them once the node is back in contact. Called at
// Run's start and at every fence check.
func (a *Agent) takeWatchdogFrozen() {
	p := filepath.Join(a.cfg.DataDir, frozenFile)
	taken := p + ".taken"
	if err := os.Rename(p, taken); err != nil {
		return
	}
	b, _ := os.ReadFile(taken)
	os.Remove(taken)
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, line := range strings.Split(string(b), "\n") {
		id, n, ok := strings.Cut(line, " ")
		attempt, err := strconv.Atoi(n)
		if !ok || err != nil || a.cg == nil || !frozen(a.cg.dir(id, attempt)) {
			continue
		}
		if _, f := a.fenced[id]; !f {
			a.log.Warn("workload frozen by the fence's watchdog while no agent ran: settled once back in contact", "workload", id, "attempt", attempt)
			a.fenced[id] = attempt
		}
	}
}

// WatchdogMain runs a fence watchdog (args: the data directory and its
// agent's token; fd 3: the pipe from its agent) and returns its exit
// code.
func WatchdogMain() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", "fence-watchdog")
	if len(os.Args) != 3 {
		log.Error("usage: " + WatchdogName + " DATADIR OWNER")
		return 2
	}
	dataDir, owner := os.Args[1], os.Args[2]
	syscall.SetNonblock(3, false)
	agent := os.NewFile(3, "agent")
	io.Copy(io.Discard, agent) // until the agent's end closes the pipe
	agent.Close()
	for {
		l, err := readLease(dataDir)
		if errors.Is(err, fs.ErrNotExist) {
			return 0 // the data directory went with its daemon (-dev)
		}
		if err != nil {
			log.Error("agent gone; no lease to keep, workloads not fenced", "err", err)
			return 1
		}
		if l.Owner != owner {
			return 0 // a new agent took over: its own fence and watchdog
		}
		if len(l.Cgroups) == 0 {
			return 0 // nothing a failover could replace
		}
		left := time.Duration(l.Contact) + l.FenceAfter - monotonic()
		if left > 0 {
			time.Sleep(min(left, watchdogPoll))
			continue
		}
		since := (monotonic() - time.Duration(l.Contact)).Round(time.Millisecond)
		rec, err := os.OpenFile(filepath.Join(dataDir, frozenFile), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			log.Error("cannot record what it freezes: the next agent settles it as a migration's", "err", err)
		}
		bw := bufio.NewWriter(io.Discard)
		if rec != nil {
			bw = bufio.NewWriter(rec)
		}
		for _, c := range l.Cgroups {
			if len(procsOf(c.Dir)) == 0 {
				continue
			}
			if err := freeze(c.Dir, true); err != nil {
				log.Error("cannot fence workload", "workload", c.Workload, "err", err)
				continue
			}
			fmt.Fprintf(bw, "%s %d\n", c.Workload, c.Attempt)
			log.Warn("fenced: workload frozen while no agent runs on this node (agent gone, no contact with the raft majority for the fence time)",
				"workload", c.Workload, "attempt", c.Attempt, "last_contact", since, "fence_after", l.FenceAfter)
		}
		bw.Flush()
		if rec != nil {
			rec.Close()
		}
		return 0
	}
}
