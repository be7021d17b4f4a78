package cluster

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/node"
	"github.com/pcluster/pcluster/scheduler"
)

type delegate struct{ s *Server }

func (d *delegate) NodeMeta(limit int) []byte {
	d.s.metaMu.Lock()
	m := d.s.meta
	d.s.metaMu.Unlock()
	b, err := m.encode()
	if err != nil || len(b) > limit {
		d.s.log.Error("node meta too large; sending none", "err", err)
		return nil
	}
	return b
}
func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

// events forwards membership changes to the leader loop, coalesced.
type events struct{ s *Server }

func (e *events) poke() {
	select {
	case e.s.events <- struct{}{}:
	default:
	}
}

// memberlist calls these with its node lock held, so copying the node here
// is safe; reading the *Node that Members() returns later is not (memberlist
// keeps changing it).
func (e *events) NotifyJoin(n *memberlist.Node) {
	e.s.setMember(n, true)
	e.poke()
	select {
	case e.s.joined <- struct{}{}:
	default:
	}
}
func (e *events) NotifyLeave(n *memberlist.Node)  { e.s.setMember(n, false); e.poke() }
func (e *events) NotifyUpdate(n *memberlist.Node) { e.s.setMember(n, true); e.poke() }

func (s *Server) setMember(n *memberlist.Node, alive bool) {
	s.memMu.Lock()
	defer s.memMu.Unlock()
	if !alive {
		delete(s.live, n.Name)
		return
	}
	c := *n
	c.Meta = append([]byte(nil), n.Meta...)
	s.live[n.Name] = c
}

// gossipLoop refreshes this node's load in its gossip metadata, saves the
// peer list for restarts, and re-joins known peers when the node finds
// itself alone (memberlist never does that by itself after a partition).
func (s *Server) gossipLoop(ctx context.Context) {
	load := time.NewTicker(s.cfg.LoadInterval)
	defer load.Stop()
	rejoin := time.NewTicker(s.cfg.RejoinInterval)
	defer rejoin.Stop()
	s.refreshLoad()
	for {
		select {
		case <-ctx.Done():
			return
		case <-load.C:
			s.refreshLoad()
			s.savePeers()
		case <-s.joined:
			s.savePeers()
		case <-rejoin.C:
			if s.ml.NumMembers() > 1 {
				continue
			}
			if peers := s.seeds(); len(peers) > 0 {
				if n, err := s.ml.Join(peers); err == nil {
					s.log.Info("re-joined cluster", "contacted", n)
				} else {
					s.log.Debug("re-join failed", "err", err)
				}
			}
		}
	}
}

func (s *Server) refreshLoad() {
	l, err := node.SampleLoad()
	if err != nil {
		s.log.Warn("sample load", "err", err)
	}
	l.Workloads = s.agent.Workloads()
	uses := s.agent.Usage()
	booted := s.raft.State() == raft.Leader || s.raft.Leader() != "" || s.raftBooted()
	s.metaMu.Lock()
	s.meta.Booted = s.meta.Booted || booted
	s.meta.Load = withUses(s.meta, l, uses)
	s.metaMu.Unlock()
	if err := s.ml.UpdateNode(time.Second); err != nil {
		s.log.Debug("gossip meta update", "err", err)
	}
}

func (s *Server) raftBooted() bool {
	idx := s.raft.LastIndex()
	return idx > 0
}

func (s *Server) savePeers() {
	var peers []string
	for name, m := range s.members() {
		if name != s.cfg.Name {
			peers = append(peers, m.node.Address())
		}
	}
	if len(peers) == 0 {
		return
	}
	sort.Strings(peers)
	b, _ := json.Marshal(peers)
	p := filepath.Join(s.cfg.DataDir, "peers.json")
	if old, err := os.ReadFile(p); err == nil && string(old) == string(b) {
		return
	}
	if err := os.WriteFile(p+".tmp", b, 0o600); err == nil {
		_ = os.Rename(p+".tmp", p)
	}
}

// memberView is one gossip member with its decoded metadata.
type memberView struct {
	node memberlist.Node
	meta meta
	ok   bool // meta decoded
}

// members returns the live gossip members by name (copies).
func (s *Server) members() map[string]memberView {
	s.memMu.Lock()
	defer s.memMu.Unlock()
	out := make(map[string]memberView, len(s.live))
	for name, n := range s.live {
		m, ok := decodeMeta(&n)
		out[name] = memberView{node: n, meta: m, ok: ok}
	}
	return out
}

// maxGossipUses bounds the workloads whose use a node lists in its gossip
// metadata; the rest count in its totals only.
const maxGossipUses = 16

// withUses returns l with the workloads' uses: the totals of all, and
// each of the busiest as long as m's encoding stays within memberlist's
// limit (Load.UseTrunc says some were left out).
func withUses(m meta, l scheduler.Load, uses map[string]scheduler.Use) scheduler.Load {
	ids := make([]string, 0, len(uses))
	for id, u := range uses {
		ids = append(ids, id)
		l.WCPU += u.CPU
		l.WRSS += u.RSS
	}
	sort.Slice(ids, func(i, j int) bool {
		if uses[ids[i]].CPU != uses[ids[j]].CPU {
			return uses[ids[i]].CPU > uses[ids[j]].CPU
		}
		return ids[i] < ids[j]
	})
	if len(ids) > maxGossipUses {
		ids, l.UseTrunc = ids[:maxGossipUses], true
	}
	for k := len(ids); k >= 0; k-- {
		l.Use = make(map[string]scheduler.Use, k)
		for _, id := range ids[:k] {
			l.Use[id] = uses[id]
		}
		m.Load = l
		if _, err := m.encode(); err == nil {
			return l
		}
		l.UseTrunc = true
	}
	return l
}
