package scheduler

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/vmihailenco/msgpack/v5"
)

// balanceState builds a state of ready, eligible 2-CPU nodes and running
// workloads: on maps a node to its workloads' CPU use in milli-cores, each
// workload named NODE-i.
func balanceState(mode string, on map[string][]uint32, nodes ...string) *State {
	s := NewState()
	s.Balance.Mode = mode
	for _, name := range nodes {
		s.Nodes[name] = &Node{Name: name, Status: NodeReady, Eligible: true, LoadAt: 1,
			Load: Load{NumCPU: 2, MemFree: 1 << 30, Use: map[string]Use{}}}
	}
	created := int64(0)
	for _, name := range nodes {
		for i, cpu := range on[name] {
			id := name + "-" + string(rune('0'+i))
			created++
			s.Workloads[id] = &Workload{ID: id, State: StateRunning, Desired: DesiredRunning, Node: name, DesiredNode: name,
				Attempt: 1, PID: 100 + int(created), CreatedAt: created}
			n := s.Nodes[name]
			n.Load.Use[id] = Use{CPU: cpu, RSS: 1 << 20}
			n.Load.WCPU += cpu
			n.Load.WRSS += 1 << 20
		}
	}
	return s
}

func moves(p BalancePlan) []string {
	var out []string
	for _, m := range p.Moves {
		out = append(out, m.Workload+":"+m.Source+">"+m.Target)
	}
	return out
}

