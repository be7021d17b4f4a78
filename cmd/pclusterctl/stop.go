package main

import (
	"context"
	"flag"
	"fmt"
)

type stopCmd struct{}

func (*stopCmd) name() string        { return "stop" }
func (*stopCmd) synopsis() string    { return "stop ID                  stop a workload" }
func (*stopCmd) flags(*flag.FlagSet) {}

func (*stopCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("stop needs exactly one workload ID")
	}
	w, err := e.client.Stop(ctx, args[0])
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, w)
	}
	fmt.Fprintf(e.stdout, "%s: stop requested (state %s)\n", w.ID, w.State)
	return nil
}
