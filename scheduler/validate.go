package scheduler

import (
	"errors"
	"fmt"
	"strings"
	"unicode"

	"github.com/pcluster/pcluster/netrehome"
)

// ErrInvalid marks a spec or command the state refuses: a field out of its
// range or over its limit (a *FieldError). The API answers it with 400.
var ErrInvalid = errors.New("invalid")

// FieldError names the field refused and why, in one line:
// "name: 1048576 bytes, limit 256".
type FieldError struct {
	Field   string
	Problem string
}

func (e *FieldError) Error() string        { return e.Field + ": " + e.Problem }
func (e *FieldError) Is(target error) bool { return target == ErrInvalid }

func invalid(field, format string, args ...any) error {
	return &FieldError{Field: field, Problem: fmt.Sprintf(format, args...)}
}

// Limits on a workload spec, documented in docs/cluster.md ("Limits"). They
// bound what one request can make the replicated state (and every list)
// hold: the state is in memory on every server, snapshotted whole.
const (
	MaxIDLen         = 64        // workload ids
	MaxNameLen       = 256       // workload and node names
	MaxPathLen       = 4096      // command, cwd (PATH_MAX)
	MaxArgs          = 256       // arguments
	MaxEnv           = 256       // environment entries
	MaxArgLen        = 4096      // one argument or environment entry
	MaxLabels        = 64        // labels, and constraints, each
	MaxLabelKeyLen   = 128       // label and constraint keys
	MaxLabelValueLen = 256       // label and constraint values
	MaxSpecBytes     = 16 << 10  // all strings of one spec together
	MaxRestartsLimit = 10000     // max_restarts (0 means no bound)
	MaxCPUMilli      = 1000000   // cpu_milli: 1000 CPUs
	MaxMemoryMB      = 1 << 30   // memory_mb: 1 PiB
	MaxWorkloads     = 10000     // workloads in the state, ended ones included until collected
	MaxMessageLen    = 1024      // exit messages are cut to this; the FSM cuts migration errors to it, so it never changes
	MaxSignalLen     = 64        // signal names in reports
	MaxUserName      = 256       // user and group names
	MaxID            = 1<<32 - 2 // uid and gid: (uid_t)−1 means "unchanged" to the kernel
)

// CheckID range-checks a uid or gid before it becomes a uint32, so that
// 2^32 or −7 can never wrap to root.
func CheckID(field string, v int64) (uint32, error) {
	if v < 0 || v > MaxID {
		return 0, invalid(fmt.Sprintf("%s %d", field, v), "out of range 0..%d", int64(MaxID))
	}
	return uint32(v), nil
}

// control reports a control character (C0, DEL, C1: U+0080–U+009F, which
// some terminals take for ESC sequences) other than tab.
func control(r rune) bool { return r != '\t' && unicode.IsControl(r) }

// checkString refuses s over max bytes, or holding control characters:
// names, labels, ids, the command and its cwd are printed on one line, and
// an ESC would reach the terminal of whoever lists them.
func checkString(field, s string, max int) error {
	if len(s) > max {
		return invalid(field, "%d bytes, limit %d", len(s), max)
	}
	if i := strings.IndexFunc(s, control); i >= 0 {
		return invalid(field, "control character %U at byte %d", []rune(s[i:])[0], i)
	}
	return nil
}

// checkText is checkString for an argument or an environment value, which
// may hold lines: tab and newline are allowed (a script given to sh -c),
// no other control character (pclusterctl quotes what it prints of them).
func checkText(field, s string, max int) error {
	if len(s) > max {
		return invalid(field, "%d bytes, limit %d", len(s), max)
	}
	if i := strings.IndexFunc(s, func(r rune) bool { return r != '\n' && control(r) }); i >= 0 {
		return invalid(field, "control character %U at byte %d (tab and newline only)", []rune(s[i:])[0], i)
	}
	return nil
}

// CheckWorkloadID checks an id given in a command or a path.
func CheckWorkloadID(id string) error {
	if id == "" {
		return invalid("id", "empty")
	}
	if len(id) > MaxIDLen {
		return invalid("id", "%d bytes, limit %d", len(id), MaxIDLen)
	}
	if id == "." || id == ".." || strings.IndexFunc(id, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.')
	}) >= 0 {
		return invalid("id", "%q: want letters, digits, '-', '_', '.'", id)
	}
	return nil
}

