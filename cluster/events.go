package cluster

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// Events are derived from the raft log, on every node alike: after each
// entry applies, eventFSM compares the objects of the state with what they
// were (a summary of the fields events speak of) and records one event per
// change, stamped with the entry's index and the time the leader appended
// it. Every replica applies the same entries to the same state, so every
// node derives the same events with the same indexes, and a stream can
// resume on another node (after a leader change, or when its node goes)
// from the index it had reached. Nothing new goes into the log or the
// snapshots for them: the handlers stay as they are, and a command type
// added later is covered by the comparison without a line here.
//
// A node keeps the last DefaultEventBuffer events in memory. It knows none
// from before the snapshot it last restored (at its start, or when it fell
// so far behind that the leader sent one): ?index=N is refused as too old
// when N is at or below the oldest index the node may have lost.

// DefaultEventBuffer is how many recent events a node keeps.
const DefaultEventBuffer = 4096

// eventHeartbeat is how often an idle stream gets a blank line, so that
// both ends notice a dead connection.
const eventHeartbeat = 15 * time.Second

// eventFSM is the FSM raft drives: the scheduler's, with the events
// derived after each entry. raft calls Apply and Restore from one
// goroutine, so the summaries need no lock.
type eventFSM struct {
	*scheduler.FSM
	ev *eventLog
}

func (f eventFSM) Apply(l *raft.Log) any {
	res := f.FSM.Apply(l)
	if l.Type == raft.LogCommand {
		f.FSM.Read(func(st *scheduler.State) { f.ev.observe(l.Index, l.AppendedAt, st) })
	}
	return res
}

func (f eventFSM) Restore(rc io.ReadCloser) error {
	if err := f.FSM.Restore(rc); err != nil {
		return err
	}
	f.FSM.Read(f.ev.restored)
	return nil
}

type nodeSum struct {
	status   scheduler.NodeStatus
	eligible bool
	draining bool
}

type workloadSum struct {
	state       scheduler.WorkloadState
	desired     string
	node        string
	desiredNode string
	restarts    int
	failoverAt  int64
}

// ckptSum is what the events compare of a workload's checkpoints: the
// last sequence number given, the failures in all, the copies in all and
// how many nodes hold each kept checkpoint.
type ckptSum struct {
	seq     uint64
	failed  int
	copies  int
	holders map[uint64]int
}

// eventLog derives events from the state and keeps the recent ones.
type eventLog struct {
	max int // events kept

	// Touched only by the FSM goroutine (observe, restored).
	nodes     map[string]nodeSum
	workloads map[string]workloadSum
	migs      map[string]scheduler.MigrationState
	ckpts     map[string]ckptSum
	balance   scheduler.BalanceConfig

	// mu guards the fields below it.
	mu      sync.Mutex
	events  []api.Event   // in index order
	floor   uint64        // events at or below this index may be missing here
	last    uint64        // the last index observed
	changed chan struct{} // closed and replaced when events are added
}

func newEventLog(max int) *eventLog {
	return &eventLog{max: max, nodes: map[string]nodeSum{}, workloads: map[string]workloadSum{},
		migs: map[string]scheduler.MigrationState{}, ckpts: map[string]ckptSum{}, changed: make(chan struct{})}
}

