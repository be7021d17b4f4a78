package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// balanceStatusCmd shows the balancer: its mode, each node's movable
// demand as the leader's last round saw it, and the last decisions with
// their reasons (DRS's recommendations history).
type balanceStatusCmd struct{}

func (*balanceStatusCmd) name() string { return "balance status" }
func (*balanceStatusCmd) synopsis() string {
	return "balance status   the balancer's mode, each node's demand, the last decisions and why"
}
func (*balanceStatusCmd) flags(*flag.FlagSet) {}

func (c *balanceStatusCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 0 {
		return usagef("balance status takes no arguments")
	}
	st, err := e.client.Balance(ctx)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, st)
	}
	return printBalance(e.stdout, st)
}

func printBalance(w io.Writer, st api.BalanceStatus) error {
	fmt.Fprintf(w, "mode %s", shown(st.Mode))
	if st.Mode != api.BalanceOff {
		fmt.Fprintf(w, " (moves from nodes %.2f busier than the least busy, gaining %.2f or more)", st.Threshold, st.MinGain)
	}
	fmt.Fprintf(w, ", a round every %v, cool-down %v; leader %s: %d rounds, %d moves\n\n", st.Interval, st.Cooldown,
		shown(st.Leader), st.Rounds, st.Moves)
	rows := make([][]string, 0, len(st.Nodes))
	for _, n := range st.Nodes {
		rows = append(rows, []string{shown(n.Name), strconv.FormatFloat(n.Load, 'f', 2, 64), fmt.Sprintf("%dm", n.CPUMilli),
			fmt.Sprintf("%dm", n.MovableMilli), bytesHuman(n.RSS), dash(n.Why)})
	}
	if len(rows) == 0 {
		fmt.Fprintln(w, "no round yet")
	} else if err := table(w, "NODE LOAD CPU MOVABLE RSS NOTE", rows); err != nil {
		return err
	}
	fmt.Fprintln(w)
	if len(st.Decisions) == 0 {
		fmt.Fprintln(w, "no decisions yet")
		return nil
	}
	fmt.Fprintln(w, "decisions (oldest first):")
	for _, d := range st.Decisions {
		at := d.At.Local().Format(time.TimeOnly)
		switch d.Kind {
		case api.BalanceHeld:
			if d.Rounds > 1 {
				at += fmt.Sprintf("–%s (%d rounds)", d.Last.Local().Format(time.TimeOnly), d.Rounds)
			}
			fmt.Fprintf(w, "  %s  nothing moved: %s\n", at, shown(d.Reason))
		default:
			fmt.Fprintf(w, "  %s  %s %s %s → %s %s: %s\n", at, shown(d.Kind), shown(d.Workload), shown(d.Source), shown(d.Target),
				dash(d.Migration), shown(d.Reason))
		}
	}
	return nil
}