// CheckNodeName checks a node name given in a command or a path: not
// empty, at most MaxNameLen bytes, no control characters (it is printed on
// one line).
func CheckNodeName(name string) error {
	if name == "" {
		return invalid("node", "empty name")
	}
	return checkString("node", name, MaxNameLen)
}

// ValidateNode checks a node the leader is about to register (node-upsert):
// its name, labels and addresses, with the limits of a workload's. Like
// ValidateWorkload it binds where the command is proposed, not in the FSM.
func ValidateNode(n *Node) error {
	if err := CheckNodeName(n.Name); err != nil {
		return err
	}
	if err := checkMap("labels", n.Labels); err != nil {
		return err
	}
	for _, f := range []struct{ name, v string }{{"gossip address", n.GossipAddr}, {"raft address", n.RaftAddr}, {"API address", n.APIAddr}, {"no_vip", n.NoVIP}} {
		if err := checkString(f.name, f.v, MaxNameLen); err != nil {
			return err
		}
	}
	return nil
}

func checkMap(field string, m map[string]string) error {
	if len(m) > MaxLabels {
		return invalid(field, "%d entries, limit %d", len(m), MaxLabels)
	}
	for k, v := range m {
		if k == "" {
			return invalid(field, "empty key")
		}
		if err := checkString(field+" key", k, MaxLabelKeyLen); err != nil {
			return err
		}
		if err := checkString(field+" "+k, v, MaxLabelValueLen); err != nil {
			return err
		}
	}
	return nil
}

// ValidateWorkload checks a workload spec against every limit. It is
// applied where a workload-create is proposed (the API, through
// CheckCreate), never by the FSM: the FSM applies whatever was committed
// (see applyWorkloadCreate), so that a server replaying an entry an older
// pclusterd accepted agrees with one restored from a snapshot holding it.
// Limits may therefore tighten from one version to the next; the FSM's
// rules may not.
func ValidateWorkload(w *Workload) error {
	if err := CheckWorkloadID(w.ID); err != nil {
		return err
	}
	if w.Command == "" {
		return invalid("command", "empty")
	}
	// Before the name, which the API derives from the command when none
	// is given: the refusal names what the user gave.
	if err := checkString("command", w.Command, MaxPathLen); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		v    string
		max  int
	}{{"name", w.Name, MaxNameLen}, {"node", w.DesiredNode, MaxNameLen}, {"vip", w.VIP, 64}} {
		if err := checkString(f.name, f.v, f.max); err != nil {
			return err
		}
	}
	if err := checkString("cwd", w.Cwd, MaxPathLen); err != nil {
		return err
	}
	if w.VIP != "" {
		if _, err := netrehome.Parse(w.VIP); err != nil {
			return invalid("vip", "%v", err)
		}
	}
	total := len(w.Name) + len(w.Command) + len(w.Cwd) + len(w.User) + len(w.Group) + len(w.VIP)
	if len(w.Args) > MaxArgs {
		return invalid("args", "%d arguments, limit %d", len(w.Args), MaxArgs)
	}
	for i, a := range w.Args {
		if err := checkText(fmt.Sprintf("args[%d]", i), a, MaxArgLen); err != nil {
			return err
		}
		total += len(a)
	}
	if len(w.Env) > MaxEnv {
		return invalid("env", "%d entries, limit %d", len(w.Env), MaxEnv)
	}
	for i, e := range w.Env {
		k, v, ok := strings.Cut(e, "=")
		if !ok || k == "" {
			return invalid(fmt.Sprintf("env[%d]", i), "%.64q: want KEY=VALUE", e)
		}
		if err := checkString(fmt.Sprintf("env[%d] key", i), k, MaxArgLen); err != nil {
			return err
		}
		if err := checkText(fmt.Sprintf("env[%d] %.64s", i, k), v, MaxArgLen-len(k)-1); err != nil {
			return err
		}
		total += len(e)
	}
	for name, m := range map[string]map[string]string{"labels": w.Labels, "constraints": w.Constraints} {
		if err := checkMap(name, m); err != nil {
			return err
		}
		for k, v := range m {
			total += len(k) + len(v)
		}
	}
	if total > MaxSpecBytes {
		return invalid("spec", "%d bytes of strings, limit %d", total, MaxSpecBytes)
	}
	switch w.Restart.Mode {
	case "", RestartNever, RestartOnFailure, RestartAlways:
	default:
		return invalid("restart", "%q: want never, on-failure or always", w.Restart.Mode)
	}
	if w.Restart.Max < 0 || w.Restart.Max > MaxRestartsLimit {
		return invalid(fmt.Sprintf("max_restarts %d", w.Restart.Max), "out of range 0..%d (0: no bound)", MaxRestartsLimit)
	}
	if w.Migrate != "" && w.Migrate != MigrateNever {
		return invalid("migrate", "%.32q: want never (or nothing: the balancer may move it)", w.Migrate)
	}
	if err := validFence(w.Fence); err != nil {
		return err
	}
	if w.Resources.CPUMilli < 0 || w.Resources.CPUMilli > MaxCPUMilli {
		return invalid(fmt.Sprintf("cpu_milli %d", w.Resources.CPUMilli), "out of range 0..%d", MaxCPUMilli)
	}
	if w.Resources.MemoryMB > MaxMemoryMB {
		return invalid(fmt.Sprintf("memory_mb %d", w.Resources.MemoryMB), "out of range 0..%d", MaxMemoryMB)
	}
	return validateCred(w)
}

