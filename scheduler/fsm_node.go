package scheduler

import (
	"fmt"
	"time"
)

func init() {
	register(CmdNodeUpsert, applyNodeUpsert)
	register(CmdNodeStatus, applyNodeStatus)
	register(CmdNodeLoads, applyNodeLoads)
	register(CmdNodeEligibility, applyNodeEligibility)
	register(CmdNodeDrain, applyNodeDrain)
	register(CmdNodeDrainDone, applyNodeDrainDone)
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
	n.NoVIP = c.Node.NoVIP
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
		nodeDownMigrations(s, idx, c.At, c.Name)
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
	if c.Eligible && n.Drain.Draining() {
		return refused("node eligibility "+c.Name, "node is draining: cancel the drain first")
	}
	n.Eligible = c.Eligible
	return *n
}

// Drain limits.
const (
	DefaultDrainDeadline = time.Hour // Nomad's default
	MaxDrainParallel     = 100
)

func applyNodeDrain(s *State, idx uint64, c *NodeDrainCmd) any {
	op := "drain " + c.Name
	n, ok := s.Nodes[c.Name]
	if !ok {
		return fmt.Errorf("%s: node: %w", op, ErrNotFound)
	}
	if c.Drain == nil {
		if !n.Drain.Draining() {
			return refused(op, "node has no drain in progress")
		}
		if !c.KeepIneligible && !n.Drain.KeepIneligible {
			n.Eligible = true
		}
		n.Drain = nil
		return *n
	}
	d := *c.Drain
	if d.MaxParallel == 0 {
		d.MaxParallel = 1
	}
	if d.MaxParallel < 1 || d.MaxParallel > MaxDrainParallel {
		return fmt.Errorf("%s: %w", op, invalid(fmt.Sprintf("max_parallel %d", d.MaxParallel), "out of range 1..%d", MaxDrainParallel))
	}
	switch {
	case d.Force:
		d.Deadline, d.NoDeadline = c.At, false
	case d.NoDeadline:
		d.Deadline = 0
	case d.Deadline <= 0:
		return fmt.Errorf("%s: %w", op, invalid("deadline", "none given: want a time, no_deadline or force"))
	}
	d.StartedAt, d.CompletedAt = c.At, 0
	if n.Drain.Draining() {
		d.StartedAt = n.Drain.StartedAt // an update of the drain in progress
	} else {
		other := false
		for _, o := range s.Nodes {
			other = other || o.Name != n.Name && o.Status == NodeReady && o.Eligible && !o.Drain.Draining()
		}
		if !other {
			return refused(op, "node is the last eligible node: no other node could take its workloads")
		}
	}
	n.Drain = &d
	n.Eligible = false
	return *n
}

func applyNodeDrainDone(s *State, idx uint64, c *NodeDrainDoneCmd) any {
	op := "drain " + c.Name + " done"
	n, ok := s.Nodes[c.Name]
	if !ok {
		return fmt.Errorf("%s: node: %w", op, ErrNotFound)
	}
	if !n.Drain.Draining() || n.Drain.StartedAt != c.StartedAt {
		return fmt.Errorf("%s: no drain started at %d in progress: %w", op, c.StartedAt, ErrStale)
	}
	if w, m := DrainRemaining(s, c.Name); w+m > 0 {
		return refused(op, "node still has %d workloads and %d migrations in flight", w, m)
	}
	n.Drain.CompletedAt = c.At
	return *n
}

// DrainRemaining counts what keeps a drain of node name from completing:
// the active workloads placed on it, and the migrations from it still in
// flight (a committed one until the target started the workload).
func DrainRemaining(s *State, name string) (workloads, migrations int) {
	for _, m := range s.Migrations {
		if m.Source == name && m.State.Active() {
			migrations++
		}
	}
	return s.ActiveOn(name), migrations
}

func applyNodeLoads(s *State, idx uint64, c *NodeLoadsCmd) any {
	for name, l := range c.Loads {
		if n, ok := s.Nodes[name]; ok {
			n.Load, n.LoadAt = l, c.At
		}
	}
	return nil
}
