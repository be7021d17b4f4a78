package cluster

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sort"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/scheduler"
)

// leaderLoop is the one owner of membership decisions. On every node it
// bootstraps raft once -bootstrap-expect servers see each other; on the
// leader it reconciles gossip with raft and the state: voters are added and
// removed as gossip reports members, nodes become ready or down, and loads
// are recorded. It also runs the leader's planners: migration timeouts and
// drains on every tick, and the balancer every
// BalanceInterval (a Drainer keeps nothing between rounds, so a new
// leader carries on a drain from the state).
func (s *Server) leaderLoop(ctx context.Context) {
	drainer := NewDrainer(s.Applier(), s.unreachable, s.log)
	balance := time.NewTicker(s.cfg.BalanceInterval)
	defer balance.Stop()
	tick := time.NewTicker(s.cfg.Reconcile)
	defer tick.Stop()
	loads := time.NewTicker(s.cfg.LoadInterval * 2)
	defer loads.Stop()
	gc := time.NewTicker(min(max(s.cfg.WorkloadGCAfter/4, time.Second), time.Minute))
	defer gc.Stop()
	// due wakes the loop when a lost workload becomes due for failover
	// (scheduler.NextFailover): the decision comes -failover-after after
	// the loss, not up to a reconcile tick later.
	due := time.NewTimer(time.Hour)
	defer due.Stop()
	leaderCh := s.raft.LeaderCh()
	for {
		select {
		case <-ctx.Done():
			return
		case <-due.C:
		case isLeader := <-leaderCh:
			s.metrics.leaderChanges.Inc()
			s.log.Info("leadership changed", "leader", isLeader)
			if isLeader {
				// Commit a barrier so the state is current before deciding.
				if err := s.raft.Barrier(5 * time.Second).Error(); err != nil {
					s.log.Warn("leader barrier", "err", err)
				}
			}
		case <-s.events:
		case <-tick.C:
		case <-loads.C:
			if s.IsLeader() {
				s.recordLoads()
			}
		case <-gc.C:
			if s.IsLeader() {
				s.collectWorkloads(time.Now())
			}
		case <-balance.C:
			if s.IsLeader() {
				if _, err := s.balancer.Round(time.Now()); err != nil {
					s.log.Warn("balance", "err", err)
				}
			}
		}
		s.maybeBootstrap()
		if s.IsLeader() {
			if err := s.reconcile(); err != nil {
				s.log.Warn("reconcile membership", "err", err)
			}
			s.timeOutMigrations(time.Now())
			s.pruneCheckpoints()
			if s.cfg.Failover {
				now := time.Now()
				s.failover(now)
				var next time.Time
				var ok bool
				s.fsm.Read(func(st *scheduler.State) { next, ok = scheduler.NextFailover(st, now, s.cfg.FailoverAfter) })
				if ok {
					due.Reset(next.Sub(now))
				}
			}
			if _, err := drainer.Round(time.Now()); err != nil {
				s.log.Warn("drain", "err", err)
			}
		}
		s.metrics.update()
	}
}

// maybeBootstrap bootstraps raft Consul's way: when exactly
// -bootstrap-expect live members expect the same number and none of them
// has raft state yet, each bootstraps with the same server list.
func (s *Server) maybeBootstrap() {
	s.metaMu.Lock()
	booted := s.meta.Booted
	s.metaMu.Unlock()
	if booted || s.cfg.BootstrapExpect < 2 || s.raftBooted() {
		return
	}
	var servers []raft.Server
	for name, m := range s.members() {
		if !m.ok || m.meta.Booted {
			return // a cluster exists: wait to be added by its leader
		}
		if m.meta.Expect != s.cfg.BootstrapExpect {
			continue
		}
		servers = append(servers, raft.Server{ID: raft.ServerID(name), Address: raft.ServerAddress(m.meta.RaftAddr)})
	}
	if len(servers) != s.cfg.BootstrapExpect {
		return
	}
	sort.Slice(servers, func(i, j int) bool { return servers[i].ID < servers[j].ID })
	if err := s.bootstrap(servers); err != nil {
		s.log.Warn("bootstrap", "err", err)
	}
}

// voterTarget is how many voters a cluster of n live servers keeps.
func voterTarget(n int) int {
	switch {
	case n >= 5:
		return 5
	case n >= 3:
		return 3
	}
	return n
}