func TestPlanBalance(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	params := BalanceParams{Cooldown: 5 * time.Minute}
	four := map[string][]uint32{"a": {300, 300, 300, 300}}
	tests := []struct {
		name    string
		state   func() *State
		now     time.Time
		exclude map[string]string
		want    []string
		why     string // a part of Why when nothing moves
	}{
		{name: "off moves nothing", state: func() *State { return balanceState(BalanceOff, four, "a", "b", "c") },
			why: "mode off"},
		{name: "unset mode is off", state: func() *State { return balanceState("", four, "a", "b", "c") },
			why: "mode off"},
		{name: "busiest to least busy, one move per node",
			state: func() *State { return balanceState(BalanceConservative, four, "a", "b", "c") },
			want:  []string{"a-0:a>b"}},
		{name: "second step goes to the idle node",
			state: func() *State {
				return balanceState(BalanceConservative, map[string][]uint32{"a": {300, 300, 300}, "b": {300}}, "a", "b", "c")
			},
			want: []string{"a-0:a>c"}},
		{name: "spread 2-1-1 holds still",
			state: func() *State {
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {300, 300}, "b": {300}, "c": {300}}, "a", "b", "c")
			},
			why: "node a (0.30): no workload it may move (2 too big for any target)"},
		{name: "noise moves nothing",
			state: func() *State {
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {330, 310}, "b": {250}, "c": {280}}, "a", "b", "c")
			},
			why: "node a (0.32): no workload it may move (2 too big"},
		{name: "within the threshold: conservative holds (hysteresis)",
			state: func() *State {
				return balanceState(BalanceConservative, map[string][]uint32{"a": {300, 300, 60}, "b": {300}}, "a", "b")
			},
			why: "node a (0.33) and the least busy b (0.15) differ by 0.18 < 0.20 (conservative)"},
		{name: "beyond the threshold: aggressive moves what fits",
			state: func() *State {
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {300, 300, 60}, "b": {300}}, "a", "b")
			},
			want: []string{"a-2:a>b"}},
		{name: "a move that gains too little stays",
			state: func() *State {
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {300, 300, 40}, "b": {300}}, "a", "b")
			},
			why: "best move a-2 to b (0.15) gains 0.02 <"},
		{name: "a tie after the move is not the busiest",
			state: func() *State {
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {160, 160}}, "a", "b")
			},
			want: []string{"a-0:a>b"}},
		{name: "the same imbalance is within the conservative threshold",
			state: func() *State {
				return balanceState(BalanceConservative, map[string][]uint32{"a": {160, 160}}, "a", "b")
			},
			why: "differ by 0.16 < 0.20"},
		{name: "a move the next would undo stays",
			state: func() *State {
				// 0.45 vs 0: moving 0.35 leaves b 0.25 above a.
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {700, 200}, "c": {700}}, "a", "b", "c")
			},
			want: []string{"a-1:a>b"}},
		{name: "never onto a node that would then be the busiest",
			state: func() *State {
				return balanceState(BalanceAggressive, map[string][]uint32{"a": {800}, "c": {200}}, "a", "b", "c")
			},
			why: "1 too big for any target"},
		{name: "-migrate never stays",
			state: func() *State {
				s := balanceState(BalanceAggressive, four, "a", "b", "c")
				for _, w := range s.Workloads {
					w.Migrate = MigrateNever
				}
				return s
			},
			why: "no workload it may move (4 -migrate never)"},
		{name: "-migrate never counts in the load, the others move",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Workloads["a-0"].Migrate = MigrateNever
				return s
			},
			want: []string{"a-1:a>b"}},
		{name: "cool-down keeps a moved workload",
			state: func() *State {
				s := balanceState(BalanceConservative, map[string][]uint32{"a": {300, 300}}, "a", "b")
				for i, id := range []string{"a-0", "a-1"} {
					s.Migrations[id] = &Migration{ID: "m" + id, WorkloadID: id, Source: "b", Target: "a", State: MigrationDone,
						PlannedAt: now.Add(-time.Duration(i+1) * time.Minute).UnixNano()}
				}
				return s
			},
			why: "(2 in cool-down)"},
		{name: "cool-down over",
			state: func() *State {
				s := balanceState(BalanceConservative, map[string][]uint32{"a": {300, 300}}, "a", "b")
				s.Migrations["m1"] = &Migration{ID: "m1", WorkloadID: "a-0", Source: "b", Target: "a", State: MigrationDone,
					PlannedAt: now.Add(-6 * time.Minute).UnixNano()}
				s.Migrations["m2"] = &Migration{ID: "m2", WorkloadID: "a-1", Source: "b", Target: "a", State: MigrationDone,
					PlannedAt: now.Add(-time.Minute).UnixNano()}
				return s
			},
			want: []string{"a-0:a>b"}},
		{name: "one move per node at a time",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Migrations["m1"] = &Migration{ID: "m1", WorkloadID: "x", Source: "a", Target: "b", State: MigrationTransferring,
					PlannedAt: now.UnixNano()}
				return s
			},
			why: "busiest node a (0.60): migration m1 in flight"},
		{name: "a busy target is skipped",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c", "d")
				s.Migrations["m1"] = &Migration{ID: "m1", WorkloadID: "x", Source: "d", Target: "b", State: MigrationPlanned,
					PlannedAt: now.UnixNano()}
				return s
			},
			want: []string{"a-0:a>c"}},
		{name: "two sources, two targets, one round",
			state: func() *State {
				return balanceState(BalanceConservative, map[string][]uint32{"a": {300, 300, 300, 300}, "b": {300, 300, 300, 300}},
					"a", "b", "c", "d")
			},
			want: []string{"a-0:a>c", "b-0:b>d"}},
		{name: "draining source stays (its drain moves it)",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Nodes["a"].Drain = &DrainSpec{StartedAt: 1}
				return s
			},
			why: "busiest node a (0.60): node is draining"},
		{name: "never to ineligible or draining nodes",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Nodes["b"].Eligible = false
				s.Nodes["c"].Drain = &DrainSpec{StartedAt: 1}
				return s
			},
			why: "no other node may take work now"},
		{name: "never to an excluded node",
			state:   func() *State { return balanceState(BalanceConservative, four, "a", "b", "c") },
			exclude: map[string]string{"b": "unreachable"},
			want:    []string{"a-0:a>c"}},
		{name: "never to a down node",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b")
				s.Nodes["b"].Status = NodeDown
				return s
			},
			why: "fewer than two nodes"},
		{name: "waits for a workload not measured yet",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Workloads["new"] = &Workload{ID: "new", State: StateRunning, Desired: DesiredRunning, Node: "b", DesiredNode: "b",
					PID: 7, CreatedAt: 99, StartedAt: now.Add(-5 * time.Second).UnixNano()}
				return s
			},
			why: "waiting for the use of workload new on b"},
		{name: "waits for a workload that just moved",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Workloads["new"] = &Workload{ID: "new", State: StateRunning, Desired: DesiredRunning, Node: "b", DesiredNode: "b",
					PID: 7, CreatedAt: 99, StartedAt: now.Add(-time.Hour).UnixNano()}
				s.Migrations["m9"] = &Migration{ID: "m9", WorkloadID: "new", Source: "c", Target: "b", State: MigrationDone,
					PlannedAt: now.Add(-time.Hour).UnixNano(), EndedAt: now.Add(-time.Second).UnixNano()}
				return s
			},
			why: "waiting for the use of workload new on b"},
		{name: "a workload unmeasured for long holds nothing up",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Workloads["old"] = &Workload{ID: "old", State: StateRunning, Desired: DesiredRunning, Node: "c", DesiredNode: "c",
					PID: 7, CreatedAt: 99, StartedAt: now.Add(-time.Minute).UnixNano()}
				return s
			},
			want: []string{"a-0:a>b"}},
		{name: "a moved workload counts where the state places it",
			state: func() *State {
				// a-0 reported by a, but the state has it on b already.
				s := balanceState(BalanceConservative, four, "a", "b", "c")
				s.Workloads["a-0"].Node, s.Workloads["a-0"].DesiredNode = "b", "b"
				return s
			},
			want: []string{"a-1:a>c"}},
		{name: "memory hint keeps off a full node",
			state: func() *State {
				s := balanceState(BalanceConservative, four, "a", "b")
				s.Nodes["b"].Load.MemFree = 1 << 10
				return s
			},
			why: "node a (0.60): no workload it may move"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			at := tc.now
			if at.IsZero() {
				at = now
			}
			s := tc.state()
			p := PlanBalance(s, at, params, tc.exclude)
			if got := strings.Join(moves(p), " "); got != strings.Join(tc.want, " ") {
				t.Fatalf("moves %q, want %q (why: %s)", got, strings.Join(tc.want, " "), p.Why)
			}
			if live := len(s.Nodes); len(p.Nodes) == 0 && live > 0 {
				t.Fatalf("plan lists no nodes, the state has %d", live)
			}
			if len(p.Commands) != len(p.Moves) {
				t.Fatalf("%d commands for %d moves", len(p.Commands), len(p.Moves))
			}
			if tc.why != "" && !strings.Contains(p.Why, tc.why) {
				t.Fatalf("why %q, want it to say %q", p.Why, tc.why)
			}
			// Every planned command must pass the FSM's own rules.
			f := NewFSM()
			f.state = s
			for i, c := range p.Commands {
				if _, err := mustApply(f, uint64(100+i), c); err != nil {
					t.Fatalf("apply %s: %v", c.Type, err)
				}
			}
		})
	}
}