// restored starts over from a state restored from a snapshot: what
// happened up to its index is not known here.
func (l *eventLog) restored(st *scheduler.State) {
	l.nodes, l.workloads, l.migs = map[string]nodeSum{}, map[string]workloadSum{}, map[string]scheduler.MigrationState{}
	l.ckpts = map[string]ckptSum{}
	l.balance = scheduler.BalanceConfig{}
	l.diff(st) // fills the summaries; the events are dropped
	l.mu.Lock()
	l.events = nil
	l.floor, l.last = st.Index, st.Index
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

// observe records the events of the entry at idx, applied to st.
func (l *eventLog) observe(idx uint64, at time.Time, st *scheduler.State) {
	evs := l.diff(st)
	if !at.IsZero() {
		at = at.UTC()
	}
	for i := range evs {
		evs[i].Index, evs[i].Seq, evs[i].Time = idx, i, at
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.last = idx
	if len(evs) == 0 {
		return
	}
	l.events = append(l.events, evs...)
	if over := len(l.events) - l.max; over > 0 {
		// Drop whole entries: an index is either all here or all gone.
		l.floor = l.events[over-1].Index
		for over < len(l.events) && l.events[over].Index == l.floor {
			over++
		}
		l.events = append([]api.Event(nil), l.events[over:]...)
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// errEventsGone is the answer for an index older than what a node keeps.
type errEventsGone struct {
	from, floor uint64
	oldest      uint64 // 0 when none is kept
}

func (e *errEventsGone) Error() string {
	if e.oldest == 0 {
		return fmt.Sprintf("events: index %d is no longer kept here (events up to index %d are gone); resume with -index %d", e.from, e.floor, e.floor+1)
	}
	return fmt.Sprintf("events: index %d is no longer kept here (events up to index %d are gone, the oldest kept is at %d); resume with -index %d", e.from, e.floor, e.oldest, e.floor+1)
}

// since returns the events at index from and later, the channel closed at
// the next addition, and the index to ask for next. from 0 means the
// oldest kept; an index whose events may be gone is an *errEventsGone.
func (l *eventLog) since(from uint64) ([]api.Event, <-chan struct{}, uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if from != 0 && from <= l.floor {
		gone := &errEventsGone{from: from, floor: l.floor}
		if len(l.events) > 0 {
			gone.oldest = l.events[0].Index
		}
		return nil, nil, 0, gone
	}
	i := sort.Search(len(l.events), func(i int) bool { return l.events[i].Index >= from })
	out := append([]api.Event(nil), l.events[i:]...)
	next := from
	if len(out) > 0 {
		next = out[len(out)-1].Index + 1
	}
	if next <= l.last {
		next = l.last + 1
	}
	if from == 0 && len(out) == 0 {
		next = l.last + 1
	}
	return out, l.changed, next, nil
}

// next is the index a stream of only new events starts at.
func (l *eventLog) next() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.last + 1
}

// diff compares st with the summaries, updates them and returns the
// events, in a fixed order: the balancer's mode, nodes, migrations,
// workloads, each by key.
func (l *eventLog) diff(st *scheduler.State) []api.Event {
	var out []api.Event
	add := func(typ, node, wl, mig, format string, args ...any) {
		out = append(out, api.Event{Type: typ, Node: node, Workload: wl, Migration: mig, Message: fmt.Sprintf(format, args...)})
	}

	// Setting the mode again (the same one) is an operator's act too.
	if st.Balance != l.balance {
		add("balance-mode", "", "", "", "balance mode set to %s (was %s)", balanceMode(st.Balance.Mode), balanceMode(l.balance.Mode))
		l.balance = st.Balance
	}

	for _, name := range changedKeys(st.Nodes, l.nodes, sumNode) {
		n, now := st.Nodes[name]
		was, before := l.nodes[name]
		if !now {
			delete(l.nodes, name)
			add("node-removed", name, "", "", "node %s removed from the state", name)
			continue
		}
		cur := sumNode(n)
		l.nodes[name] = cur
		if !before {
			add("node-joined", name, "", "", "node %s joined (%s)", name, n.Status)
			continue
		}
		if cur.status != was.status {
			add("node-status", name, "", "", "node %s is %s (was %s)", name, cur.status, was.status)
		}
		if cur.eligible != was.eligible {
			if cur.eligible {
				add("node-eligibility", name, "", "", "node %s is eligible for new workloads", name)
			} else {
				add("node-eligibility", name, "", "", "node %s is ineligible for new workloads", name)
			}
		}
		switch {
		case cur.draining && !was.draining:
			d := n.Drain
			dl := "no deadline"
			if d.Force {
				dl = "forced"
			} else if !d.NoDeadline {
				dl = "deadline " + time.Unix(0, d.Deadline).UTC().Format(time.RFC3339)
			}
			add("drain-started", name, "", "", "drain of node %s started (%s)", name, dl)
		case !cur.draining && was.draining && n.Drain != nil:
			add("drain-done", name, "", "", "drain of node %s complete", name)
		case !cur.draining && was.draining:
			add("drain-cancelled", name, "", "", "drain of node %s cancelled", name)
		}
	}

	for _, id := range changedKeys(st.Migrations, l.migs, sumMigration) {
		m, now := st.Migrations[id]
		was, before := l.migs[id]
		if !now {
			delete(l.migs, id)
			continue // collected with its workload: nothing happened
		}
		l.migs[id] = m.State
		switch {
		case !before:
			reason := ""
			if m.Origin != "" {
				reason = " by " + m.Origin
			}
			if m.Reason != "" && m.Reason != m.Origin {
				reason += " (" + m.Reason + ")"
			}
			add("migration-"+string(m.State), m.Source, m.WorkloadID, id, "migration %s of %s from %s to %s %s%s",
				id, m.WorkloadID, m.Source, m.Target, m.State, reason)
		case was != m.State:
			msg := fmt.Sprintf("migration %s of %s from %s to %s %s", id, m.WorkloadID, m.Source, m.Target, m.State)
			if m.State == scheduler.MigrationAborted && m.Error != "" {
				msg += ": " + m.Error
			}
			if m.State == scheduler.MigrationCommitted && m.Bytes > 0 {
				msg += " (" + sizeHuman(m.Bytes) + ")"
			}
			node := m.Source
			if m.State == scheduler.MigrationDone {
				node = m.Target
			}
			add("migration-"+string(m.State), node, m.WorkloadID, id, "%s", msg)
		}
	}

	for _, id := range changedKeys(st.Workloads, l.workloads, sumWorkload) {
		w, now := st.Workloads[id]
		was, before := l.workloads[id]
		if !now {
			delete(l.workloads, id)
			add("workload-removed", was.node, id, "", "workload %s removed from the state", id)
			continue
		}
		cur := sumWorkload(w)
		l.workloads[id] = cur
		if !before {
			add("workload-placed", w.DesiredNode, id, "", "workload %s (%s) placed on %s", id, w.Name, w.DesiredNode)
			if w.State != scheduler.StatePending {
				add("workload-"+string(w.State), w.Node, id, "", "workload %s is %s", id, w.State)
			}
			continue
		}
		if cur.desired != was.desired && cur.desired == scheduler.DesiredStopped {
			add("workload-stop", w.Node, id, "", "workload %s: stop requested", id)
		}
		if cur.state != was.state {
			workloadStateEvent(add, w, was)
		}
		if cur.desiredNode != was.desiredNode && cur.node == was.node && cur.state == was.state {
			add("workload-rescheduled", w.DesiredNode, id, "", "workload %s to be restarted on %s (from %s): %s", id, w.DesiredNode, w.Node, w.Message)
		}
		if f := w.Failover; f != nil && cur.failoverAt != was.failoverAt {
			how := "from its command"
			if f.Seq > 0 {
				how = fmt.Sprintf("from checkpoint %d (%v of work rolled back)", f.Seq, time.Duration(f.Age).Round(time.Millisecond))
			}
			add("workload-failover", f.To, id, "", "workload %s failed over from %s to %s, %s", id, f.From, f.To, how)
		}
	}
	l.diffCheckpoints(st, add)
	return out
}

// diffCheckpoints adds the events of the workloads' checkpoints: taken,
// failed, copied to another node. Workloads in ID order, checkpoints in
// sequence order: the same on every replica.
func (l *eventLog) diffCheckpoints(st *scheduler.State, add func(typ, node, wl, mig, format string, args ...any)) {
	for id := range l.ckpts {
		if _, ok := st.Checkpoints[id]; !ok {
			delete(l.ckpts, id)
		}
	}
	// Only the changed records are sorted and compared in detail: an
	// entry usually touches one workload of many.
	var ids []string
	for id, r := range st.Checkpoints {
		was, ok := l.ckpts[id]
		if !ok || r.Seq != was.seq || r.FailedTotal != was.failed || copies(r) != was.copies {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	for _, id := range ids {
		r := st.Checkpoints[id]
		was := l.ckpts[id]
		cur := ckptSum{seq: r.Seq, failed: r.FailedTotal, copies: copies(r), holders: map[uint64]int{}}
		for _, c := range r.List {
			cur.holders[c.Seq] = len(c.Holders)
			switch {
			case c.Seq > was.seq:
				add("checkpoint-taken", c.Node, id, "", "checkpoint %d of workload %s taken on %s (%s)", c.Seq, id, c.Node, sizeHuman(c.Size))
			case len(c.Holders) > was.holders[c.Seq] && len(c.Holders) > 1:
				add("checkpoint-copied", c.Holders[len(c.Holders)-1], id, "", "checkpoint %d of workload %s copied to %s (%d copies)",
					c.Seq, id, c.Holders[len(c.Holders)-1], len(c.Holders))
			}
		}
		if cur.failed > was.failed {
			add("checkpoint-failed", "", id, "", "checkpoint of workload %s failed: %s", id, r.LastError)
		}
		l.ckpts[id] = cur
	}
}

// copies counts the copies of a workload's kept checkpoints.
func copies(r *scheduler.WorkloadCheckpoints) int {
	n := 0
	for _, c := range r.List {
		n += len(c.Holders)
	}
	return n
}

// workloadStateEvent adds the event of w's change of state from was.
func workloadStateEvent(add func(typ, node, wl, mig, format string, args ...any), w *scheduler.Workload, was workloadSum) {
	id := w.ID
	switch w.State {
	case scheduler.StateRunning:
		if was.state == scheduler.StateLost {
			add("workload-started", w.Node, id, "", "workload %s running again on %s (pid %d)", id, w.Node, w.PID)
			return
		}
		add("workload-started", w.Node, id, "", "workload %s started on %s (pid %d, attempt %d)", id, w.Node, w.PID, w.Attempt)
	case scheduler.StatePending:
		if w.Restarts > was.restarts {
			max := "no limit"
			if w.Restart.Max > 0 {
				max = strconv.Itoa(w.Restart.Max)
			}
			add("workload-restarting", was.node, id, "", "workload %s ended on %s (%s); restart %d of %s on %s",
				id, was.node, exitText(w), w.Restarts, max, w.DesiredNode)
			return
		}
		add("workload-pending", w.DesiredNode, id, "", "workload %s pending on %s", id, w.DesiredNode)
	case scheduler.StateExited, scheduler.StateFailed:
		add("workload-"+string(w.State), w.Node, id, "", "workload %s %s on %s (%s)", id, w.State, w.Node, exitText(w))
	case scheduler.StateStopped:
		add("workload-stopped", w.Node, id, "", "workload %s stopped", id)
	case scheduler.StateLost:
		add("workload-lost", w.Node, id, "", "workload %s lost: %s", id, w.Message)
	default:
		add("workload-"+string(w.State), w.Node, id, "", "workload %s is %s", id, w.State)
	}
}

func exitText(w *scheduler.Workload) string {
	s := "exit code " + strconv.Itoa(w.ExitCode)
	if w.Signal != "" {
		s = "signal " + w.Signal
	}
	if w.Message != "" {
		s += ": " + w.Message
	}
	return s
}

func sumNode(n *scheduler.Node) nodeSum {
	return nodeSum{status: n.Status, eligible: n.Eligible, draining: n.Drain.Draining()}
}

func sumWorkload(w *scheduler.Workload) workloadSum {
	ws := workloadSum{state: w.State, desired: w.Desired, node: w.Node, desiredNode: w.DesiredNode, restarts: w.Restarts}
	if w.Failover != nil {
		ws.failoverAt = w.Failover.At
	}
	return ws
}

func sumMigration(m *scheduler.Migration) scheduler.MigrationState { return m.State }

// changedKeys returns, sorted, the keys of the objects in cur whose summary
// differs from the one in sums, and of those gone from cur. Only these are
// sorted: an entry usually changes one object of many.
func changedKeys[T any, S comparable](cur map[string]*T, sums map[string]S, sum func(*T) S) []string {
	var out []string
	for k, v := range cur {
		if was, ok := sums[k]; !ok || was != sum(v) {
			out = append(out, k)
		}
	}
	if len(sums) > len(cur)-len(out) {
		for k := range sums {
			if _, ok := cur[k]; !ok {
				out = append(out, k)
			}
		}
	}
	sort.Strings(out)
	return out
}

// handleEvents streams events from this node's replica (api.PathEvents).
func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	from := s.evlog.next()
	if v := r.URL.Query().Get("index"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeErr(w, badRequest("events: index %.40q: want a raft index (0 for the oldest kept)", v))
			return
		}
		from = n
	}
	evs, changed, next, err := s.evlog.since(from)
	if err != nil {
		writeErr(w, &httpError{http.StatusGone, err})
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(api.HeaderEventsIndex, strconv.FormatUint(from, 10))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	tick := time.NewTicker(eventHeartbeat)
	defer tick.Stop()
	for {
		for _, e := range evs {
			if err := enc.Encode(e); err != nil {
				return
			}
		}
		if err := rc.Flush(); err != nil {
			return
		}
		select {
		case <-changed:
		case <-tick.C:
			if _, err := io.WriteString(w, "\n"); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		case <-s.ctx.Done():
			return
		}
		evs, changed, next, err = s.evlog.since(next)
		if err != nil {
			// This reader fell behind what the node keeps.
			_ = enc.Encode(api.EventLine{Error: err.Error()})
			return
		}
	}
}

// balanceMode is a balancer mode as events name it ("" is off).
func balanceMode(m string) string {
	if m == "" {
		return scheduler.BalanceOff
	}
	return m
}

// sizeHuman is a size for a reader: 512 B, 3.4 KiB, 12.0 MiB, 1.5 GiB.
func sizeHuman(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
