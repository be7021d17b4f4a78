package main

import (
	"context"
	"flag"
	"fmt"
)

type membersCmd struct{}

func (*membersCmd) name() string { return "members" }
func (*membersCmd) synopsis() string {
	return "members                  list nodes as gossip and raft see them"
}
func (*membersCmd) flags(*flag.FlagSet) {}

func (*membersCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usagef("members takes no arguments, got %q", args[0])
	}
	ms, err := e.client.Members(ctx)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, ms)
	}
	var rows [][]string
	for _, m := range ms {
		rows = append(rows, []string{shown(m.Name), shown(m.Addr), m.Status, m.Role,
			fmt.Sprintf("%.2f/%d", m.Load.CPULoad1, m.Load.NumCPU), bytesHuman(m.Load.MemFree), fmt.Sprint(m.Load.Workloads)})
	}
	return table(e.stdout, "NAME ADDRESS STATUS ROLE LOAD MEM-FREE WORKLOADS", rows)
}
