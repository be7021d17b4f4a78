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

// PlanMigrationTimeouts is the leader's decision to give up on migrations
// that make no progress, a pure function of the state and the clock: an
// abort (written by the leader) for each migration not yet committed whose
// last step is older than timeout, in ID order. A committed migration is
// never aborted: only its target can finish it, or its loss (node down).
func PlanMigrationTimeouts(s *State, now time.Time, timeout time.Duration) []Command {
	cutoff := now.Add(-timeout).UnixNano()
	var ms []*Migration
	for _, m := range s.Migrations {
		if (m.State == MigrationPlanned || m.State == MigrationTransferring) && m.UpdatedAt <= cutoff {
			ms = append(ms, m)
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
