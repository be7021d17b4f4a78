package cluster_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// balanceFixture: nodes n1, n2 (2 CPUs), workloads w1..w4 running on n1
// using 300 milli-cores each, as n1's gossip reports, mode aggressive.
func balanceFixture(tb testing.TB) *fsmApplier {
	a := &fsmApplier{f: scheduler.NewFSM()}
	for _, n := range []string{"n1", "n2"} {
		a.must(tb, scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: scheduler.Node{Name: n}, At: 1})
	}
	use := map[string]scheduler.Use{}
	for i := 1; i <= 4; i++ {
		id := fmt.Sprintf("w%d", i)
		a.must(tb, scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: scheduler.Workload{ID: id, Command: "x",
			UID: -1, GID: -1, DesiredNode: "n1", CreatedAt: int64(i)}})
		a.must(tb, scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: id, Node: "n1", Attempt: 1, PID: 100 + i, At: 2})
		use[id] = scheduler.Use{CPU: 300, RSS: 1 << 20}
	}
	a.must(tb, scheduler.CmdNodeLoads, &scheduler.NodeLoadsCmd{At: 3, Loads: map[string]scheduler.Load{
		"n1": {NumCPU: 2, MemFree: 1 << 30, WCPU: 1200, WRSS: 4 << 20, Use: use},
		"n2": {NumCPU: 2, MemFree: 1 << 30},
	}})
	a.must(tb, scheduler.CmdBalanceSet, &scheduler.BalanceSetCmd{Mode: scheduler.BalanceAggressive, At: 4})
	return a
}

// TestBalancerRound: a round plans the move PlanBalance chooses through
// the applier and records it; rounds that move nothing make one entry
// with the latest reason; a plan the state refuses meanwhile is recorded
// as refused; raft failing ends the round with its error.
func TestBalancerRound(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	a := balanceFixture(t)
	b := cluster.NewBalancer(a, nil, scheduler.BalanceParams{Cooldown: time.Minute}, nil)
	moved, err := b.Round(now)
	if err != nil || len(moved) != 1 || moved[0].Workload != "w1" || moved[0].Target != "n2" {
		t.Fatalf("round 1: moved %+v, %v; want w1 to n2", moved, err)
	}
	a.Read(func(s *scheduler.State) {
		m := s.ActiveMigration("w1")
		if m == nil || m.Target != "n2" || !strings.HasPrefix(m.Reason, "balance (aggressive): node n1 0.60 → n2 0.00") {
			t.Fatalf("w1's migration %+v, want planned to n2 by the balancer", m)
		}
	})
	for range 2 {
		if moved, err := b.Round(now.Add(time.Second)); err != nil || len(moved) != 0 {
			t.Fatalf("round with a migration in flight: moved %+v, %v; want nothing", moved, err)
		}
	}
	var st api.BalanceStatus
	b.Status(&st)
	if st.Rounds != 3 || st.Moves != 1 || len(st.Decisions) != 2 {
		t.Fatalf("status %+v, want 3 rounds, 1 move, 2 decisions", st)
	}
	if d := st.Decisions[0]; d.Kind != api.BalanceMoved || d.Workload != "w1" || d.Migration == "" {
		t.Errorf("decision 0 %+v, want w1 moved with its migration", d)
	}
	if d := st.Decisions[1]; d.Kind != api.BalanceHeld || d.Rounds != 2 || !strings.Contains(d.Reason, "busiest node n1 (0.60): migration m") {
		t.Errorf("decision 1 %+v, want held for 2 rounds: n1's migration in flight", d)
	}
	if len(st.Nodes) != 2 || st.Nodes[0].Name != "n1" || st.Nodes[0].CPUMilli != 1200 || st.Nodes[0].MovableMilli != 1200 {
		t.Errorf("nodes %+v, want n1 first with 1200m, all movable", st.Nodes)
	}

	// Refused: the workload is stopped between the plan and the apply.
	a = balanceFixture(t)
	a.before = func(ct scheduler.CommandType) {
		if ct == scheduler.CmdMigrationPlan {
			a.before = nil
			a.must(t, scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: "w1", At: 5})
		}
	}
	b = cluster.NewBalancer(a, nil, scheduler.BalanceParams{}, nil)
	if moved, err := b.Round(now); err != nil || len(moved) != 0 {
		t.Fatalf("refused round: moved %+v, %v; want nothing, no error", moved, err)
	}
	st = api.BalanceStatus{}
	b.Status(&st)
	if len(st.Decisions) != 1 || st.Decisions[0].Kind != api.BalanceRefused || !strings.Contains(st.Decisions[0].Reason, "being stopped") {
		t.Errorf("decisions %+v, want one refused: being stopped", st.Decisions)
	}

	// Raft failing.
	a = balanceFixture(t)
	a.fail = errors.New("no quorum")
	b = cluster.NewBalancer(a, nil, scheduler.BalanceParams{}, nil)
	if _, err := b.Round(now); err == nil || !strings.Contains(err.Error(), "no quorum") {
		t.Fatalf("round with raft failing: %v, want no quorum", err)
	}
}
