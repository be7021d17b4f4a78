package main

import (
	"context"
	"flag"
	"fmt"
)

// nodeEligibilityCmd sets whether placement may pick a node (Nomad's
// `node eligibility`). Workloads already on the node keep running.
type nodeEligibilityCmd struct {
	enable, disable bool
}

func (*nodeEligibilityCmd) name() string { return "node eligibility" }
func (*nodeEligibilityCmd) synopsis() string {
	return "node eligibility -enable|-disable NODE   whether new workloads may be placed on NODE"
}

func (c *nodeEligibilityCmd) flags(fs *flag.FlagSet) {
	fs.BoolVar(&c.enable, "enable", false, "new workloads may be placed on the node")
	fs.BoolVar(&c.disable, "disable", false, "no new workload is placed on the node; those on it keep running")
}

func (c *nodeEligibilityCmd) run(ctx context.Context, e *env, args []string) error {
	if c.enable == c.disable {
		return usagef("node eligibility needs exactly one of -enable and -disable")
	}
	if len(args) != 1 {
		return usagef("node eligibility needs exactly one node name")
	}
	n, err := e.client.SetEligibility(ctx, args[0], c.enable)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, n)
	}
	word := "eligible"
	if !n.Eligible {
		word = "ineligible"
	}
	fmt.Fprintf(e.stdout, "node %s: %s\n", n.Name, word)
	return nil
}
