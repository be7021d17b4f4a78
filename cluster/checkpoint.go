package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// The API side of checkpoint policies (docs/cluster.md, "Checkpoints"):
// operators set policies and read checkpoints; agents report checkpoints
// through the leader, which picks the nodes for the copies; the node that
// took one pushes it to those nodes' APIs over mutual TLS.

func (s *Server) checkpointRoutes(m *http.ServeMux) {
	m.HandleFunc("GET "+api.PathCheckpointPolicies, s.leaderRead(s.handleCheckpointPolicies))
	m.HandleFunc("POST "+api.PathCheckpointPolicies, s.leaderWrite(s.handleCheckpointPolicySet))
	m.HandleFunc("DELETE "+api.PathCheckpointPolicies+"/{name}", s.leaderWrite(s.handleCheckpointPolicyDelete))
	m.HandleFunc("GET "+api.PathCheckpoints+"/{id}", s.leaderRead(s.handleCheckpoints))
	m.HandleFunc("POST "+api.PathCheckpoints+"/{id}/now", s.leaderWrite(s.handleCheckpointNow))
	m.HandleFunc("POST "+api.PathCheckpointReport, s.leaderWrite(s.handleCheckpointReport))
	m.HandleFunc("POST "+api.PathWorkloads+"/{id}/restore", s.leaderWrite(s.handleRestore))
	// Served by the target itself, never forwarded.
	m.HandleFunc("POST "+api.PathCheckpoints+"/{id}/{seq}/copy", s.handleCheckpointCopy)
}

func apiPolicy(p *scheduler.CheckpointPolicy) api.CheckpointPolicy {
	return api.CheckpointPolicy{Name: p.Name, Selector: p.Selector, Interval: api.Duration(p.Interval), Keep: p.Keep, Replicas: p.Replicas, Fence: p.Fence,
		FullEvery: p.FullEvery}
}

func apiCheckpoint(c *scheduler.Checkpoint) api.Checkpoint {
	return api.Checkpoint{Workload: c.WorkloadID, Seq: c.Seq, Node: c.Node, Attempt: c.Attempt, At: unixTime(c.At), Size: c.Size,
		Targets: append([]string{}, c.Targets...), Holders: append([]string{}, c.Holders...), Parent: c.Parent}
}

