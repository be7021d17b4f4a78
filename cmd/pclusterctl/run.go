package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/pcluster/pcluster/cluster/api"
)

// kvFlag collects repeated -flag k=v.
type kvFlag map[string]string

func (l kvFlag) String() string { return "" }
func (l kvFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q: want KEY=VALUE", v)
	}
	l[k] = val
	return nil
}

// listFlag collects repeated -env K=V.
type listFlag []string

func (l *listFlag) String() string { return "" }
func (l *listFlag) Set(v string) error {
	if !strings.Contains(v, "=") {
		return fmt.Errorf("%q: want KEY=VALUE", v)
	}
	*l = append(*l, v)
	return nil
}

type runCmd struct {
	req         api.RunRequest
	labels      kvFlag
	constraints kvFlag
	env         listFlag
	uid, gid    int
}

func (*runCmd) name() string { return "run" }
func (*runCmd) synopsis() string {
	return "run [flags] -- CMD ARGS…  start a workload on the chosen node"
}

func (c *runCmd) flags(fs *flag.FlagSet) {
	c.labels, c.constraints = kvFlag{}, kvFlag{}
	fs.StringVar(&c.req.Name, "name", "", "workload `name` (default: the command's base name)")
	fs.StringVar(&c.req.Node, "node", "", "run on this `node` only")
	fs.StringVar(&c.req.VIP, "vip", "", "virtual `IP` that follows the workload")
	fs.Var(c.labels, "label", "workload label `key=value` (repeatable)")
	fs.Var(c.constraints, "constraint", "node label `key=value` the node must have (repeatable)")
	fs.Var(&c.env, "env", "environment `KEY=VALUE` (repeatable)")
	fs.StringVar(&c.req.Cwd, "cwd", "", "working `directory`")
	fs.IntVar(&c.uid, "uid", -1, "run as `uid` (default: the daemon's)")
	fs.IntVar(&c.gid, "gid", -1, "run as `gid` (default: the daemon's)")
	fs.StringVar(&c.req.Restart, "restart", "never", "restart `policy`: never, on-failure or always")
	fs.IntVar(&c.req.MaxRestarts, "max-restarts", 0, "stop restarting after `N` restarts (0: no bound)")
	fs.Uint64Var(&c.req.MemoryMB, "memory", 0, "memory hint in `MB` for placement")
}

func (c *runCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("run needs a command: pclusterctl run [flags] -- CMD ARGS…")
	}
	c.req.Command, c.req.Args = args[0], args[1:]
	c.req.Labels, c.req.Constraints, c.req.Env = c.labels, c.constraints, c.env
	if c.uid >= 0 {
		c.req.UID = &c.uid
	}
	if c.gid >= 0 {
		c.req.GID = &c.gid
	}
	w, err := e.client.Run(ctx, c.req)
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, w)
	}
	fmt.Fprintf(e.stdout, "%s placed on %s\n", w.ID, w.DesiredNode)
	return nil
}
