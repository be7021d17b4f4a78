package scheduler

import (
	"fmt"
	"sort"
	"time"
)

// Checkpoint policy decisions (docs/cluster.md, "Checkpoints"): pure
// functions of the state and the clock. The agent running a workload asks
// CheckpointDue; the leader picks the copies' nodes (ReplicaTargets) and
// applies the retention (PlanCheckpointPrune).

// Defaults and limits of a checkpoint policy.
const (
	DefaultCheckpointKeep      = 3
	DefaultCheckpointReplicas  = 1
	DefaultCheckpointFullEvery = 8
	MinCheckpointInterval      = time.Second
	MaxCheckpointKeep          = 100
	MaxCheckpointReplicas      = 16
	MaxCheckpointPolicies      = 256
	MaxCheckpointFullEvery     = 256
)

// ValidateCheckpointPolicy checks a policy before it is proposed.
func ValidateCheckpointPolicy(p *CheckpointPolicy) error {
	if err := checkString("name", p.Name, MaxNameLen); err != nil {
		return err
	}
	if p.Name == "" {
		return invalid("name", "empty")
	}
	if err := checkMap("selector", p.Selector); err != nil {
		return err
	}
	if time.Duration(p.Interval) < MinCheckpointInterval {
		return invalid("interval", "%v, minimum %v", time.Duration(p.Interval), MinCheckpointInterval)
	}
	if p.Keep < 0 || p.Keep > MaxCheckpointKeep {
		return invalid("keep", "%d, out of range 1..%d", p.Keep, MaxCheckpointKeep)
	}
	if p.Replicas < 0 || p.Replicas > MaxCheckpointReplicas {
		return invalid("replicas", "%d, out of range 0..%d", p.Replicas, MaxCheckpointReplicas)
	}
	if p.FullEvery < 0 || p.FullEvery > MaxCheckpointFullEvery {
		return invalid("full_every", "%d, out of range 1..%d", p.FullEvery, MaxCheckpointFullEvery)
	}
	return validFence(p.Fence)
}

