package scheduler

import (
	"fmt"
	"sort"
	"time"
)

// DefaultMigrationTimeout is how long a migration may stay planned or
// transferring without a step before the leader aborts it: the source then
// resumes the workload. A transfer reports no progress to the state, so it
// must exceed the longest transfer expected.
const DefaultMigrationTimeout = 5 * time.Minute

// MigrationClock is the leader's measure of how long each migration has
// gone without a step. A step's time in the state is the writing node's
// clock (its At), which may be minutes off the leader's, or jump: a
// timeout reckoned from it aborted every migration from a node whose
// clock lagged by more than the timeout, at its first step, and let one
// stamped ahead hang on past it. So the leader reckons from when it saw
// the migration's last step (its ModifyIndex change), on its own clock:
// with now from time.Now, its monotonic reading. A new leader starts
// from its first look (a stuck migration waits one timeout more). The
// zero value is ready; one goroutine uses it.
type MigrationClock struct {
	seen map[string]clockMark
}

// clockMark: the migration's ModifyIndex, and when the leader first saw it.
type clockMark struct {
	index uint64
	since time.Time
}

// Timeouts is the leader's decision to give up on migrations that make no
// progress: an abort (written by the leader) for each migration not yet
// committed whose last step the clock has seen no newer than timeout
// before now, in ID order. A committed migration is never aborted: only
// its target can finish it, or its loss (node down).
func (c *MigrationClock) Timeouts(s *State, now time.Time, timeout time.Duration) []Command {
	if c.seen == nil {
		c.seen = map[string]clockMark{}
	}
	var ms []*Migration
	live := map[string]bool{}
	for _, m := range s.Migrations {
		if m.State != MigrationPlanned && m.State != MigrationTransferring {
			continue
		}
		live[m.ID] = true
		mark, ok := c.seen[m.ID]
		if !ok || mark.index != m.ModifyIndex {
			c.seen[m.ID] = clockMark{index: m.ModifyIndex, since: now}
			continue
		}
		if now.Sub(mark.since) >= timeout {
			ms = append(ms, m)
		}
	}
	for id := range c.seen {
		if !live[id] {
			delete(c.seen, id)
		}
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].ID < ms[j].ID })
	out := make([]Command, 0, len(ms))
	for _, m := range ms {
		out = append(out, Command{CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: m.Attempt, To: MigrationAborted,
			Error: fmt.Sprintf("no step for %v while %s", timeout, m.State), At: now.UnixNano()}})
	}
	return out
}