// reconcile runs on the leader.
func (s *Server) reconcile() error {
	live := s.members()
	if err := s.reconcileRaft(live); err != nil {
		return err
	}
	return s.reconcileNodes(live)
}

// reconcileRaft adds live members to raft (voters up to 3 or 5, then
// non-voters), replaces dead voters by live non-voters, and removes members
// that left gracefully. A dead voter without a replacement stays: removing
// it could cost the quorum it may come back to.
func (s *Server) reconcileRaft(live map[string]memberView) error {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("raft configuration: %w", err)
	}
	inConf := map[raft.ServerID]raft.Server{}
	voters, liveVoters := 0, 0
	var liveNonvoters, deadVoters []raft.ServerID
	for _, srv := range f.Configuration().Servers {
		inConf[srv.ID] = srv
		_, alive := live[string(srv.ID)]
		if srv.Suffrage == raft.Voter {
			voters++
			if alive {
				liveVoters++
			} else {
				deadVoters = append(deadVoters, srv.ID)
			}
		} else if alive {
			liveNonvoters = append(liveNonvoters, srv.ID)
		}
	}
	target := voterTarget(len(live))
	names := make([]string, 0, len(live))
	for n := range live {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		m := live[name]
		if !m.ok || m.meta.RaftAddr == "" {
			continue
		}
		id, addr := raft.ServerID(name), raft.ServerAddress(m.meta.RaftAddr)
		if srv, ok := inConf[id]; ok && srv.Address == addr {
			continue
		}
		var fut raft.IndexFuture
		if liveVoters < target {
			s.log.Info("adding raft voter", "server", name, "addr", addr)
			fut = s.raft.AddVoter(id, addr, 0, 10*time.Second)
			liveVoters++
		} else {
			s.log.Info("adding raft non-voter", "server", name, "addr", addr)
			fut = s.raft.AddNonvoter(id, addr, 0, 10*time.Second)
		}
		if err := fut.Error(); err != nil {
			return fmt.Errorf("add %s to raft: %w", name, err)
		}
	}
	// Promote live non-voters while voters are short, retiring dead voters.
	sort.Slice(liveNonvoters, func(i, j int) bool { return liveNonvoters[i] < liveNonvoters[j] })
	for _, id := range liveNonvoters {
		if liveVoters >= target {
			break
		}
		if len(deadVoters) > 0 {
			dead := deadVoters[0]
			deadVoters = deadVoters[1:]
			s.log.Info("removing dead raft voter", "server", dead)
			if err := s.raft.RemoveServer(dead, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("remove %s from raft: %w", dead, err)
			}
		}
		s.log.Info("promoting raft non-voter", "server", id)
		if err := s.raft.AddVoter(id, inConf[id].Address, 0, 10*time.Second).Error(); err != nil {
			return fmt.Errorf("promote %s: %w", id, err)
		}
		liveVoters++
	}
	// Demote extra voters (e.g. a 6th came back) to keep 3 or 5.
	if liveVoters > target && target >= 3 {
		leaderID := raft.ServerID(s.cfg.Name)
		for id, srv := range inConf {
			if liveVoters <= target {
				break
			}
			if _, alive := live[string(id)]; alive && srv.Suffrage == raft.Voter && id != leaderID {
				s.log.Info("demoting raft voter", "server", id)
				if err := s.raft.DemoteVoter(id, 0, 10*time.Second).Error(); err != nil {
					return fmt.Errorf("demote %s: %w", id, err)
				}
				liveVoters--
			}
		}
	}
	return nil
}