func TestBalanceSetCommand(t *testing.T) {
	f := NewFSM()
	if _, err := mustApply(f, 1, Command{CmdBalanceSet, &BalanceSetCmd{Mode: BalanceAggressive, At: 5}}); err != nil {
		t.Fatal(err)
	}
	f.Read(func(s *State) {
		if s.Balance.Mode != BalanceAggressive || s.Balance.SetAt != 5 {
			t.Fatalf("balance %+v, want aggressive at 5", s.Balance)
		}
	})
	if _, err := mustApply(f, 2, Command{CmdBalanceSet, &BalanceSetCmd{Mode: "fast"}}); err == nil {
		t.Fatal("mode fast applied, want a refusal")
	}
	f.Read(func(s *State) {
		if s.Balance.Mode != BalanceAggressive {
			t.Fatalf("mode %q after a refused set, want aggressive", s.Balance.Mode)
		}
	})
	// The mode survives a snapshot.
	snap, err := f.Copy()
	if err != nil {
		t.Fatal(err)
	}
	if snap.Balance.Mode != BalanceAggressive {
		t.Fatalf("copied mode %q, want aggressive", snap.Balance.Mode)
	}
}

// mustApply encodes c and applies it at index idx; the FSM's refusal is
// the error.
func mustApply(f *FSM, idx uint64, c Command) (any, error) {
	b, err := Encode(c.Type, c.Payload)
	if err != nil {
		return nil, err
	}
	res := f.Apply(&raft.Log{Index: idx, Type: raft.LogCommand, Data: b})
	if err, ok := res.(error); ok {
		return nil, err
	}
	return res, nil
}

// BenchmarkPlanBalance1000x10000: one balancer round over 1,000 nodes and
// 10,000 running workloads, the busiest nodes holding twice the average.
func BenchmarkPlanBalance1000x10000(b *testing.B) {
	s := NewState()
	s.Balance.Mode = BalanceConservative
	for i := range 1000 {
		name := fmt.Sprintf("n%04d", i)
		s.Nodes[name] = &Node{Name: name, Status: NodeReady, Eligible: true, LoadAt: 1,
			Load: Load{NumCPU: 8, MemFree: 1 << 34, Use: map[string]Use{}}}
	}
	for i := range 10000 {
		node := fmt.Sprintf("n%04d", (i*7)%1000)
		if i%10 == 0 {
			node = fmt.Sprintf("n%04d", i%50) // 50 busy nodes
		}
		id := fmt.Sprintf("w%05d", i)
		s.Workloads[id] = &Workload{ID: id, State: StateRunning, Desired: DesiredRunning, Node: node, DesiredNode: node,
			PID: 100 + i, CreatedAt: int64(i)}
		n := s.Nodes[node]
		u := Use{CPU: uint32(100 + i%700), RSS: 1 << 20}
		n.Load.Use[id] = u
		n.Load.WCPU += u.CPU
	}
	now := time.Unix(1_000_000, 0)
	b.ResetTimer()
	var p BalancePlan
	for range b.N {
		p = PlanBalance(s, now, BalanceParams{Cooldown: time.Minute}, nil)
	}
	b.ReportMetric(float64(len(p.Moves)), "moves")
}

// TestUseEncoding: a workload's use is a two-element array on the wire
// (the gossip metadata is 512 bytes), and decodes back.
func TestUseEncoding(t *testing.T) {
	b, err := msgpack.Marshal(Use{CPU: 300, RSS: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > 9 || b[0] != 0x92 {
		t.Fatalf("encoded %x (%d bytes), want a 2-element array of at most 9 bytes (1+3+5)", b, len(b))
	}
	var u Use
	if err := msgpack.Unmarshal(b, &u); err != nil || u.CPU != 300 || u.RSS != 1<<20 {
		t.Fatalf("decoded %+v, %v", u, err)
	}
}
