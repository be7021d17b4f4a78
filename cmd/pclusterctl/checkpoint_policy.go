package main

import (
	"context"
	"flag"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

type checkpointPolicySetCmd struct {
	selector  kvFlag
	interval  time.Duration
	keep      int
	replicas  int
	fence     string
	fullEvery int
}

func (*checkpointPolicySetCmd) name() string { return "checkpoint policy set" }
func (*checkpointPolicySetCmd) synopsis() string {
	return "checkpoint policy set [-selector k=v]... -interval D [-keep 3] [-replicas 1] [-fence off] [-full-every 8] NAME   checkpoint matching workloads every D"
}
func (c *checkpointPolicySetCmd) flags(fs *flag.FlagSet) {
	c.selector = kvFlag{}
	fs.Var(c.selector, "selector", "workload label `key=value` the policy applies to (repeatable; none: every workload)")
	fs.DurationVar(&c.interval, "interval", 0, "time between two checkpoints of a workload (required, at least 1s)")
	fs.IntVar(&c.keep, "keep", 3, "checkpoints kept per workload; older ones are deleted everywhere")
	fs.IntVar(&c.replicas, "replicas", 1, "copies of each checkpoint on other nodes")
	fs.StringVar(&c.fence, "fence", "", "`off`: a node cut off from the majority leaves the matching workloads running (default freeze; a workload's own -fence wins)")
	fs.IntVar(&c.fullEvery, "full-every", 8, "every Nth checkpoint is full, the others carry only the pages changed since the one before (1: all full)")
}

func (c *checkpointPolicySetCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("checkpoint policy set needs exactly one policy NAME")
	}
	if c.interval <= 0 {
		return usagef("-interval is required (a duration such as 5m)")
	}
	p, err := e.client.SetCheckpointPolicy(ctx, api.CheckpointPolicy{Name: args[0], Selector: c.selector,
		Interval: api.Duration(c.interval), Keep: c.keep, Replicas: c.replicas, Fence: c.fence, FullEvery: c.fullEvery})
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, p)
	}
	fence := ""
	if p.Fence != "" {
		fence = ", fence " + shown(p.Fence)
	}
	fmt.Fprintf(e.stdout, "checkpoint policy %s set: every %v, keep %d, %d replicas, full every %d%s\n", shown(p.Name), time.Duration(p.Interval), p.Keep, p.Replicas,
		p.FullEvery, fence)
	return nil
}

type checkpointPolicyListCmd struct{}

func (*checkpointPolicyListCmd) name() string { return "checkpoint policy list" }
func (*checkpointPolicyListCmd) synopsis() string {
	return "checkpoint policy list   list the checkpoint policies"
}
func (*checkpointPolicyListCmd) flags(*flag.FlagSet) {}

func (*checkpointPolicyListCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usagef("checkpoint policy list takes no arguments, got %q", args[0])
	}
	ps, err := e.client.CheckpointPolicies(ctx)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, ps)
	}
	var rows [][]string
	for _, p := range ps {
		var sel []string
		for k, v := range p.Selector {
			sel = append(sel, shown(k)+"="+shown(v))
		}
		sort.Strings(sel)
		rows = append(rows, []string{shown(p.Name), dash(strings.Join(sel, ",")), time.Duration(p.Interval).String(),
			strconv.Itoa(p.Keep), strconv.Itoa(p.Replicas), strconv.Itoa(p.FullEvery), dash(p.Fence)})
	}
	return table(e.stdout, "NAME SELECTOR INTERVAL KEEP REPLICAS FULL-EVERY FENCE", rows)
}

type checkpointPolicyDeleteCmd struct{}

func (*checkpointPolicyDeleteCmd) name() string { return "checkpoint policy delete" }
func (*checkpointPolicyDeleteCmd) synopsis() string {
	return "checkpoint policy delete NAME   remove a policy (its checkpoints stay until their workload goes)"
}
func (*checkpointPolicyDeleteCmd) flags(*flag.FlagSet) {}

func (*checkpointPolicyDeleteCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("checkpoint policy delete needs exactly one policy NAME")
	}
	if err := e.client.DeleteCheckpointPolicy(ctx, args[0]); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "checkpoint policy %s deleted\n", shown(args[0]))
	return nil
}
