package scheduler

import (
	"fmt"

	"github.com/pcluster/pcluster/netrehome"
)

// PlacementRequest says what a new workload needs from its node.
type PlacementRequest struct {
	Node        string            // if set, only this node
	Constraints map[string]string // node labels that must match exactly
	Resources   Resources
	// Exclude holds nodes the caller knows cannot take work right now
	// although the state still calls them ready (a crash gossip has not
	// declared yet), each with the reason.
	Exclude map[string]string
	// Extra counts workloads already headed to a node that the state does
	// not show yet (a planner's earlier picks in the same round).
	Extra map[string]int
	// VIP: the workload has a virtual IP, which only nodes able to add
	// addresses and send ARP can carry (Node.NoVIP).
	VIP bool
}

// SameVIP reports whether two workloads' VIPs name the same address
// ("198.18.0.50/24" and "198.18.0.50" do).
func SameVIP(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	pa, erra := netrehome.Parse(a)
	pb, errb := netrehome.Parse(b)
	if erra != nil || errb != nil {
		return a == b
	}
	return pa.Addr() == pb.Addr()
}

// Place picks the node for a new workload: among ready, eligible, not draining nodes that
// meet the constraints and the memory hint and are not excluded, the one with the most free
// capacity. Free capacity is the mean of the idle CPU share (1 − load1/CPUs)
// and the free memory share from the node's last recorded load, less 0.01
// per active workload the state assigns to it (so workloads placed since the
// last load report count). Ties go to the lowest name, so the result depends
// on the state alone.
func Place(s *State, req PlacementRequest) (string, error) {
	if req.Node != "" {
		n, ok := s.Nodes[req.Node]
		if !ok {
			return "", fmt.Errorf("place on %s: %w", req.Node, ErrNotFound)
		}
		if why := unfit(n, req); why != "" {
			return "", fmt.Errorf("place on %s: %s: %w", req.Node, why, ErrNoNode)
		}
		return n.Name, nil
	}
	active := make(map[string]int, len(s.Nodes))
	for _, w := range s.Workloads {
		if w.State.Active() {
			active[w.DesiredNode]++
		}
	}
	for _, m := range s.Migrations {
		if m.State == MigrationPlanned || m.State == MigrationTransferring {
			active[m.Target]++ // on its way there
		}
	}
	for n, k := range req.Extra {
		active[n] += k
	}
	best, bestScore := "", 0.0
	noVIP, noVIPNode := "", "" // the first node that would do but for the VIP, and why
	for _, n := range s.Nodes {
		if why := unfit(n, req); why != "" {
			if req.VIP && n.NoVIP != "" && unfit(n, PlacementRequest{Constraints: req.Constraints, Resources: req.Resources, Exclude: req.Exclude}) == "" &&
				(noVIPNode == "" || n.Name < noVIPNode) {
				noVIP, noVIPNode = n.Name+": "+why, n.Name
			}
			continue
		}
		sc := score(n, active[n.Name])
		if best == "" || sc > bestScore || (sc == bestScore && n.Name < best) {
			best, bestScore = n.Name, sc
		}
	}
	if best == "" && noVIP != "" {
		return "", fmt.Errorf("place among %d nodes: none can carry virtual IPs (%s): %w", len(s.Nodes), noVIP, ErrNoNode)
	}
	if best == "" {
		return "", fmt.Errorf("place among %d nodes: %w", len(s.Nodes), ErrNoNode)
	}
	return best, nil
}

// unfit says why n cannot take the workload, or "" when it can.
func unfit(n *Node, req PlacementRequest) string {
	if n.Status != NodeReady {
		return "node is " + string(n.Status)
	}
	if !n.Eligible {
		return "node is not eligible"
	}
	if n.Drain.Draining() {
		return "node is draining"
	}
	if why, ok := req.Exclude[n.Name]; ok {
		return "node " + why
	}
	if req.VIP && n.NoVIP != "" {
		return "cannot carry virtual IPs: pclusterd " + n.NoVIP
	}
	for k, v := range req.Constraints {
		if got, ok := n.Labels[k]; !ok || got != v {
			return fmt.Sprintf("label %s=%s not met", k, v)
		}
	}
	if mb := req.Resources.MemoryMB; mb > 0 && n.LoadAt != 0 && n.Load.MemFree < mb<<20 {
		return fmt.Sprintf("%d MB free, %d MB asked", n.Load.MemFree>>20, mb)
	}
	return ""
}

func score(n *Node, active int) float64 {
	cpuFree, memFree := 0.5, 0.5 // unknown load: middling
	if n.LoadAt != 0 {
		cpus := float64(max(n.Load.NumCPU, 1))
		cpuFree = 1 - min(max(n.Load.CPULoad1/cpus, 0), 1)
		if total := n.Load.MemFree + n.Load.MemUsed; total > 0 {
			memFree = float64(n.Load.MemFree) / float64(total)
		}
	}
	return (cpuFree+memFree)/2 - 0.01*float64(active)
}
