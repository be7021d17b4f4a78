package main

import (
	"context"
	"flag"
)

type logsCmd struct{ stderr bool }

func (*logsCmd) name() string { return "logs" }
func (*logsCmd) synopsis() string {
	return "logs [-stderr] ID         a workload's stdout (or stderr) log"
}
func (c *logsCmd) flags(fs *flag.FlagSet) {
	fs.BoolVar(&c.stderr, "stderr", false, "show stderr instead of stdout")
}

func (c *logsCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("logs needs exactly one workload ID")
	}
	return e.client.Logs(ctx, args[0], c.stderr, e.stdout)
}
