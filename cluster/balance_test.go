package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/fixture"
)

// balanceFlags make the leader's balancer quick enough for a test: a
// round a second, and a cool-down shorter than the hold below (the hold
// must come from the planner's rules, not from the cool-down).
var balanceFlags = []string{"-balance-interval", "1s", "-balance-cooldown", "20s"}

// TestBalanceSpreads: four CPU-bound workloads (30% of a CPU each, so the
// test leaves the shared machine room) placed on one node of three while
// the other two are ineligible, one of them run with -migrate never. The
// two are made eligible: in off mode nothing moves; in aggressive mode
// the balancer spreads them within a minute, measured per workload (the
// three namespaces share one /proc/loadavg), never moves the -migrate
// never one, and then holds still: no more than one further move in the
// following minute.
func TestBalanceSpreads(t *testing.T) {
	c := newTestCluster(t)
	bin := fixture.Build(t, "dutyloop")
	nodes := startDrainLab(t, c, 200+int(c.prefix[2])%20, func(int) []string { return balanceFlags })
	n1 := nodes[0]
	ctx := context.Background()
	for _, nd := range nodes[1:] {
		c.ctl(n1, "node", "eligibility", "-disable", nd.name)
	}
	var st api.BalanceStatus
	c.ctlJSON(n1, &st, "balance", "status")
	if st.Mode != api.BalanceOff {
		t.Fatalf("mode %q before any set, want off", st.Mode)
	}
	var ws []api.Workload
	for i := range 4 {
		args := []string{"run", "-name", fmt.Sprintf("duty%d", i)}
		if i == 0 {
			args = append(args, "-migrate", "never")
		}
		var w api.Workload
		c.ctlJSON(n1, &w, append(args, bin, "30")...)
		if w.DesiredNode != n1.name {
			t.Fatalf("workload %s placed on %s, want %s (the only eligible node)", w.ID, w.DesiredNode, n1.name)
		}
		ws = append(ws, w)
	}
	never := ws[0].ID
	if ws[0].Migrate != "never" {
		t.Fatalf("workload %s: migrate %q, want never", never, ws[0].Migrate)
	}
	for _, nd := range nodes[1:] {
		c.ctl(n1, "node", "eligibility", "-enable", nd.name)
	}
	// The balancer sees the four on n1, by their own use.
	c.waitFor(30*time.Second, "n1's workloads measured", func() error {
		c.ctlJSON(n1, &st, "balance", "status")
		for _, n := range st.Nodes {
			if n.Name == n1.name && n.CPUMilli >= 4*100 {
				return nil
			}
		}
		return fmt.Errorf("nodes %+v", st.Nodes)
	})
	for _, n := range st.Nodes {
		if n.Name != n1.name && n.CPUMilli > 50 {
			t.Fatalf("node %s: %dm CPU with no workload, want ~0: the load must be each node's own, not the host's", n.Name, n.CPUMilli)
		}
	}
	// Off: nothing moves, and the status says why.
	offUntil := time.Now().Add(10 * time.Second)
	for time.Now().Before(offUntil) {
		time.Sleep(time.Second)
		if ms, err := n1.client.Migrations(ctx, true); err != nil || len(ms) != 0 {
			t.Fatalf("in off mode: migrations %+v (%v), want none", ms, err)
		}
	}
	c.ctlJSON(n1, &st, "balance", "status")
	if k := len(st.Decisions); k == 0 || st.Decisions[k-1].Kind != api.BalanceHeld || st.Decisions[k-1].Reason != "mode off" {
		t.Fatalf("decisions in off mode %+v, want the last: held, mode off", st.Decisions)
	}

	c.ctlJSON(nodes[1], &st, "balance", "set", "-mode", "aggressive")
	if st.Mode != api.BalanceAggressive {
		t.Fatalf("balance set: mode %q", st.Mode)
	}
	leader := st.Leader
	start := time.Now()
	var spreadAt time.Time
	var plannedBefore int
	c.waitFor(60*time.Second, "the balancer to spread the workloads", func() error {
		per := map[string]int{}
		for _, w := range ws {
			got, err := workloadOn(n1, w.ID)
			if err != nil || got.State != "running" || got.PID == 0 {
				return fmt.Errorf("%s: %s (%v)", w.ID, got.State, err)
			}
			per[got.Node]++
		}
		ms, err := n1.client.Migrations(ctx, true)
		if err != nil {
			return err
		}
		for _, m := range ms {
			if m.EndedAt.IsZero() {
				return fmt.Errorf("migration %s %s", m.ID, m.State)
			}
		}
		for _, nd := range nodes {
			if per[nd.name] == 0 {
				return fmt.Errorf("per node %v", per)
			}
		}
		spreadAt, plannedBefore = time.Now(), len(ms)
		return nil
	})
	t.Logf("spread in %v with %d migrations", spreadAt.Sub(start).Round(time.Second), plannedBefore)
	ms, _ := n1.client.Migrations(ctx, true)
	for _, m := range ms {
		if m.Workload == never {
			t.Fatalf("migration %s moved %s, which runs with -migrate never", m.ID, never)
		}
		if m.State != "done" || !strings.HasPrefix(m.Reason, "balance (aggressive)") {
			t.Errorf("migration %s: %s, reason %q, want done, by the balancer", m.ID, m.State, m.Reason)
		}
	}
	// Hold still for a minute.
	time.Sleep(60 * time.Second)
	ms, err := n1.client.Migrations(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if extra := len(ms) - plannedBefore; extra > 1 {
		t.Errorf("%d moves in the minute after the spread, want at most 1: %+v", extra, ms)
	}
	for _, m := range ms {
		if m.Workload == never {
			t.Fatalf("migration %s moved %s, which runs with -migrate never", m.ID, never)
		}
	}
	// Each workload runs once, with the PID the state names.
	var pids []int
	for _, w := range ws {
		got, err := workloadOn(n1, w.ID)
		if err != nil || got.State != "running" {
			t.Fatalf("workload %s: %s (%v), want running", w.ID, got.State, err)
		}
		pids = append(pids, got.PID)
	}
	slices.Sort(pids)
	if cs := sortedCopies(bin); !slices.Equal(cs, pids) {
		t.Fatalf("copies of dutyloop %v, want exactly %v", cs, pids)
	}
	out := c.ctl(n1, "balance", "status")
	t.Logf("balance status:\n%s", out)
	c.ctlJSON(n1, &st, "balance", "status")
	wants := []string{"mode aggressive", "nothing moved: "}
	if st.Leader == leader {
		wants = append(wants, "moved ")
	} else {
		// The decisions are the memory of the node that took them.
		t.Logf("the leader changed from %s to %s: its moves are not in the status", leader, st.Leader)
	}
	for _, want := range wants {
		if !strings.Contains(out, want) {
			t.Errorf("balance status says no %q:\n%s", want, out)
		}
	}
	minute := time.Since(spreadAt).Minutes()
	t.Logf("figures: %d rounds, %d moves; spread in %v; %.2f moves/min after the spread",
		st.Rounds, st.Moves, spreadAt.Sub(start).Round(time.Second), float64(len(ms)-plannedBefore)/minute)
}

// TestBalanceDev: on a -dev cluster the balancer starts off; `balance set`
// takes off, conservative or aggressive and nothing else (exit 2 from the
// CLI, 400 from the API, one line naming the field); the mode is in the
// state; `run -migrate` takes never and nothing else.
func TestBalanceDev(t *testing.T) {
	c := newTestCluster(t)
	nd := startDev(t, c, filepath.Join(c.dir, "dev.sock"), balanceFlags...)
	var st api.BalanceStatus
	c.ctlJSON(nd, &st, "balance", "status")
	if st.Mode != api.BalanceOff || st.Interval != time.Second || st.Cooldown != 20*time.Second {
		t.Fatalf("status %+v, want mode off, interval 1s, cool-down 20s", st)
	}
	if errs := c.ctlFail(nd, 2, "balance", "set", "-mode", "fast"); !strings.Contains(errs, `-mode "fast": want off, conservative or aggressive`) {
		t.Errorf("balance set -mode fast: %q", errs)
	}
	if errs := c.ctlFail(nd, 2, "balance", "set"); !strings.Contains(errs, "needs -mode") {
		t.Errorf("balance set without -mode: %q", errs)
	}
	_, err := nd.client.SetBalance(context.Background(), "fast")
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != 400 || !strings.Contains(ae.Message, `balance set: field mode: "fast"`) {
		t.Errorf("API balance set fast: %v, want 400 naming field mode", err)
	}
	if out := c.ctl(nd, "balance", "set", "-mode", "conservative"); out != "balance mode conservative\n" {
		t.Errorf("balance set -mode conservative: %q", out)
	}
	c.ctlJSON(nd, &st, "balance", "status")
	if st.Mode != api.BalanceConservative || st.Threshold != 0.20 || st.MinGain != 0.05 || st.SetAt.IsZero() {
		t.Errorf("status %+v, want conservative, threshold 0.20, min gain 0.05, set_at", st)
	}
	c.waitFor(10*time.Second, "a round", func() error {
		c.ctlJSON(nd, &st, "balance", "status")
		if k := len(st.Decisions); k == 0 || st.Decisions[k-1].Reason != "fewer than two nodes" {
			return fmt.Errorf("decisions %+v", st.Decisions)
		}
		return nil
	})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", nd.socket)
	}}}
	resp, err := hc.Get("http://pclusterd/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var rounds float64
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, "pcluster_balance_rounds_total "); ok {
			rounds, _ = strconv.ParseFloat(v, 64)
		}
	}
	if rounds < 1 || !strings.Contains(string(body), "\npcluster_balance_moves_total 0\n") {
		t.Errorf("/metrics: balance rounds %v, want ≥ 1, and moves 0", rounds)
	}
	if errs := c.ctlFail(nd, 1, "run", "-migrate", "sometimes", "--", "sleep", "600"); !strings.Contains(errs, `migrate: "sometimes": want never`) {
		t.Errorf("run -migrate sometimes: %q", errs)
	}
	var w api.Workload
	c.ctlJSON(nd, &w, "run", "-migrate", "never", "--", "sleep", "600")
	if w.Migrate != "never" {
		t.Errorf("run -migrate never: migrate %q", w.Migrate)
	}
	if out := c.ctl(nd, "status", w.ID); !strings.Contains(out, "Migrate:   never") {
		t.Errorf("status of a -migrate never workload:\n%s", out)
	}
	c.ctl(nd, "stop", w.ID)
}