func (s *Server) handleCheckpointPolicies(w http.ResponseWriter, r *http.Request) {
	out := []api.CheckpointPolicy{}
	s.fsm.Read(func(st *scheduler.State) {
		for _, p := range st.CheckpointPolicies {
			out = append(out, apiPolicy(p))
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	writeJSON(w, out)
}

func (s *Server) handleCheckpointPolicySet(w http.ResponseWriter, r *http.Request) {
	var req api.CheckpointPolicy
	if err := decodeBody(w, r, "checkpoint policy", &req); err != nil {
		writeErr(w, err)
		return
	}
	if req.Keep == 0 {
		req.Keep = scheduler.DefaultCheckpointKeep
	}
	if req.FullEvery == 0 {
		req.FullEvery = scheduler.DefaultCheckpointFullEvery
	}
	p := scheduler.CheckpointPolicy{Name: req.Name, Selector: req.Selector, Interval: int64(req.Interval), Keep: req.Keep, Replicas: req.Replicas, Fence: req.Fence,
		FullEvery: req.FullEvery}
	if err := scheduler.ValidateCheckpointPolicy(&p); err != nil {
		writeErr(w, badRequest("checkpoint policy %.64q: %v", req.Name, err))
		return
	}
	n, exists := 0, false
	s.fsm.Read(func(st *scheduler.State) { n = len(st.CheckpointPolicies); _, exists = st.CheckpointPolicies[p.Name] })
	if !exists && n >= scheduler.MaxCheckpointPolicies {
		writeErr(w, badRequest("checkpoint policy %s: %d policies, limit %d", p.Name, n, scheduler.MaxCheckpointPolicies))
		return
	}
	if _, err := s.apply(scheduler.CmdCheckpointPolicyUpsert, &scheduler.CheckpointPolicyUpsertCmd{Policy: p}); err != nil {
		writeErr(w, err)
		return
	}
	s.log.Info("checkpoint policy set", "policy", p.Name, "interval", time.Duration(p.Interval), "keep", p.Keep, "replicas", p.Replicas)
	writeJSON(w, apiPolicy(&p))
}

func (s *Server) handleCheckpointPolicyDelete(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if name == "" || len(name) > scheduler.MaxNameLen {
		writeErr(w, badRequest("checkpoint policy %.64q: bad name", name))
		return
	}
	if _, err := s.apply(scheduler.CmdCheckpointPolicyDelete, &scheduler.CheckpointPolicyDeleteCmd{Name: name}); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleCheckpoints(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("id")
	var out api.WorkloadCheckpoints
	var err error
	s.fsm.Read(func(st *scheduler.State) {
		var wl *scheduler.Workload
		if wl, err = resolveWorkload(st, ref); err != nil {
			return
		}
		out = api.WorkloadCheckpoints{Workload: wl.ID, Checkpoints: []api.Checkpoint{}}
		if p, ok := scheduler.EffectivePolicy(st, wl); ok {
			out.Policy = p.Name
		}
		if rec := st.Checkpoints[wl.ID]; rec != nil {
			for _, c := range rec.List {
				out.Checkpoints = append(out.Checkpoints, apiCheckpoint(c))
			}
			out.LastAt, out.Failures, out.FailedTotal = unixTime(rec.LastAt), rec.Failures, rec.FailedTotal
			out.LastError, out.LastErrorAt = rec.LastError, unixTime(rec.LastErrorAt)
		}
	})
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, out)
}

func (s *Server) handleCheckpointNow(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("id")
	var id string
	var err error
	s.fsm.Read(func(st *scheduler.State) {
		var wl *scheduler.Workload
		if wl, err = resolveWorkload(st, ref); err == nil {
			id = wl.ID
		}
	})
	if err == nil {
		_, err = s.apply(scheduler.CmdCheckpointRequest, &scheduler.CheckpointRequestCmd{WorkloadID: id, At: time.Now().UnixNano()})
	}
	if err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) handleCheckpointReport(w http.ResponseWriter, r *http.Request) {
	var rep api.CheckpointReport
	if err := decodeBody(w, r, "checkpoint report", &rep); err != nil {
		writeErr(w, err)
		return
	}
	cp, err := s.applyCheckpointReport(rep)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, cp)
}

// applyCheckpointReport checks an agent's checkpoint report and proposes
// it; for a taken checkpoint the leader chooses the nodes for its copies
// here, so that the entry records them.
func (s *Server) applyCheckpointReport(rep api.CheckpointReport) (api.Checkpoint, error) {
	if err := scheduler.CheckReport(rep.Workload, rep.Node, ""); err != nil {
		return api.Checkpoint{}, badRequest("checkpoint report: %v", err)
	}
	switch rep.Kind {
	case api.CheckpointTaken:
		replicas := 0
		var targets []string
		s.fsm.Read(func(st *scheduler.State) {
			if wl, ok := st.Workloads[rep.Workload]; ok {
				p, _ := scheduler.EffectivePolicy(st, wl)
				replicas = p.Replicas
			}
			targets = scheduler.ReplicaTargets(st, rep.Node, replicas)
			// An incremental checkpoint goes where its parent went: a
			// copy is of use only beside the chain it needs.
			if r := st.Checkpoints[rep.Workload]; r != nil && rep.Parent != 0 {
				if p := r.Find(rep.Parent); p != nil {
					targets = slices.Clone(p.Targets)
				}
			}
		})
		res, err := s.apply(scheduler.CmdCheckpointTaken, &scheduler.CheckpointTakenCmd{WorkloadID: rep.Workload, Node: rep.Node,
			Attempt: rep.Attempt, At: rep.At.UnixNano(), Size: rep.Size, Targets: targets, NSPID: rep.NSPID, Parent: rep.Parent})
		if err != nil {
			return api.Checkpoint{}, err
		}
		cp := res.(scheduler.Checkpoint)
		if len(targets) < replicas {
			s.log.Warn("checkpoint has fewer copies than its policy asks: too few other nodes ready", "workload", rep.Workload,
				"seq", cp.Seq, "replicas", replicas, "targets", targets)
		}
		return apiCheckpoint(&cp), nil
	case api.CheckpointFailed:
		_, err := s.apply(scheduler.CmdCheckpointFailed, &scheduler.CheckpointFailedCmd{WorkloadID: rep.Workload, Node: rep.Node,
			Attempt: rep.Attempt, Error: scheduler.CutMessage(rep.Error), At: rep.At.UnixNano()})
		if err == nil {
			s.log.Warn("checkpoint failed", "workload", rep.Workload, "node", rep.Node, "err", rep.Error)
		}
		return api.Checkpoint{}, err
	case api.CheckpointCopied:
		_, err := s.apply(scheduler.CmdCheckpointCopied, &scheduler.CheckpointCopiedCmd{WorkloadID: rep.Workload, Seq: rep.Seq, Node: rep.Node})
		return api.Checkpoint{}, err
	}
	return api.Checkpoint{}, badRequest("checkpoint report: unknown kind %.32q", rep.Kind)
}

// checkpointReport is the node agent's way to send a checkpoint report
// to the leader.
func (s *Server) checkpointReport(ctx context.Context, rep api.CheckpointReport) (api.Checkpoint, error) {
	if s.IsLeader() {
		cp, err := s.applyCheckpointReport(rep)
		if err != nil && statusOf(err) < 500 {
			return cp, &api.Error{Status: statusOf(err), Message: err.Error()}
		}
		return cp, err
	}
	addr, err := s.leaderAPI()
	if err != nil {
		return api.Checkpoint{}, err
	}
	c := api.NewWithHTTP(addr, s.peerHTTP)
	c.Wait = 0
	return c.CheckpointReport(ctx, rep)
}

// handleCheckpointCopy takes the copy of a checkpoint to this node: only
// over the TLS API (the client certificate proves the peer holds the
// cluster key), and only of a checkpoint this node's replica lists with
// this node among its targets.
func (s *Server) handleCheckpointCopy(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		writeErr(w, &httpError{http.StatusForbidden, fmt.Errorf("checkpoint copy of %.64q: only over the cluster's mutual TLS", id)})
		return
	}
	if err := scheduler.CheckWorkloadID(id); err != nil {
		writeErr(w, badRequest("checkpoint copy: %v", err))
		return
	}
	seq, err := strconv.ParseUint(r.PathValue("seq"), 10, 64)
	if err != nil {
		writeErr(w, badRequest("checkpoint copy of %s: sequence %.32q: want a number", id, r.PathValue("seq")))
		return
	}
	if v := r.URL.Query().Get("index"); v != "" {
		idx, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeErr(w, badRequest("checkpoint copy of %s: index %.32q: want a number", id, v))
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		err = s.agent.AwaitIndex(ctx, idx)
		cancel()
		if err != nil {
			writeErr(w, &httpError{http.StatusServiceUnavailable, fmt.Errorf("checkpoint copy of %s: %w", id, err)})
			return
		}
	}
	if err := s.agent.ReceiveCheckpoint(r.Context(), id, seq, r.Body); err != nil {
		s.log.Warn("checkpoint copy refused", "workload", id, "seq", seq, "err", err)
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// pushCheckpoint sends checkpoint file f to node target's API.
func (s *Server) pushCheckpoint(ctx context.Context, target string, cp api.Checkpoint, f *os.File) error {
	var addr string
	var idx uint64
	s.fsm.Read(func(st *scheduler.State) {
		if n, ok := st.Nodes[target]; ok {
			addr = n.APIAddr
		}
		idx = st.Index
	})
	if addr == "" {
		return fmt.Errorf("checkpoint %d of %s: node %s: API address unknown", cp.Seq, cp.Workload, target)
	}
	u := "https://" + addr + api.PathCheckpoints + "/" + url.PathEscape(cp.Workload) + "/" + strconv.FormatUint(cp.Seq, 10) +
		"/copy?index=" + strconv.FormatUint(idx, 10)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, f)
	if err != nil {
		return err
	}
	if fi, err := f.Stat(); err == nil {
		req.ContentLength = fi.Size()
	}
	resp, err := s.peerHTTP.Do(req)
	if err != nil {
		return fmt.Errorf("checkpoint %d of %s: copy to %s: %w", cp.Seq, cp.Workload, target, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("checkpoint %d of %s: copy to %s: %s: %s", cp.Seq, cp.Workload, target, resp.Status, b)
	}
	return nil
}

// handleRestore rolls a workload back to a checkpoint: the newest unless
// one is named, on the node named (which must hold a copy), else on its
// own node if that holds one, else on the first ready holder.
func (s *Server) handleRestore(w http.ResponseWriter, r *http.Request) {
	var req api.RestoreRequest
	if err := decodeBody(w, r, "restore", &req); err != nil {
		writeErr(w, err)
		return
	}
	ref := r.PathValue("id")
	var cmd scheduler.WorkloadRestoreCmd
	var err error
	s.fsm.Read(func(st *scheduler.State) {
		var wl *scheduler.Workload
		if wl, err = resolveWorkload(st, ref); err != nil {
			return
		}
		rec := st.Checkpoints[wl.ID]
		if rec == nil || len(rec.List) == 0 {
			err = fmt.Errorf("restore %s: no checkpoint kept: %w", wl.ID, scheduler.ErrNotFound)
			return
		}
		cp := rec.List[len(rec.List)-1]
		if req.Checkpoint != 0 {
			if cp = rec.Find(req.Checkpoint); cp == nil {
				err = fmt.Errorf("restore %s: checkpoint %d is not kept: %w", wl.ID, req.Checkpoint, scheduler.ErrNotFound)
				return
			}
		}
		node := req.Node
		if node == "" {
			// A node holding every checkpoint this one needs first;
			// else one holding it, to which the others are copied.
			for _, whole := range []bool{true, false} {
				for _, h := range cp.Holders {
					if n, ok := st.Nodes[h]; ok && n.Status == scheduler.NodeReady && (!whole || rec.ChainHeld(cp.Seq, h)) && (node == "" || h == wl.Node) {
						node = h
					}
				}
				if node != "" {
					break
				}
			}
			if node == "" {
				err = &httpError{http.StatusConflict, fmt.Errorf("restore %s: no ready node holds checkpoint %d (held by %v)", wl.ID, cp.Seq, cp.Holders)}
				return
			}
		}
		cmd = scheduler.WorkloadRestoreCmd{ID: wl.ID, Seq: cp.Seq, Node: node, At: time.Now().UnixNano()}
	})
	if err != nil {
		writeErr(w, err)
		return
	}
	if err := s.copyForRestore(r.Context(), cmd); err != nil {
		writeErr(w, err)
		return
	}
	res, err := s.apply(scheduler.CmdWorkloadRestore, &cmd)
	if err != nil {
		writeErr(w, err)
		return
	}
	wl := res.(scheduler.Workload)
	s.log.Info("workload restore", "workload", wl.ID, "checkpoint", cmd.Seq, "node", cmd.Node)
	writeJSON(w, apiWorkload(&wl))
}

// copyForRestore has the checkpoint of a restore copied to its node first
// when that node lacks it or one that it needs (an incremental
// checkpoint's chain): the node becomes one of the targets of each it
// lacks, a holder pushes them there (node.Agent.repairCopies), and the
// restore waits (at most restoreCopyWait) until the state shows the whole
// chain held.
func (s *Server) copyForRestore(ctx context.Context, cmd scheduler.WorkloadRestoreCmd) error {
	var missing []uint64
	held := func() (bool, bool) {
		h, found := false, false
		missing = missing[:0]
		s.fsm.Read(func(st *scheduler.State) {
			if r := st.Checkpoints[cmd.ID]; r != nil {
				chain := r.Chain(cmd.Seq)
				found = chain != nil
				for _, c := range chain {
					if !c.Held(cmd.Node) {
						missing = append(missing, c.Seq)
					}
				}
				h = found && len(missing) == 0
			}
		})
		return h, found
	}
	if h, found := held(); h || !found {
		return nil // the restore's own checks answer
	}
	for _, seq := range missing {
		if _, err := s.apply(scheduler.CmdCheckpointTarget, &scheduler.CheckpointTargetCmd{WorkloadID: cmd.ID, Seq: seq, Node: cmd.Node}); err != nil {
			return fmt.Errorf("restore %s: copy checkpoint %d to %s: %w", cmd.ID, seq, cmd.Node, err)
		}
	}
	s.log.Info("restore: copying the checkpoint to its node first", "workload", cmd.ID, "checkpoint", cmd.Seq, "node", cmd.Node, "copies", missing)
	ctx, cancel := context.WithTimeout(ctx, restoreCopyWait)
	defer cancel()
	for {
		changed := s.fsm.Changed()
		if h, found := held(); h {
			return nil
		} else if !found {
			return fmt.Errorf("restore %s: checkpoint %d or one it needs: %w", cmd.ID, cmd.Seq, scheduler.ErrNotFound)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return &httpError{http.StatusConflict, fmt.Errorf("restore %s: checkpoints %v not copied to %s within %v", cmd.ID, missing, cmd.Node, restoreCopyWait)}
		}
	}
}

// restoreCopyWait bounds the wait for a checkpoint's copy to a restore's
// node that held none.
const restoreCopyWait = time.Minute

// pruneCheckpoints applies the retention on the leader.
func (s *Server) pruneCheckpoints() {
	var cmds []scheduler.Command
	s.fsm.Read(func(st *scheduler.State) { cmds = scheduler.PlanCheckpointPrune(st) })
	for _, c := range cmds {
		if _, err := s.apply(c.Type, c.Payload); err != nil && !errors.Is(err, scheduler.ErrNotFound) {
			s.log.Info("checkpoint retention not applied", "err", err)
		}
	}
}

// failover brings lost workloads back on the leader
// (scheduler.PlanFailover decides).
func (s *Server) failover(now time.Time) {
	var cmds []scheduler.Command
	s.fsm.Read(func(st *scheduler.State) { cmds = scheduler.PlanFailover(st, now, s.cfg.FailoverAfter) })
	for _, c := range cmds {
		res, err := s.apply(c.Type, c.Payload)
		if err != nil {
			s.log.Info("failover not applied", "err", err)
			continue
		}
		w := res.(scheduler.Workload)
		if f := w.Failover; f != nil && f.Seq > 0 {
			s.log.Warn("failover: workload restored from its checkpoint", "workload", w.ID, "from", f.From, "to", f.To,
				"checkpoint", f.Seq, "rolled_back", time.Duration(f.Age))
		} else if f != nil {
			s.log.Warn("failover: workload restarted from its command", "workload", w.ID, "from", f.From, "to", f.To)
		}
	}
}
