package main

import (
	"context"
	"flag"
	"fmt"
	"strconv"
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
	uid, gid    string
}

// idOrName splits a -uid/-gid value into a number (range-checked by the
// daemon) or a name (resolved on the node that runs the workload): digits
// alone, with an optional sign (so that -7 is refused as out of range, not
// looked up), are a number; anything else is a name, such as "3com".
func idOrName(flagName, v string) (*int64, string, error) {
	if v == "" {
		return nil, "", nil
	}
	digits := strings.TrimLeft(v, "+-")
	if len(v)-len(digits) <= 1 && digits != "" && strings.Trim(digits, "0123456789") == "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, "", usagef("-%s %s: not a number in 0..4294967294 nor a name", flagName, v)
		}
		return &n, "", nil
	}
	return nil, v, nil
}

func (*runCmd) name() string { return "run" }
func (*runCmd) synopsis() string {
	return "run [flags] -- CMD ARGS…  start a workload on the chosen node"
}

func (c *runCmd) flags(fs *flag.FlagSet) {
	c.labels, c.constraints = kvFlag{}, kvFlag{}
	fs.StringVar(&c.req.Name, "name", "", "workload `name` (default: the command's base name)")
	fs.StringVar(&c.req.Node, "node", "", "run on this `node` only")
	fs.StringVar(&c.req.VIP, "vip", "", "virtual `IP[/PREFIX]` that follows the workload (IPv4; the prefix names its subnet)")
	fs.Var(c.labels, "label", "workload label `key=value` (repeatable)")
	fs.Var(c.constraints, "constraint", "node label `key=value` the node must have (repeatable)")
	fs.Var(&c.env, "env", "environment `KEY=VALUE` (repeatable)")
	fs.StringVar(&c.req.Cwd, "cwd", "", "working `directory`")
	fs.StringVar(&c.uid, "uid", "", "run as `user` (a uid or a name), with its groups from the node's user database (default: the daemon's user)")
	fs.StringVar(&c.gid, "gid", "", "with this primary `group` (a gid or a name; default: the user's primary group)")
	fs.StringVar(&c.req.Migrate, "migrate", "", "`never`: the balancer must not move the workload (drains and pclusterctl migrate still may)")
	fs.StringVar(&c.req.Fence, "fence", "", "`freeze` or off: whether a node cut off from the cluster's majority freezes the workload before a failover could run it elsewhere (default: as its checkpoint policies say, else freeze)")
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
	var err error
	if c.req.UID, c.req.User, err = idOrName("uid", c.uid); err != nil {
		return err
	}
	if c.req.GID, c.req.Group, err = idOrName("gid", c.gid); err != nil {
		return err
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
