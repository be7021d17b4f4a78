package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/pcluster/pcluster/cluster/api"
)

type psCmd struct {
	all, stale bool
	perPage    int
}

func (*psCmd) name() string { return "ps" }
func (*psCmd) synopsis() string {
	return "ps [-a]                  list workloads (-a: ended ones too)"
}
func (c *psCmd) flags(fs *flag.FlagSet) {
	fs.BoolVar(&c.all, "a", false, "include ended workloads")
	fs.BoolVar(&c.stale, "stale", false, "answer from the contacted node's replica, not the leader")
	fs.IntVar(&c.perPage, "per-page", 0, "fetch the list `N` workloads per request (default: the daemon's, 100)")
}

func (c *psCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usagef("ps takes no arguments, got %q", args[0])
	}
	if c.perPage < 0 || c.perPage > api.MaxPerPage {
		return usagef("-per-page %d: want 1..%d (0: the daemon's default)", c.perPage, api.MaxPerPage)
	}
	e.client.Stale = c.stale
	e.client.PerPage = c.perPage
	ws, err := e.client.Workloads(ctx)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, ws)
	}
	var rows [][]string
	for _, w := range ws {
		if !c.all && w.State != "pending" && w.State != "running" && w.State != "lost" {
			continue
		}
		node := w.Node
		if node == "" {
			node = w.DesiredNode
		}
		pid := "-"
		if w.PID > 0 {
			pid = fmt.Sprint(w.PID)
			if w.NSPID > 0 && w.NSPID != w.PID {
				// The host's PID, then the program's own in its namespace.
				pid += fmt.Sprintf("/%d", w.NSPID)
			}
		}
		cmd := commandLine(w.Command, w.Args)
		if len(cmd) > 40 {
			cmd = cmd[:37] + "..."
		}
		rows = append(rows, []string{shown(w.ID), shown(w.Name), shown(node), shown(w.State), pid, dash(w.VIP), cmd})
	}
	return table(e.stdout, "ID NAME NODE STATE PID VIP COMMAND", rows)
}
