package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

type nodeStatusCmd struct{}

func (*nodeStatusCmd) name() string { return "node status" }
func (*nodeStatusCmd) synopsis() string {
	return "node status [NODE]       nodes in the replicated state (one node in detail)"
}
func (*nodeStatusCmd) flags(*flag.FlagSet) {}

func (*nodeStatusCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) > 1 {
		return usagef("node status takes at most one node name")
	}
	if len(args) == 1 {
		n, err := e.client.Node(ctx, args[0])
		if err != nil {
			return err
		}
		if e.json {
			return printJSON(e.stdout, n)
		}
		var labels []string
		for k, v := range n.Labels {
			labels = append(labels, shown(k)+"="+shown(v))
		}
		sort.Strings(labels)
		fmt.Fprintf(e.stdout, "Name:       %s\nStatus:     %s (since %s)\nEligible:   %v\nGossip:     %s\nRaft:       %s\nAPI:        %s\n",
			shown(n.Name), shown(n.Status), ago(n.StatusAt), n.Eligible, shown(n.GossipAddr), shown(n.RaftAddr), shown(n.APIAddr))
		fmt.Fprintf(e.stdout, "Labels:     %s\nLoad:       cpu %.2f/%d, mem used %s free %s (%s)\nWorkloads:  %d\n",
			dash(strings.Join(labels, ",")), n.Load.CPULoad1, n.Load.NumCPU, bytesHuman(n.Load.MemUsed), bytesHuman(n.Load.MemFree),
			ago(n.LoadAt), n.Workloads)
		printDrain(e.stdout, n.Drain)
		return nil
	}
	ns, err := e.client.Nodes(ctx)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, ns)
	}
	var rows [][]string
	for _, n := range ns {
		rows = append(rows, []string{shown(n.Name), shown(n.Status), fmt.Sprint(n.Eligible), fmt.Sprint(n.Workloads),
			fmt.Sprintf("%.2f/%d", n.Load.CPULoad1, n.Load.NumCPU), bytesHuman(n.Load.MemFree), shown(n.APIAddr)})
	}
	return table(e.stdout, "NAME STATUS ELIGIBLE WORKLOADS LOAD MEM-FREE API", rows)
}

// printDrain prints a node's drain: when it started, its deadline and
// progress, or when it completed; then one line per failed move.
func printDrain(w io.Writer, d *api.NodeDrain) {
	if d == nil {
		return
	}
	deadline := "deadline " + d.Deadline.UTC().Format(time.RFC3339)
	switch {
	case d.Force:
		deadline = "forced"
	case d.NoDeadline:
		deadline = "no deadline"
	}
	if d.CompletedAt.IsZero() {
		fmt.Fprintf(w, "Drain:      started %s, %s, max-parallel %d: moved %d, in flight %d, remaining %d, failed %d\n",
			ago(d.StartedAt), deadline, d.MaxParallel, d.Moved, d.InFlight, d.Remaining, len(d.Failed))
	} else {
		fmt.Fprintf(w, "Drain:      complete %s: moved %d, failed %d\n", ago(d.CompletedAt), d.Moved, len(d.Failed))
	}
	for _, f := range d.Failed {
		fmt.Fprintf(w, "  failed:   %s\n", shown(f))
	}
	for _, r := range d.Restarted {
		fmt.Fprintf(w, "  restarted from its command: %s\n", shown(r))
	}
	for _, s := range d.Stuck {
		fmt.Fprintf(w, "  stuck:    %s\n", shown(s))
	}
}
