package scheduler

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func node(name string, load1 float64, memFree uint64, labels map[string]string) *Node {
	return &Node{Name: name, Status: NodeReady, Eligible: true, Labels: labels, LoadAt: 1,
		Load: Load{CPULoad1: load1, NumCPU: 2, MemFree: memFree << 30, MemUsed: (8 - memFree) << 30}}
}

func TestPlace(t *testing.T) {
	down := node("d", 0, 8, nil)
	down.Status = NodeDown
	inel := node("i", 0, 8, nil)
	inel.Eligible = false
	drain := node("r", 0, 8, nil)
	drain.Status = NodeDraining
	noCap := node("c", 0, 8, nil)
	noCap.NoVIP = "lacks CAP_NET_RAW"
	tests := []struct {
		name    string
		nodes   []*Node
		busy    map[string]int // active workloads per node
		req     PlacementRequest
		want    string
		wantErr error
	}{
		{"most free cpu", []*Node{node("a", 1.8, 4, nil), node("b", 0.2, 4, nil)}, nil, PlacementRequest{}, "b", nil},
		{"most free memory", []*Node{node("a", 1, 1, nil), node("b", 1, 6, nil)}, nil, PlacementRequest{}, "b", nil},
		{"tie goes to lowest name", []*Node{node("b", 1, 4, nil), node("a", 1, 4, nil)}, nil, PlacementRequest{}, "a", nil},
		{"workloads count", []*Node{node("a", 1, 4, nil), node("b", 1, 4, nil)}, map[string]int{"a": 2}, PlacementRequest{}, "b", nil},
		{"skips down, ineligible, draining", []*Node{down, inel, drain, node("z", 2, 1, nil)}, nil, PlacementRequest{}, "z", nil},
		{"constraint", []*Node{node("a", 0, 8, map[string]string{"zone": "x"}), node("b", 2, 1, map[string]string{"zone": "y"})}, nil,
			PlacementRequest{Constraints: map[string]string{"zone": "y"}}, "b", nil},
		{"constraint unmet", []*Node{node("a", 0, 8, nil)}, nil, PlacementRequest{Constraints: map[string]string{"gpu": "1"}}, "", ErrNoNode},
		{"memory hint", []*Node{node("a", 0, 1, nil), node("b", 2, 2, nil)}, nil, PlacementRequest{Resources: Resources{MemoryMB: 1500}}, "b", nil},
		{"pinned", []*Node{node("a", 0, 8, nil), node("b", 2, 1, nil)}, nil, PlacementRequest{Node: "b"}, "b", nil},
		{"pinned down", []*Node{down}, nil, PlacementRequest{Node: "d"}, "", ErrNoNode},
		{"excluded", []*Node{node("a", 0, 8, nil), node("b", 2, 1, nil)}, nil,
			PlacementRequest{Exclude: map[string]string{"a": "not answering"}}, "b", nil},
		{"pinned excluded", []*Node{node("a", 0, 8, nil)}, nil, PlacementRequest{Node: "a", Exclude: map[string]string{"a": "not answering"}}, "", ErrNoNode},
		{"pinned unknown", []*Node{node("a", 0, 8, nil)}, nil, PlacementRequest{Node: "q"}, "", ErrNotFound},
		{"no nodes", nil, nil, PlacementRequest{}, "", ErrNoNode},
		{"vip skips a node without the capabilities", []*Node{noCap, node("z", 2, 1, nil)}, nil, PlacementRequest{VIP: true}, "z", nil},
		{"no vip: any node", []*Node{noCap, node("z", 2, 1, nil)}, nil, PlacementRequest{}, "c", nil},
		{"vip, none capable", []*Node{noCap}, nil, PlacementRequest{VIP: true}, "", ErrNoNode},
		{"vip pinned to an incapable node", []*Node{noCap}, nil, PlacementRequest{VIP: true, Node: "c"}, "", ErrNoNode},
	}
	for _, tc := range tests {
		s := NewState()
		for _, n := range tc.nodes {
			s.Nodes[n.Name] = n
		}
		for n, k := range tc.busy {
			for i := 0; i < k; i++ {
				id := fmt.Sprintf("%s-%d", n, i)
				s.Workloads[id] = &Workload{ID: id, DesiredNode: n, State: StateRunning}
			}
		}
		got, err := Place(s, tc.req)
		if !errors.Is(err, tc.wantErr) || got != tc.want {
			t.Errorf("%s: got %q, %v; want %q, %v", tc.name, got, err, tc.want, tc.wantErr)
		}
		// Same state, same answer.
		if again, _ := Place(s, tc.req); again != got {
			t.Errorf("%s: not deterministic: %q then %q", tc.name, got, again)
		}
	}
}

// TestPlaceVIPReason: a VIP workload no node can carry is refused with
// the reason, in one line.
func TestPlaceVIPReason(t *testing.T) {
	s := NewState()
	for _, name := range []string{"b", "a"} {
		n := node(name, 0, 8, nil)
		n.NoVIP = "lacks CAP_NET_ADMIN"
		s.Nodes[name] = n
	}
	for _, req := range []PlacementRequest{{VIP: true}, {VIP: true, Node: "b"}} {
		_, err := Place(s, req)
		if err == nil || !strings.Contains(err.Error(), "cannot carry virtual IPs: pclusterd lacks CAP_NET_ADMIN") || strings.Contains(err.Error(), "\n") {
			t.Errorf("place %+v: %v, want one line naming the missing capability", req, err)
		}
	}
}

func TestSameVIP(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"198.18.0.50/24", "198.18.0.50", true},
		{"198.18.0.50/24", "198.18.0.50/16", true},
		{"198.18.0.50", "198.18.0.51", false},
		{"", "", false},
		{"198.18.0.50", "", false},
	} {
		if got := SameVIP(tc.a, tc.b); got != tc.want {
			t.Errorf("SameVIP(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

// BenchmarkPlace1000x10000 times one placement decision over 1,000 nodes
// holding 10,000 workloads (target ≤ 50 ms).
func BenchmarkPlace1000x10000(b *testing.B) {
	s := NewState()
	for i := 0; i < 1000; i++ {
		n := node(fmt.Sprintf("node-%04d", i), float64(i%7)/3, uint64(1+i%7), map[string]string{"zone": fmt.Sprint(i % 3)})
		s.Nodes[n.Name] = n
	}
	for i := 0; i < 10000; i++ {
		id := fmt.Sprintf("w-%05d", i)
		s.Workloads[id] = &Workload{ID: id, DesiredNode: fmt.Sprintf("node-%04d", i%1000), State: StateRunning}
	}
	req := PlacementRequest{Constraints: map[string]string{"zone": "1"}, Resources: Resources{MemoryMB: 512}}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := Place(s, req); err != nil {
			b.Fatal(err)
		}
	}
}
