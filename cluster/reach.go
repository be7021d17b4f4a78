package cluster

import (
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/scheduler"
)

// reach tracks which raft peers the leader currently fails to heartbeat.
// A crashed node stays "ready" in the state until gossip declares it dead
// (seconds); raft notices at its next heartbeat (~100 ms), so placement
// asks here first. A failure counts for failWindow: raft retries a dead
// peer at least that often (its backoff is capped at half the heartbeat
// timeout, its dial timeout is 10 s), and it reports no recovery when the
// peer's replication was stopped meanwhile (removed and added again).
type reach struct {
	mu      sync.Mutex
	failing map[string]time.Time // last failed heartbeat
}

const failWindow = 15 * time.Second

// watch consumes raft's heartbeat observations until ch closes.
func (r *reach) watch(ch <-chan raft.Observation) {
	for o := range ch {
		r.mu.Lock()
		switch d := o.Data.(type) {
		case raft.FailedHeartbeatObservation:
			r.failing[string(d.PeerID)] = time.Now()
		case raft.ResumedHeartbeatObservation:
			delete(r.failing, string(d.PeerID))
		case raft.LeaderObservation:
			// A new term starts new replication: old failures say nothing.
			clear(r.failing)
		}
		r.mu.Unlock()
	}
}

func (r *reach) isFailing(name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	at, ok := r.failing[name]
	return ok && time.Since(at) < failWindow
}

func (s *Server) observeHeartbeats() {
	s.reach = &reach{failing: map[string]time.Time{}}
	ch := make(chan raft.Observation, 64)
	s.obs = raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation, raft.LeaderObservation:
			return true
		}
		return false
	})
	s.raft.RegisterObserver(s.obs)
	s.obsCh = ch
	go s.reach.watch(ch)
}

// unreachable lists the nodes placement must skip now, with the reason:
// those gossip no longer sees, and those raft fails to heartbeat.
func (s *Server) unreachable(st *scheduler.State) map[string]string {
	live := s.members()
	out := map[string]string{}
	for name := range st.Nodes {
		if _, ok := live[name]; !ok {
			out[name] = "not seen by gossip"
		} else if s.reach.isFailing(name) {
			out[name] = "not answering raft heartbeats"
		}
	}
	return out
}

// place picks a node for a new workload among those this leader can reach
// now. The chosen node is pinged over gossip first (one probe timeout at
// most): a node that crashed a moment ago answers neither, and the next
// best is tried.
func (s *Server) place(req scheduler.PlacementRequest) (string, error) {
	silent := map[string]bool{}
	for {
		var (
			name string
			err  error
		)
		s.fsm.Read(func(st *scheduler.State) {
			ex := s.unreachable(st)
			for n, why := range req.Exclude {
				ex[n] = why // the caller's own (a migration's current node)
			}
			for n := range silent {
				ex[n] = "does not answer a gossip ping"
			}
			r := req
			r.Exclude = ex
			name, err = scheduler.Place(st, r)
		})
		if err != nil || name == s.cfg.Name {
			return name, err
		}
		m, ok := s.members()[name]
		if !ok {
			silent[name] = true // gone since
			continue
		}
		if _, err := s.ml.Ping(name, &net.UDPAddr{IP: m.node.Addr, Port: int(m.node.Port)}); err == nil {
			return name, nil
		}
		s.log.Warn("placement: node does not answer a gossip ping; trying another", "candidate", name)
		silent[name] = true
	}
}
