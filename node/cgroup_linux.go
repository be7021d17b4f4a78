package node

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
)

// Workload cgroups. Every workload process the agent starts or restores
// lives in a cgroup v2 of its own, ID.ATTEMPT under this daemon's
// pcluster cgroup (CgroupBase). The cgroup is what holds a migrating
// original: the source freezes it (cgroup.freeze) for the stop window, and
// a freeze, unlike the agent's ptrace, outlives the agent. A source agent
// SIGKILLed during a migration leaves the original frozen, neither running
// nor dead, and the next agent on the node decides from the raft state
// (Agent.settleHeld): kill it if the move committed, thaw it otherwise.
// The attempt in the name tells the copies of one workload apart (A → B →
// A). On a host without a usable cgroup v2 the agent says so once and
// holds migrating originals by its ptrace alone (PTRACE_O_EXITKILL).

// cgroups is this node's pcluster cgroup; nil when cgroup v2 is not usable.
type cgroups struct {
	mnt  string // the cgroup v2 mount
	base string // this node's pcluster cgroup under it
}

// cgroup2Mount returns where the cgroup v2 hierarchy is mounted (on a
// hybrid host, /sys/fs/cgroup/unified), from /proc/self/mountinfo.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPER
		l := sc.Text()
		i := strings.Index(l, " - ")
		if i < 0 {
			continue
		}
		post, pre := strings.Fields(l[i+3:]), strings.Fields(l[:i])
		if len(post) > 0 && post[0] == "cgroup2" && len(pre) >= 5 && pre[3] == "/" {
			return procfs.UnescapeMount(pre[4]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 file system mounted")
}

// CgroupBase returns the pcluster cgroup of the daemon of node name with
// data directory dataDir: pcluster-NAME-HASH (HASH: of the data
// directory, so that two daemons on one host, as in tests, never share
// one) under the daemon's own cgroup v2, so that the workloads stay where
// the daemon was put (a service manager's slice).
func CgroupBase(name, dataDir string) (string, error) {
	_, base, err := cgroupBase(name, dataDir)
	return base, err
}

func cgroupBase(name, dataDir string) (mnt, base string, err error) {
	mnt, err = cgroup2Mount()
	if err != nil {
		return "", "", fmt.Errorf("cgroup v2: %w", err)
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", "", fmt.Errorf("cgroup v2: %w", err)
	}
	own := ""
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			own = p
		}
	}
	if own == "" {
		return "", "", errors.New("cgroup v2: this process is in no cgroup v2 (/proc/self/cgroup has no 0:: line)")
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return "", "", fmt.Errorf("cgroup v2: data dir: %w", err)
	}
	sum := sha256.Sum256([]byte(abs))
	return mnt, filepath.Join(mnt, own, fmt.Sprintf("pcluster-%s-%x", name, sum[:4])), nil
}

// openCgroups makes the daemon's pcluster cgroup, or says why it cannot.
func openCgroups(name, dataDir string) (*cgroups, error) {
	mnt, base, err := cgroupBase(name, dataDir)
	if err != nil {
		return nil, err
	}
	if err := os.Mkdir(base, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("cgroup v2: %w", err)
	}
	if _, err := os.Stat(filepath.Join(base, "cgroup.freeze")); err != nil {
		// The root has no cgroup.freeze, every other cgroup v2 has.
		return nil, fmt.Errorf("cgroup v2: %s: no freezer: %w", base, err)
	}
	return &cgroups{mnt: mnt, base: base}, nil
}

// dir returns the cgroup of a workload's attempt.
func (c *cgroups) dir(wid string, attempt int) string {
	return filepath.Join(c.base, fmt.Sprintf("%s.%d", wid, attempt))
}

// make creates the cgroup of a workload's attempt (an empty one left
// behind is reused) and returns it.
func (c *cgroups) make(wid string, attempt int) (string, error) {
	d := c.dir(wid, attempt)
	if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("cgroup of %s: %w", wid, err)
	}
	return d, nil
}

// open returns a directory fd of the cgroup, for clone3's
// CLONE_INTO_CGROUP (SysProcAttr.CgroupFD): the child is born in it.
func (c *cgroups) open(wid string, attempt int) (*os.File, error) {
	d, err := c.make(wid, attempt)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(d)
	if err != nil {
		return nil, fmt.Errorf("cgroup of %s: %w", wid, err)
	}
	return f, nil
}

