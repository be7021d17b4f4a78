package cluster

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// DrainGrace is how long DrainSelf waits past the drain's deadline: the
// workloads still on the node then are being stopped (SIGTERM, then
// SIGKILL), and the drain completes once their exits are recorded.
const DrainGrace = 30 * time.Second

// DrainSelf drains this node before it shuts down (pclusterd
// -drain-on-shutdown): it records a drain of this node whose deadline is
// timeout from now, as `pclusterctl drain -deadline` would, so the leader
// moves the node's workloads off and stops those still here when the
// deadline passes, and it waits until the drain completes, at most
// timeout+DrainGrace or until ctx ends. The node stays ineligible (a
// completed drain's rule). A refused drain (this is the last eligible
// node, no leader) is returned at once: the caller shuts down anyway.
func (s *Server) DrainSelf(ctx context.Context, timeout time.Duration) error {
	name := s.cfg.Name
	req := api.DrainRequest{Deadline: timeout}
	started, err := s.requestDrain(ctx, name, req)
	if err != nil {
		return fmt.Errorf("drain on shutdown: %w", err)
	}
	s.log.Info("draining this node before shutting down", "deadline", timeout)
	ctx, cancel := context.WithTimeout(ctx, timeout+DrainGrace)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	seen := false // this node's replica has applied the drain
	for {
		var d *scheduler.DrainSpec
		s.fsm.Read(func(st *scheduler.State) {
			if n, ok := st.Nodes[name]; ok && n.Drain != nil {
				c := *n.Drain
				d = &c
			}
		})
		mine := d != nil && d.StartedAt == started
		seen = seen || mine
		switch {
		case seen && !mine:
			return errors.New("drain on shutdown: the drain was cancelled or replaced")
		case mine && d.CompletedAt != 0:
			s.log.Info("drained before shutting down", "took", time.Duration(d.CompletedAt-d.StartedAt))
			return nil
		}
		select {
		case <-ctx.Done():
			var left int
			s.fsm.Read(func(st *scheduler.State) { left = st.ActiveOn(name) })
			return fmt.Errorf("drain on shutdown: not complete, %d workloads still on the node: %w", left, ctx.Err())
		case <-tick.C:
		}
	}
}

// requestDrain applies a drain request for node name on the leader:
// directly when this node leads, else through the leader's API. It returns
// the drain's start as the state records it (unix nanoseconds), which names
// the drain.
func (s *Server) requestDrain(ctx context.Context, name string, req api.DrainRequest) (int64, error) {
	if s.IsLeader() {
		cmd, err := drainCommand(name, req, time.Now())
		if err != nil {
			return 0, err
		}
		res, err := s.apply(scheduler.CmdNodeDrain, cmd)
		if err != nil {
			return 0, err
		}
		(&events{s}).poke()
		n, ok := res.(scheduler.Node)
		if !ok || n.Drain == nil {
			return 0, fmt.Errorf("node %s: the state answered %T, not the drained node", name, res)
		}
		return n.Drain.StartedAt, nil
	}
	addr, err := s.leaderAPI()
	if err != nil {
		return 0, err
	}
	n, err := api.NewWithHTTP(addr, s.peerHTTP).Drain(ctx, name, req)
	if err != nil {
		return 0, err
	}
	if n.Drain == nil {
		return 0, fmt.Errorf("node %s: the leader answered no drain", name)
	}
	return n.Drain.StartedAt.UnixNano(), nil
}
