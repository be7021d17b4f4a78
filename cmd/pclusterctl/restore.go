package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/pcluster/pcluster/cluster/api"
)

type restoreCmd struct {
	seq  uint64
	node string
}

func (*restoreCmd) name() string { return "restore" }
func (*restoreCmd) synopsis() string {
	return "restore [-checkpoint SEQ] [-node N] ID   roll a workload back to a checkpoint (or bring it back)"
}
func (c *restoreCmd) flags(fs *flag.FlagSet) {
	fs.Uint64Var(&c.seq, "checkpoint", 0, "the checkpoint's sequence number (see checkpoint list; default: the newest)")
	fs.StringVar(&c.node, "node", "", "restore on `node`, which must hold a copy (default: the workload's node if it holds one, else a node that does)")
}

func (c *restoreCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("restore needs exactly one workload ID")
	}
	w, err := e.client.Restore(ctx, args[0], api.RestoreRequest{Checkpoint: c.seq, Node: c.node})
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, w)
	}
	fmt.Fprintf(e.stdout, "%s: %s (state %s)\n", shown(w.ID), shown(w.Message), w.State)
	return nil
}