// place moves pid (all its threads) into the cgroup of a workload's
// attempt.
func (c *cgroups) place(wid string, attempt int, pids ...int) error {
	d, err := c.make(wid, attempt)
	if err != nil {
		return err
	}
	for _, pid := range pids {
		if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("cgroup of %s: pid %d: %w", wid, pid, err)
		}
	}
	return nil
}

// holds reports whether pid is in the cgroup of the workload's attempt.
func (c *cgroups) holds(wid string, attempt, pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return filepath.Join(c.mnt, p) == c.dir(wid, attempt)
		}
	}
	return false
}

// freeze freezes (or thaws) a cgroup and waits until the kernel says it
// is (cgroup.events: frozen 1, or 0).
func freeze(dir string, on bool) error {
	v := "0"
	if on {
		v = "1"
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte(v), 0); err != nil {
		return fmt.Errorf("cgroup %s: freeze %s: %w", filepath.Base(dir), v, err)
	}
	// A few milliseconds at most: every task stops at its next return to
	// user space, and a ptrace-stopped one counts as frozen at once.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
		if err != nil {
			return fmt.Errorf("cgroup %s: %w", filepath.Base(dir), err)
		}
		if bytes.Contains(b, []byte("frozen "+v)) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: not frozen=%s after 5s: %s", filepath.Base(dir), v, bytes.TrimSpace(b))
		}
	}
}

// frozen reports whether the cgroup is asked to be frozen.
func frozen(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.freeze"))
	return err == nil && bytes.HasPrefix(b, []byte("1"))
}

// procsOf lists the processes in a cgroup.
func procsOf(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// kill SIGKILLs every process in the cgroup (frozen ones too).
func kill(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0); err != nil {
		// Kernels before 5.14 have no cgroup.kill.
		for _, pid := range procsOf(dir) {
			unix.Kill(pid, unix.SIGKILL)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("cgroup %s: kill: %w", filepath.Base(dir), err)
		}
	}
	return nil
}

// remove removes the cgroup of a workload's attempt once it is empty
// (EBUSY while a process lives in it: it stays, and the next agent's
// sweep removes it).
func (c *cgroups) remove(wid string, attempt int) error {
	err := unix.Rmdir(c.dir(wid, attempt))
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("cgroup of %s: remove: %w", wid, err)
	}
	return nil
}

// close removes the base if no workload cgroup is left in it (an agent
// that ran none).
func (c *cgroups) close() {
	unix.Rmdir(c.base)
}

// held is a workload cgroup found frozen, with its workload and attempt.
type held struct {
	dir     string
	wid     string
	attempt int
}

// list returns the workload cgroups under the base: frozen ones in held,
// and removes the empty unfrozen ones (their workload ended while no
// agent ran here, or its exit came before the cgroup could go).
func (c *cgroups) list() []held {
	ents, err := os.ReadDir(c.base)
	if err != nil {
		return nil
	}
	var out []held
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		i := strings.LastIndexByte(e.Name(), '.')
		if i <= 0 {
			continue
		}
		attempt, err := strconv.Atoi(e.Name()[i+1:])
		if err != nil {
			continue
		}
		d := filepath.Join(c.base, e.Name())
		if frozen(d) {
			out = append(out, held{dir: d, wid: e.Name()[:i], attempt: attempt})
		} else if len(procsOf(d)) == 0 {
			unix.Rmdir(d)
		}
	}
	return out
}

// RemoveCgroups kills what is left in a daemon's pcluster cgroup
// (CgroupBase) and removes it: for tests, once their daemons are gone.
func RemoveCgroups(name, dataDir string) error {
	base, err := CgroupBase(name, dataDir)
	if err != nil {
		return nil // no cgroup v2: nothing was made
	}
	ents, err := os.ReadDir(base)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var errs []error
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		d := filepath.Join(base, e.Name())
		// A killed task leaves cgroup.procs before it has finished
		// exiting, and the cgroup stays busy until it has (populated 0
		// in cgroup.events): retry the removal, killing again whatever
		// was forked meanwhile (seen: EBUSY after a 5 s wait on a host at
		// load 9, the cgroup found empty later).
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			kill(d)
			err := unix.Rmdir(d)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
				break
			}
		}
	}
	if err := unix.Rmdir(base); err != nil && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("remove cgroup %s: %w", base, err))
	}
	return errors.Join(errs...)
}