// CheckCreate is the check the leader makes before proposing workload w
// on state s: w's spec (ValidateWorkload), the bound on the number of
// workloads in the state, and its virtual IP, which a lost workload still
// holds (its node may come back with the process; the FSM, whose rule
// predates this, refuses only an active holder). The state is read before
// proposing, so requests that race may take the count a few over
// MaxWorkloads (each sees room); the FSM does not refuse them (it applies
// what was committed).
func CheckCreate(s *State, w *Workload) error {
	if err := ValidateWorkload(w); err != nil {
		return err
	}
	if len(s.Workloads) >= MaxWorkloads {
		return &FieldError{Field: "workloads",
			Problem: fmt.Sprintf("the state holds %d, limit %d; ended ones are removed after the GC retention", len(s.Workloads), MaxWorkloads)}
	}
	if w.VIP != "" {
		for _, o := range s.Workloads {
			if SameVIP(o.VIP, w.VIP) && o.State == StateLost {
				return fmt.Errorf("virtual IP %s is held by %s, lost with node %s (it may come back; stop it first): %w", w.VIP, o.ID, o.Node, ErrExists)
			}
		}
	}
	return nil
}

// validateCred checks a workload's credentials: uid/gid −1 (not given) or
// 0..MaxID, names well-formed, not both a uid and a user name.
func validateCred(w *Workload) error {
	for _, f := range []struct {
		name string
		v    int
	}{{"uid", w.UID}, {"gid", w.GID}} {
		if f.v != -1 {
			if _, err := CheckID(f.name, int64(f.v)); err != nil {
				return err
			}
		}
	}
	for _, f := range []struct{ name, v string }{{"user", w.User}, {"group", w.Group}} {
		if err := checkString(f.name, f.v, MaxUserName); err != nil {
			return err
		}
		if strings.ContainsAny(f.v, ":/") {
			return invalid(f.name, "%q is not a user or group name", f.v)
		}
	}
	if w.User != "" && w.UID != -1 {
		return invalid("uid", "%d and user %q: give one", w.UID, w.User)
	}
	if w.Group != "" && w.GID != -1 {
		return invalid("gid", "%d and group %q: give one", w.GID, w.Group)
	}
	return nil
}

// MaxPID is the kernel's PID_MAX_LIMIT on 64-bit: no process has a
// larger PID, and a negative one would make a signal reach a process group
// (kill(-pid)) or every process (kill(-1)).
const MaxPID = 1 << 22

// CheckReport checks the fields an agent's report carries. The API applies
// it before proposing the report (with CutMessage on its message); the FSM
// does not (see ValidateWorkload).
func CheckReport(id, node, signal string, pids ...int) error {
	if err := CheckWorkloadID(id); err != nil {
		return err
	}
	for _, pid := range pids {
		if pid < 0 || pid > MaxPID {
			return invalid(fmt.Sprintf("pid %d", pid), "out of range 0..%d", MaxPID)
		}
	}
	if err := checkString("node", node, MaxNameLen); err != nil {
		return err
	}
	return checkString("signal", signal, MaxSignalLen)
}

// CutMessage shortens an exit message to MaxMessageLen bytes; the API
// applies it to a report before proposing it.
func CutMessage(s string) string { return cut(s) }

// cut shortens a message to MaxMessageLen bytes.
func cut(s string) string {
	if len(s) <= MaxMessageLen {
		return s
	}
	return s[:MaxMessageLen-3] + "..."
}
