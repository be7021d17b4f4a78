package main

import (
	"context"
	"flag"
)

type logsCmd struct{ stderr, follow bool }

func (*logsCmd) name() string { return "logs" }
func (*logsCmd) synopsis() string {
	return "logs [-stderr] [-f] ID    a workload's stdout (or stderr) log; -f follows it, across migrations, until it ends"
}
func (c *logsCmd) flags(fs *flag.FlagSet) {
	fs.BoolVar(&c.stderr, "stderr", false, "show stderr instead of stdout")
	fs.BoolVar(&c.follow, "f", false, "follow the log as it grows, from node to node as the workload moves, until the workload ends")
}

func (c *logsCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("logs needs exactly one workload ID")
	}
	if c.follow {
		err := e.client.FollowLogs(ctx, args[0], c.stderr, e.stdout)
		if ctx.Err() != nil {
			return nil // interrupted
		}
		return err
	}
	return e.client.Logs(ctx, args[0], c.stderr, e.stdout)
}