// Matches reports whether the policy applies to w: its labels hold every
// pair of the selector.
func (p *CheckpointPolicy) Matches(w *Workload) bool {
	for k, v := range p.Selector {
		if got, ok := w.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// EffectivePolicy merges the policies that apply to w: the shortest
// interval, the largest keep and replicas, the most frequent full
// checkpoint. ok is false when none applies;
// the result still has the defaults for keep and replicas then (a
// `checkpoint now` of such a workload uses them).
func EffectivePolicy(s *State, w *Workload) (p CheckpointPolicy, ok bool) {
	names := make([]string, 0, len(s.CheckpointPolicies))
	for name := range s.CheckpointPolicies {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		q := s.CheckpointPolicies[name]
		if !q.Matches(w) {
			continue
		}
		keep := q.Keep
		if keep == 0 {
			keep = DefaultCheckpointKeep
		}
		full := q.FullEvery
		if full == 0 {
			full = DefaultCheckpointFullEvery
		}
		if !ok {
			p = CheckpointPolicy{Name: q.Name, Interval: q.Interval, Keep: keep, Replicas: q.Replicas, FullEvery: full}
			ok = true
			continue
		}
		p.Name += "," + q.Name
		p.Interval = min(p.Interval, q.Interval)
		p.Keep = max(p.Keep, keep)
		p.Replicas = max(p.Replicas, q.Replicas)
		p.FullEvery = min(p.FullEvery, full)
	}
	if !ok {
		p = CheckpointPolicy{Keep: DefaultCheckpointKeep, Replicas: DefaultCheckpointReplicas, FullEvery: DefaultCheckpointFullEvery}
	}
	return p, ok
}

// CheckpointBackoff is the wait after the n-th consecutive failure
// before the next try: 1 s doubling, never longer than the interval (nor
// than 5 minutes), so a failing checkpoint is retried, reported each
// time, and never silently skipped.
func CheckpointBackoff(n int, interval time.Duration) time.Duration {
	d := time.Second
	for i := 1; i < n && d < 5*time.Minute; i++ {
		d *= 2
	}
	d = min(d, 5*time.Minute)
	if interval > 0 {
		d = min(d, interval)
	}
	return d
}

// CheckpointDue says whether the running workload w is due for a
// checkpoint at now, and if not how long until it is (0 and false: never,
// no policy and no request). A request (`checkpoint now`) newer than the
// last success is due at once; otherwise the interval runs from the last
// success (or the attempt's start); after a failure, the backoff runs
// from the failure.
func CheckpointDue(s *State, w *Workload, now time.Time) (bool, time.Duration) {
	if w.State != StateRunning {
		return false, 0
	}
	r := s.Checkpoints[w.ID]
	if r == nil {
		r = &WorkloadCheckpoints{}
	}
	p, ok := EffectivePolicy(s, w)
	var next int64 = -1
	if r.RequestedAt > r.LastAt {
		// Until a success serves it: failures retry it after the backoff.
		next = r.RequestedAt
		if r.Failures > 0 && r.LastErrorAt >= r.RequestedAt {
			next = max(next, r.LastErrorAt+int64(CheckpointBackoff(r.Failures, time.Duration(p.Interval))))
		}
	}
	if ok {
		due := max(r.LastAt, w.StartedAt) + p.Interval
		if r.Failures > 0 && r.LastErrorAt > r.LastAt {
			due = r.LastErrorAt + int64(CheckpointBackoff(r.Failures, time.Duration(p.Interval)))
		}
		if next < 0 || due < next {
			next = due
		}
	}
	if next < 0 {
		return false, 0
	}
	if wait := time.Duration(next - now.UnixNano()); wait > 0 {
		return false, wait
	}
	return true, 0
}

// ReplicaTargets picks n nodes other than the one that took the
// checkpoint of w to hold its copies: ready nodes (eligible or not: a
// copy is data, not work), fewest checkpoint copies held first, then by
// name. Fewer than n when the cluster has fewer.
func ReplicaTargets(s *State, taker string, n int) []string {
	held := map[string]int{}
	for _, r := range s.Checkpoints {
		for _, c := range r.List {
			for _, h := range c.Holders {
				held[h]++
			}
		}
	}
	var cands []string
	for _, nd := range s.SortedNodes() {
		if nd.Name != taker && nd.Status == NodeReady {
			cands = append(cands, nd.Name)
		}
	}
	sort.SliceStable(cands, func(i, j int) bool { return held[cands[i]] < held[cands[j]] })
	if len(cands) > n {
		cands = cands[:n]
	}
	return cands
}

// PlanCheckpointPrune is the retention: for every workload with more
// checkpoints than its effective keep, a command forgetting the oldest,
// but never one that a kept (incremental) checkpoint needs. A workload
// that has ended keeps its checkpoints (to bring it back) until it is
// collected.
func PlanCheckpointPrune(s *State) []Command {
	ids := make([]string, 0, len(s.Checkpoints))
	for id := range s.Checkpoints {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var out []Command
	for _, id := range ids {
		r := s.Checkpoints[id]
		w, ok := s.Workloads[id]
		if !ok {
			continue
		}
		p, _ := EffectivePolicy(s, w)
		if len(r.List) <= p.Keep {
			continue
		}
		needed := map[uint64]bool{}
		for _, c := range r.List[len(r.List)-p.Keep:] {
			for _, a := range r.Chain(c.Seq) {
				needed[a.Seq] = true
			}
		}
		var seqs []uint64
		for _, c := range r.List[:len(r.List)-p.Keep] {
			if !needed[c.Seq] {
				seqs = append(seqs, c.Seq)
			}
		}
		if len(seqs) == 0 {
			continue
		}
		out = append(out, Command{Type: CmdCheckpointPrune, Payload: &CheckpointPruneCmd{WorkloadID: id, Seqs: seqs}})
	}
	return out
}

// CheckpointFile is the name of checkpoint seq of workload id in a node's
// checkpoint directory.
func CheckpointFile(id string, seq uint64) string {
	return fmt.Sprintf("%s.%d.ckpt", id, seq)
}
