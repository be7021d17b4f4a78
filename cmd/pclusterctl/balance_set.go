package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/pcluster/pcluster/cluster/api"
)

// balanceSetCmd sets the balancer's mode (in the raft state).
type balanceSetCmd struct{ mode string }

func (*balanceSetCmd) name() string { return "balance set" }
func (*balanceSetCmd) synopsis() string {
	return "balance set -mode off|conservative|aggressive   whether and how eagerly the leader moves workloads to spread the load"
}
func (c *balanceSetCmd) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.mode, "mode", "", "`off`, conservative (moves from a node 0.20 of its CPUs busier than the least busy) or aggressive (0.10)")
}

func (c *balanceSetCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 0 {
		return usagef("balance set takes no arguments, only -mode")
	}
	switch c.mode {
	case api.BalanceOff, api.BalanceConservative, api.BalanceAggressive:
	case "":
		return usagef("balance set needs -mode off, conservative or aggressive")
	default:
		return usagef("balance set: -mode %q: want off, conservative or aggressive", c.mode)
	}
	st, err := e.client.SetBalance(ctx, c.mode)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, st)
	}
	fmt.Fprintf(e.stdout, "balance mode %s\n", shown(st.Mode))
	return nil
}
