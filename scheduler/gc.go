package scheduler

import (
	"fmt"
	"sort"
	"time"
)

// DefaultGCAfter is how long an ended workload stays in the state before
// the leader removes it (Nomad's job GC threshold is 4 h; a workload here is
// one process, and its record is what `ps -a`, `status` and `logs` show).
const DefaultGCAfter = time.Hour

// MaxGCBatch bounds the ids of one workload-gc command (one raft entry).
const MaxGCBatch = 1000

// endedAt returns when w ended, and false while it may still have a
// process. A lost workload never counts as ended: its node was declared
// down, not its process, and the node may come back with it running (its
// agent then reports it again). Collecting it would make that agent find
// the record gone and stop the process, the only copy of the workload,
// without anyone having decided so. A lost workload leaves the state when
// its node reports it again (running, or ended) or when an operator stops
// it (stopped, then collected after the retention like any other).
func endedAt(w *Workload) (int64, bool) {
	switch w.State {
	case StateExited, StateFailed, StateStopped:
		if w.EndedAt != 0 {
			return w.EndedAt, true
		}
		return max(w.CreatedAt, w.StartedAt), true
	}
	return 0, false
}

// WorkloadsToCollect is the GC decision, a pure function of the state and
// the clock: the ids of workloads that ended (exited, failed, stopped; never
// lost, see endedAt) at or before cutoff (now minus the retention), oldest
// first, at most limit of them.
func WorkloadsToCollect(s *State, cutoff int64, limit int) []string {
	type cand struct {
		at int64
		id string
	}
	var cs []cand
	for _, w := range s.Workloads {
		if at, ended := endedAt(w); ended && at <= cutoff {
			cs = append(cs, cand{at, w.ID})
		}
	}
	sort.Slice(cs, func(i, j int) bool {
		if cs[i].at != cs[j].at {
			return cs[i].at < cs[j].at
		}
		return cs[i].id < cs[j].id
	})
	ids := make([]string, 0, min(len(cs), limit))
	for _, c := range cs[:min(len(cs), limit)] {
		ids = append(ids, c.id)
	}
	return ids
}

func init() {
	register(CmdWorkloadGC, applyWorkloadGC)
}

// applyWorkloadGC removes the listed workloads that are still ended at or
// before c.Before when the entry applies: one restarted (or re-listed by
// its returning node) since the leader decided is kept, and a lost one is
// never removed (endedAt), whoever listed it. Their migrations go with
// them, and so do their checkpoints. It returns how many were removed.
func applyWorkloadGC(s *State, idx uint64, c *WorkloadGCCmd) any {
	if len(c.IDs) > MaxGCBatch {
		return fmt.Errorf("workload gc: %w", &FieldError{Field: "ids", Problem: fmt.Sprintf("%d, limit %d", len(c.IDs), MaxGCBatch)})
	}
	gone := map[string]bool{}
	for _, id := range c.IDs {
		w, ok := s.Workloads[id]
		if !ok {
			continue
		}
		if at, ended := endedAt(w); !ended || at > c.Before {
			continue
		}
		delete(s.Workloads, id)
		delete(s.Checkpoints, id) // each agent then deletes its files
		gone[id] = true
	}
	for id, m := range s.Migrations {
		if gone[m.WorkloadID] {
			delete(s.Migrations, id)
		}
	}
	return len(gone)
}
