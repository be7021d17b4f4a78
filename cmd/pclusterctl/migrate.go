package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

type migrateCmd struct {
	node   string
	detach bool
}

func (*migrateCmd) name() string { return "migrate" }
func (*migrateCmd) synopsis() string {
	return "migrate [-node NAME] [-detach] ID|NAME   move a running workload to another node"
}
func (c *migrateCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.node, "node", "", "move to node `NAME` (default: placement picks another node)")
	fs.BoolVar(&c.detach, "detach", false, "return once the migration is planned")
}

// pollEvery is how often the foreground command reads the migration.
const pollEvery = 100 * time.Millisecond

func (c *migrateCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("migrate needs exactly one workload ID or name")
	}
	m, err := e.client.Migrate(ctx, api.MigrateRequest{Workload: args[0], Node: c.node})
	if err != nil {
		return err
	}
	if c.detach {
		if e.json {
			return printJSON(e.stdout, m)
		}
		fmt.Fprintf(e.stdout, "%s: migration %s planned, %s → %s (pclusterctl migrations to follow it)\n",
			shown(m.Workload), shown(m.ID), shown(m.Source), shown(m.Target))
		return nil
	}
	if !e.json {
		fmt.Fprintf(e.stdout, "%s: migration %s, %s → %s\n", shown(m.Workload), shown(m.ID), shown(m.Source), shown(m.Target))
	}
	start := time.Now()
	shownState := ""
	for {
		if m.State != shownState && !e.json {
			// A step taken between two reads is shown when its
			// successor is: done implies committed, and so on.
			for _, ph := range phasesBetween(shownState, m.State) {
				fmt.Fprintf(e.stdout, "  %6.2fs  %s\n", time.Since(start).Seconds(), ph)
			}
		}
		shownState = m.State
		if m.State == "done" || m.State == "aborted" {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("migration %s is %s; interrupted (it goes on: pclusterctl migrations)", m.ID, m.State)
		case <-time.After(pollEvery):
		}
		next, err := e.client.Migration(ctx, m.ID)
		if err != nil {
			if api.IsUnavailable(err) {
				continue // no leader for a moment: the state decides, ask again
			}
			return err
		}
		m = next
	}
	if m.State == "aborted" {
		if e.json {
			_ = printJSON(e.stdout, m)
		}
		return fmt.Errorf("migration %s aborted: %s; %s stays on %s", m.ID, shown(m.Error), m.Workload, m.Source)
	}
	w, err := e.client.Workload(ctx, m.Workload)
	if err != nil {
		return err
	}
	if e.json {
		if err := printJSON(e.stdout, m); err != nil {
			return err
		}
	}
	if w.State != "running" || w.Node != m.Target {
		return fmt.Errorf("migration %s committed, but %s is %s on %s: %s", m.ID, m.Workload, w.State, w.Node, shown(m.Error))
	}
	if !e.json {
		fmt.Fprintf(e.stdout, "moved %s from %s to %s: %s in %v, process stopped %s%s (pid %d)\n", shown(m.Workload), shown(m.Source),
			shown(m.Target), bytesHuman(uint64(m.Bytes)), m.EndedAt.Sub(m.PlannedAt).Round(time.Millisecond), stoppedFor(m), precopied(m), w.PID)
	}
	return nil
}

// stoppedFor says how long a done migration's process was stopped.
func stoppedFor(m api.Migration) string {
	if d := m.Stopped(); d > 0 {
		return d.Round(time.Millisecond).String()
	}
	return "-"
}

// precopied says what a live migration sent while the process ran:
// "" for a stop-and-copy.
func precopied(m api.Migration) string {
	if m.Rounds == 0 {
		return ""
	}
	return fmt.Sprintf(" after %d live rounds of %s", m.Rounds, bytesHuman(uint64(m.PrecopyBytes)))
}

// phases is the order of a migration's steps that reach done.
var phases = []string{"planned", "transferring", "committed", "done"}

// phasesBetween returns the steps after from up to to: those in between
// happened unseen. An abort, or a state not in phases, is itself alone.
func phasesBetween(from, to string) []string {
	i, j := -1, -1
	for k, p := range phases {
		if p == from {
			i = k
		}
		if p == to {
			j = k
		}
	}
	if j < 0 || j <= i {
		return []string{shown(to)}
	}
	return phases[i+1 : j+1]
}