// reconcileNodes makes the state's node list follow gossip: live members are
// registered (and come back ready), missing ones are marked down, which
// marks their workloads lost.
func (s *Server) reconcileNodes(live map[string]memberView) error {
	type change struct {
		t   scheduler.CommandType
		cmd any
	}
	var changes []change
	now := time.Now().UnixNano()
	s.fsm.Read(func(st *scheduler.State) {
		for name, m := range live {
			if !m.ok {
				continue
			}
			n, ok := st.Nodes[name]
			if ok && n.Status != scheduler.NodeDown && n.APIAddr == m.meta.APIAddr && n.RaftAddr == m.meta.RaftAddr &&
				n.GossipAddr == m.node.Address() && maps.Equal(n.Labels, m.meta.Labels) && n.NoVIP == m.meta.NoVIP {
				continue
			}
			nd := scheduler.Node{Name: name, GossipAddr: m.node.Address(), APIAddr: m.meta.APIAddr,
				RaftAddr: m.meta.RaftAddr, Labels: m.meta.Labels, NoVIP: m.meta.NoVIP, Load: m.meta.Load, LoadAt: now}
			// Checked here, where it is proposed: the FSM applies what
			// was committed (scheduler.ValidateWorkload says why).
			if err := scheduler.ValidateNode(&nd); err != nil {
				s.log.Warn("node not registered", "node", fmt.Sprintf("%.64q", name), "err", err)
				continue
			}
			changes = append(changes, change{scheduler.CmdNodeUpsert, &scheduler.NodeUpsertCmd{Node: nd, At: now}})
		}
		for name, n := range st.Nodes {
			if _, ok := live[name]; !ok && n.Status != scheduler.NodeDown {
				s.log.Warn("node down", "down", name)
				changes = append(changes, change{scheduler.CmdNodeStatus, &scheduler.NodeStatusCmd{Name: name, Status: scheduler.NodeDown, At: now}})
			}
		}
	})
	for _, c := range changes {
		if _, err := s.apply(c.t, c.cmd); err != nil {
			return err
		}
	}
	return nil
}

// recordLoads writes the gossiped loads into the state in one entry.
func (s *Server) recordLoads() {
	loads := map[string]scheduler.Load{}
	for name, m := range s.members() {
		if m.ok {
			loads[name] = m.meta.Load
		}
	}
	if _, err := s.apply(scheduler.CmdNodeLoads, &scheduler.NodeLoadsCmd{Loads: loads, At: time.Now().UnixNano()}); err != nil {
		s.log.Debug("record loads", "err", err)
	}
}

// errNotLeader is returned by apply on a follower.
var errNotLeader = errors.New("not the leader")

// apply commits one command through raft (leader only) and returns the
// FSM's result, or its error.
func (s *Server) apply(t scheduler.CommandType, cmd any) (any, error) {
	b, err := scheduler.Encode(t, cmd)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	fut := s.raft.Apply(b, 10*time.Second)
	if err := fut.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return nil, errNotLeader
		}
		return nil, fmt.Errorf("raft apply %s: %w", t, err)
	}
	s.metrics.applyLatency.Observe(time.Since(start).Seconds())
	if t == scheduler.CmdMigrationPlan || t == scheduler.CmdMigrationStep {
		// A follower learns of a commit with the leader's next
		// AppendEntries, which without a new entry comes after raft's
		// CommitTimeout (50 ms, up to 100 with its jitter), and the
		// agents of a migration wait on their own replicas at every step
		// (planned → transferring took 0.07–0.11 s of a 1 GiB move,
		// docs/benchmarks.md). A barrier entry carries the commit index
		// at once. Its future is not waited on: the step is committed.
		s.raft.Barrier(time.Second)
	}
	res := fut.Response()
	if err, ok := res.(error); ok {
		return nil, err
	}
	return res, nil
}

// collectWorkloads removes ended workloads older than the retention, a
// batch per raft entry (the decision is scheduler.WorkloadsToCollect).
func (s *Server) collectWorkloads(now time.Time) {
	cutoff := now.Add(-s.cfg.WorkloadGCAfter).UnixNano()
	for range 10 { // at most 10 batches per tick: leave room for other writes
		var ids []string
		s.fsm.Read(func(st *scheduler.State) { ids = scheduler.WorkloadsToCollect(st, cutoff, scheduler.MaxGCBatch) })
		if len(ids) == 0 {
			return
		}
		res, err := s.apply(scheduler.CmdWorkloadGC, &scheduler.WorkloadGCCmd{IDs: ids, Before: cutoff})
		if err != nil {
			s.log.Warn("workload gc", "err", err)
			return
		}
		s.log.Info("workload gc", "removed", res, "ended_before", time.Unix(0, cutoff).UTC())
		if n, _ := res.(int); n < len(ids) {
			return // the rest changed meanwhile; next tick
		}
	}
}
