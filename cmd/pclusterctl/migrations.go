package main

import (
	"context"
	"flag"
	"time"
)

type migrationsCmd struct {
	all bool
}

func (*migrationsCmd) name() string { return "migrations" }
func (*migrationsCmd) synopsis() string {
	return "migrations [-a]          list migrations in flight (-a: ended ones too)"
}
func (c *migrationsCmd) flags(fs *flag.FlagSet) {
	fs.BoolVar(&c.all, "a", false, "include ended migrations (done, aborted)")
}

func (c *migrationsCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usagef("migrations takes no arguments, got %q", args[0])
	}
	ms, err := e.client.Migrations(ctx, c.all)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, ms)
	}
	var rows [][]string
	for _, m := range ms {
		took := "-"
		if !m.EndedAt.IsZero() {
			took = m.EndedAt.Sub(m.PlannedAt).Round(time.Millisecond).String()
		}
		rows = append(rows, []string{shown(m.ID), shown(m.Workload), dash(m.Name), shown(m.Source), shown(m.Target),
			shown(m.State), dash(m.Origin), ago(m.PlannedAt), took, dash(m.Error)})
	}
	return table(e.stdout, "ID WORKLOAD NAME SOURCE TARGET STATE ORIGIN PLANNED TOOK ERROR", rows)
}
