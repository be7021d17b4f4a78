package scheduler

import "fmt"

func init() {
	register(CmdNodeUpsert, applyNodeUpsert)
	register(CmdNodeStatus, applyNodeStatus)
	register(CmdNodeLoads, applyNodeLoads)
	register(CmdNodeEligibility, applyNodeEligibility)
}

func applyNodeUpsert(s *State, idx uint64, c *NodeUpsertCmd) any {
	if c.Node.Name == "" {
		return fmt.Errorf("node upsert: empty name")
	}
	n, ok := s.Nodes[c.Node.Name]
	if !ok {
		n = &Node{Name: c.Node.Name, Status: NodeReady, Eligible: true, StatusAt: c.At}
		s.Nodes[n.Name] = n
	}
	n.GossipAddr, n.RaftAddr, n.APIAddr = c.Node.GossipAddr, c.Node.RaftAddr, c.Node.APIAddr
	n.Labels = c.Node.Labels
	if c.Node.LoadAt != 0 {
		n.Load, n.LoadAt = c.Node.Load, c.Node.LoadAt
	}
	if n.Status == NodeDown {
		n.Status, n.StatusAt = NodeReady, c.At
	}
	return *n
}

func applyNodeStatus(s *State, idx uint64, c *NodeStatusCmd) any {
	n, ok := s.Nodes[c.Name]
	if !ok {
		return fmt.Errorf("node status %s: %w", c.Name, ErrNotFound)
	}
	switch c.Status {
	case NodeReady, NodeDraining, NodeDown:
	default:
		return fmt.Errorf("node status %s: unknown status %q", c.Name, c.Status)
	}
	if n.Status != c.Status {
		n.Status, n.StatusAt = c.Status, c.At
	}
	if c.Status == NodeDown {
		for _, w := range s.Workloads {
			if !w.State.Active() {
				continue
			}
			if w.Node == c.Name || (w.State == StatePending && w.DesiredNode == c.Name) {
				w.State = StateLost
				w.LostAt = c.At
				w.Message = fmt.Sprintf("node %s down", c.Name)
				w.ModifyIndex = idx
			}
		}
	}
	return *n
}

func applyNodeEligibility(s *State, idx uint64, c *NodeEligibilityCmd) any {
	n, ok := s.Nodes[c.Name]
	if !ok {
		return fmt.Errorf("node eligibility %s: %w", c.Name, ErrNotFound)
	}
	n.Eligible = c.Eligible
	return *n
}

func applyNodeLoads(s *State, idx uint64, c *NodeLoadsCmd) any {
	for name, l := range c.Loads {
		if n, ok := s.Nodes[name]; ok {
			n.Load, n.LoadAt = l, c.At
		}
	}
	return nil
}
