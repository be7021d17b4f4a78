package scheduler

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestValidateWorkload checks each limit on a workload spec, as the leader
// applies it before proposing (CheckCreate; cluster's TestAPILimits holds
// that the API does): every refusal is ErrInvalid and names the field and
// the limit.
func TestValidateWorkload(t *testing.T) {
	st := NewState()
	st.Nodes["a"] = &Node{Name: "a"}
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
		{"arg with NUL", func(w *Workload) { w.Args = []string{"a\x00b"} }, "args[0]: control character U+0000 at byte 1"},
		{"arg with newline and tab", func(w *Workload) { w.Args = []string{"echo a\n\techo b"} }, ""},
		{"arg with ESC", func(w *Workload) { w.Args = []string{"ok", "\x1b[2J"} }, "args[1]: control character U+001B at byte 0"},
		{"arg with CR", func(w *Workload) { w.Args = []string{"a\rb"} }, "args[0]: control character U+000D"},
		{"command with ESC", func(w *Workload) { w.Command = "/bin/true\x1b]0;x\x07" }, "command: control character U+001B at byte 9"},
		{"command with newline", func(w *Workload) { w.Command = "/bin/a\nb" }, "command: control character U+000A"},
		{"cwd with newline", func(w *Workload) { w.Cwd = "/tmp\n" }, "cwd: control character U+000A"},
		{"env key with newline", func(w *Workload) { w.Env = []string{"A\nB=1"} }, "env[0] key: control character U+000A"},
		{"env value with ESC", func(w *Workload) { w.Env = []string{"X=1", "A=\x1b[31m"} }, "env[1] A: control character U+001B"},
		{"env value with newline", func(w *Workload) { w.Env = []string{"SCRIPT=a\nb"} }, ""},
		{"name with C1 CSI", func(w *Workload) { w.Name = "a\u009b2J" }, "name: control character U+009B"},
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
		w := Workload{ID: "w1", Name: "n", Command: "/bin/true", UID: -1, GID: -1, DesiredNode: "a"}
		c.edit(&w)
		err := CheckCreate(st, &w)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%s: refused: %v", c.name, err)
		case c.want != "" && (err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%s: got %v, want ErrInvalid with %q", c.name, err, c.want)
		}
	}
}

// TestValidateNode checks the node the leader registers from gossip.
func TestValidateNode(t *testing.T) {
	for _, c := range []struct {
		n    Node
		want string
	}{
		{Node{Name: "a", Labels: map[string]string{"zone": "x"}, APIAddr: "198.18.0.1:4647"}, ""},
		{Node{Name: ""}, "node: empty name"},
		{Node{Name: "a\x1b[2J"}, "node: control character U+001B"},
		{Node{Name: strings.Repeat("n", 257)}, "node: 257 bytes, limit 256"},
		{Node{Name: "a", Labels: map[string]string{"k": "v\n"}}, "labels k: control character U+000A"},
		{Node{Name: "a", APIAddr: "x\ny"}, "API address: control character"},
	} {
		err := ValidateNode(&c.n)
		if c.want == "" && err != nil || c.want != "" && (!errors.Is(err, ErrInvalid) || !strings.Contains(fmt.Sprint(err), c.want)) {
			t.Errorf("node %.20q: got %v, want %q", c.n.Name, err, c.want)
		}
	}
}

// TestVIPHeldWhileLost: a lost workload keeps its virtual IP (its node may
// come back with the process), so a new workload cannot take it until the
// lost one is stopped; an ended one gives it up.
func TestVIPHeldWhileLost(t *testing.T) {
	st := NewState()
	st.Workloads["wlost"] = &Workload{ID: "wlost", VIP: "198.18.0.10", State: StateLost, Node: "b"}
	st.Workloads["wdone"] = &Workload{ID: "wdone", VIP: "198.18.0.11", State: StateStopped, Node: "b"}
	w := Workload{ID: "wnew", Command: "x", UID: -1, GID: -1, DesiredNode: "a", VIP: "198.18.0.10"}
	if err := CheckCreate(st, &w); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "held by wlost, lost with node b") {
		t.Errorf("VIP of a lost workload: got %v, want ErrExists naming wlost", err)
	}
	w.VIP = "198.18.0.11"
	if err := CheckCreate(st, &w); err != nil {
		t.Errorf("VIP of a stopped workload: %v", err)
	}
}

// TestMaxWorkloads checks the bound on the number of workloads in the
// state, checked before proposing.
func TestMaxWorkloads(t *testing.T) {
	st := NewState()
	w := Workload{ID: "wmore", Command: "x", UID: -1, GID: -1, DesiredNode: "a"}
	for i := 0; i < MaxWorkloads-1; i++ {
		st.Workloads[fmt.Sprint("w", i)] = &Workload{}
	}
	if err := CheckCreate(st, &w); err != nil {
		t.Fatalf("workload %d: %v", MaxWorkloads, err)
	}
	st.Workloads["wlast"] = &Workload{}
	err := CheckCreate(st, &w)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "limit 10000") {
		t.Errorf("workload %d: got %v, want refused naming the limit", MaxWorkloads+1, err)
	}
}

// TestReportLimits checks that reports are bounded too, before they are
// proposed: a long exit message is cut, an oversized id, a node or signal
// with a newline, a PID out of range refused naming the field (cluster's
// TestAPILimits holds that the API applies these).
func TestReportLimits(t *testing.T) {
	if m := CutMessage(strings.Repeat("m", 1<<20)); len(m) != MaxMessageLen {
		t.Errorf("exit message: %d bytes, want cut to %d", len(m), MaxMessageLen)
	}
	for _, c := range []struct {
		id, node, signal string
		pid              int
		want             string
	}{
		{"w1", "a", "", 1, ""},
		{strings.Repeat("w", 65), "a", "", 1, "id: 65 bytes"},
		{"w1", "a\nb", "", 1, "node: control character"},
		{"w1", "a", strings.Repeat("s", 65), 1, "signal: 65 bytes"},
		{"w1", "a", "", -1, "pid -1: out of range"},
		{"w1", "a", "", MaxPID + 1, "pid 4194305: out of range"},
	} {
		err := CheckReport(c.id, c.node, c.signal, c.pid)
		if c.want == "" && err != nil || c.want != "" && (!errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("report %.20q on %q signal %.20q pid %d: got %v, want %q", c.id, c.node, c.signal, c.pid, err, c.want)
		}
	}
}
