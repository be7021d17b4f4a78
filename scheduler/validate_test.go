package scheduler

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestValidateWorkload checks each limit on a workload spec, applied by the
// FSM itself (so no raft entry can carry an invalid workload): every
// refusal is ErrInvalid and names the field and the limit.
func TestValidateWorkload(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "a"}})
	big := strings.Repeat("x", 1<<20)
	many := func(n int) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = fmt.Sprintf("K%d=v", i)
		}
		return out
	}
	labels := func(n int) map[string]string {
		m := map[string]string{}
		for i := 0; i < n; i++ {
			m[fmt.Sprint("k", i)] = "v"
		}
		return m
	}
	for _, c := range []struct {
		name string
		edit func(w *Workload)
		want string // in the error; "" means accepted
	}{
		{"plain", func(w *Workload) {}, ""},
		{"name 1 MiB", func(w *Workload) { w.Name = big }, "name: 1048576 bytes, limit 256"},
		{"name with newline", func(w *Workload) { w.Name = "a\nb" }, "name: control character"},
		{"command too long", func(w *Workload) { w.Command = big }, "command: 1048576 bytes, limit 4096"},
		{"arg with NUL", func(w *Workload) { w.Args = []string{"a\x00b"} }, "args[0]: NUL"},
		{"arg with newline", func(w *Workload) { w.Args = []string{"echo a\necho b"} }, ""},
		{"too many args", func(w *Workload) { w.Args = many(MaxArgs + 1) }, "args: 257 arguments, limit 256"},
		{"too many env", func(w *Workload) { w.Env = many(MaxEnv + 1) }, "env: 257 entries, limit 256"},
		{"env without =", func(w *Workload) { w.Env = []string{"X"} }, "env[0]"},
		{"spec total", func(w *Workload) {
			w.Args = []string{strings.Repeat("a", 4096), strings.Repeat("a", 4096), strings.Repeat("a", 4096), strings.Repeat("a", 4096), "b"}
		}, "spec: 16"},
		{"too many labels", func(w *Workload) { w.Labels = labels(MaxLabels + 1) }, "labels: 65 entries, limit 64"},
		{"label value", func(w *Workload) { w.Labels = map[string]string{"k": strings.Repeat("v", 257)} }, "labels k: 257 bytes, limit 256"},
		{"constraint key", func(w *Workload) { w.Constraints = map[string]string{strings.Repeat("k", 129): "v"} }, "constraints key: 129 bytes, limit 128"},
		{"max_restarts -1", func(w *Workload) { w.Restart.Max = -1 }, "max_restarts -1: out of range 0..10000"},
		{"cpu_milli -5", func(w *Workload) { w.Resources.CPUMilli = -5 }, "cpu_milli -5: out of range"},
		{"memory_mb huge", func(w *Workload) { w.Resources.MemoryMB = 1 << 40 }, "memory_mb 1099511627776: out of range"},
		{"restart mode", func(w *Workload) { w.Restart.Mode = "sometimes" }, `restart: "sometimes"`},
		{"uid 2^32", func(w *Workload) { w.UID = 1 << 32 }, "uid 4294967296: out of range 0..4294967294"},
		{"uid -5", func(w *Workload) { w.UID = -5 }, "uid -5: out of range"},
		{"gid 2^32-1", func(w *Workload) { w.GID = 1<<32 - 1 }, "gid 4294967295: out of range"},
		{"uid and user", func(w *Workload) { w.UID, w.User = 5, "bob" }, "give one"},
		{"user with colon", func(w *Workload) { w.User = "a:b" }, "not a user or group name"},
		{"id with slash", func(w *Workload) { w.ID = "../x" }, "id: "},
		{"vip", func(w *Workload) { w.VIP = "nope" }, "vip"},
	} {
		w := Workload{ID: fmt.Sprintf("w%d", a.idx), Name: "n", Command: "/bin/true", UID: -1, GID: -1, DesiredNode: "a"}
		c.edit(&w)
		err, _ := a.apply(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: w}).(error)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: refused: %v", c.name, err)
		case c.want != "" && (err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: got %v, want ErrInvalid with %q", c.name, err, c.want)
		}
	}
}

// TestMaxWorkloads checks the bound on the number of workloads in the state.
func TestMaxWorkloads(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "a"}})
	for i := 0; i < MaxWorkloads; i++ {
		a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: fmt.Sprint("w", i), Command: "x", UID: -1, GID: -1, DesiredNode: "a"}})
	}
	err, _ := a.apply(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "wmore", Command: "x", UID: -1, GID: -1, DesiredNode: "a"}}).(error)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "limit 10000") {
		t.Errorf("workload %d: got %v, want refused naming the limit", MaxWorkloads+1, err)
	}
}

// TestFSMReportLimits checks that reports are bounded too: a long exit
// message is cut, an oversized id refused.
func TestFSMReportLimits(t *testing.T) {
	a := &applier{t: t, f: NewFSM()}
	a.ok(CmdNodeUpsert, &NodeUpsertCmd{Node: Node{Name: "a"}})
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w1", Command: "x", UID: -1, GID: -1, DesiredNode: "a"}})
	a.ok(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w1", Node: "a", Attempt: 1, PID: 1})
	w := a.ok(CmdWorkloadExited, &WorkloadExitedCmd{ID: "w1", Node: "a", Attempt: 1, ExitCode: 1, Message: strings.Repeat("m", 1<<20)}).(Workload)
	if len(w.Message) != MaxMessageLen {
		t.Errorf("exit message: %d bytes, want cut to %d", len(w.Message), MaxMessageLen)
	}
	if err, _ := a.apply(CmdWorkloadStarted, &WorkloadStartedCmd{ID: strings.Repeat("w", 65), Node: "a", Attempt: 1}).(error); !errors.Is(err, ErrInvalid) {
		t.Errorf("report with a 65-byte id: got %v, want ErrInvalid", err)
	}
	a.ok(CmdWorkloadCreate, &WorkloadCreateCmd{Workload: Workload{ID: "w2", Command: "x", UID: -1, GID: -1, DesiredNode: "a"}})
	for _, pid := range []int{-1, MaxPID + 1} {
		if err, _ := a.apply(CmdWorkloadStarted, &WorkloadStartedCmd{ID: "w2", Node: "a", Attempt: 1, PID: pid}).(error); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "pid") {
			t.Errorf("started with pid %d: got %v, want refused naming the pid", pid, err)
		}
	}
}
