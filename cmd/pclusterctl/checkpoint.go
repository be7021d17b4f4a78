package main

import (
	"context"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"
)

type checkpointNowCmd struct{}

func (*checkpointNowCmd) name() string { return "checkpoint now" }
func (*checkpointNowCmd) synopsis() string {
	return "checkpoint now ID        take one checkpoint of a running workload now"
}
func (*checkpointNowCmd) flags(*flag.FlagSet) {}

func (*checkpointNowCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("checkpoint now needs exactly one workload ID")
	}
	if err := e.client.CheckpointNow(ctx, args[0]); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: checkpoint requested (see pclusterctl checkpoint list %s)\n", shown(args[0]), shown(args[0]))
	return nil
}

type checkpointListCmd struct{}

func (*checkpointListCmd) name() string { return "checkpoint list" }
func (*checkpointListCmd) synopsis() string {
	return "checkpoint list ID       a workload's checkpoints: sequence, time, size, full or incremental on which, nodes holding a copy"
}
func (*checkpointListCmd) flags(*flag.FlagSet) {}

func (*checkpointListCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("checkpoint list needs exactly one workload ID")
	}
	wc, err := e.client.Checkpoints(ctx, args[0])
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, wc)
	}
	fmt.Fprintf(e.stdout, "Workload: %s\nPolicy:   %s\n", shown(wc.Workload), dash(wc.Policy))
	if wc.FailedTotal > 0 {
		fmt.Fprintf(e.stdout, "Failures: %d in a row, %d in all; last %s: %s\n", wc.Failures, wc.FailedTotal, ago(wc.LastErrorAt), shown(wc.LastError))
	}
	var rows [][]string
	for _, c := range wc.Checkpoints {
		holders := make([]string, 0, len(c.Holders))
		for _, h := range c.Holders {
			holders = append(holders, shown(h))
		}
		missing := len(c.Targets) + 1 - len(c.Holders)
		h := strings.Join(holders, ",")
		if missing > 0 {
			h += fmt.Sprintf(" (%d copy pending)", missing)
		}
		parent := "full"
		if c.Parent != 0 {
			parent = "on " + strconv.FormatUint(c.Parent, 10)
		}
		rows = append(rows, []string{strconv.FormatUint(c.Seq, 10), c.At.Format(time.RFC3339), ago(c.At), bytesHuman(uint64(c.Size)), parent, h})
	}
	return table(e.stdout, "SEQ TIME AGE SIZE KIND HOLDERS", rows)
}
