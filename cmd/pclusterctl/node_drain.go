package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// nodeDrainCmd moves every workload off a node (Nomad's `node drain`, with
// migrations where Nomad restarts). The drain lives in the raft state: the
// leader carries it out, this command only starts it and follows it.
// `drain NODE` is the same command under a shorter name.
type nodeDrainCmd struct {
	short bool // named "drain"

	deadline       time.Duration
	force          bool
	noDeadline     bool
	detach         bool
	disable        bool
	keepIneligible bool
	maxParallel    int
	fs             *flag.FlagSet
}

func (c *nodeDrainCmd) name() string {
	if c.short {
		return "drain"
	}
	return "node drain"
}

func (c *nodeDrainCmd) synopsis() string {
	return c.name() + " [-deadline 1h|-no-deadline|-force] [-max-parallel N] [-detach] [-disable] [-keep-ineligible] NODE   move every workload off NODE"
}

func (c *nodeDrainCmd) flags(fs *flag.FlagSet) {
	c.fs = fs
	fs.DurationVar(&c.deadline, "deadline", 0, "stop the workloads still on the node this long after the start (default 1h)")
	fs.BoolVar(&c.force, "force", false, "deadline now: stop every workload still on the node")
	fs.BoolVar(&c.noDeadline, "no-deadline", false, "never stop workloads: wait until each has moved")
	fs.BoolVar(&c.detach, "detach", false, "return once the drain is recorded (drain NODE again, or node status NODE, to follow it)")
	fs.BoolVar(&c.disable, "disable", false, "cancel the drain in progress (the node becomes eligible again unless -keep-ineligible)")
	fs.BoolVar(&c.keepIneligible, "keep-ineligible", false, "with -disable, or when the drain is cancelled later: leave the node ineligible")
	fs.IntVar(&c.maxParallel, "max-parallel", 0, "move at most `N` workloads at a time (default 1)")
}

// drainPoll is how often the foreground command reads the drain.
const drainPoll = 200 * time.Millisecond

func (c *nodeDrainCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("%s needs exactly one node name", c.name())
	}
	name := args[0]
	set := map[string]bool{}
	c.fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if n := btoi(set["deadline"]) + btoi(c.force) + btoi(c.noDeadline); n > 1 {
		return usagef("give at most one of -deadline, -no-deadline and -force")
	}
	if c.disable && (set["deadline"] || c.force || c.noDeadline || set["max-parallel"]) {
		return usagef("-disable cancels the drain: it takes no -deadline, -no-deadline, -force or -max-parallel")
	}
	if set["deadline"] && c.deadline <= 0 {
		return usagef("-deadline %v: want a positive duration", c.deadline)
	}
	if set["max-parallel"] && c.maxParallel < 1 {
		return usagef("-max-parallel %d: want 1 or more", c.maxParallel)
	}
	// Without flags, a drain in progress is followed, not restarted: its
	// deadline stays.
	n, err := e.client.Node(ctx, name)
	if err != nil {
		return err
	}
	if !onlyConn(set) || n.Drain == nil || !n.Drain.CompletedAt.IsZero() {
		n, err = e.client.Drain(ctx, name, api.DrainRequest{Deadline: c.deadline, NoDeadline: c.noDeadline, Force: c.force,
			MaxParallel: c.maxParallel, KeepIneligible: c.keepIneligible, Disable: c.disable})
		if err != nil {
			return err
		}
	}
	if c.disable {
		if e.json {
			return printJSON(e.stdout, n)
		}
		word := "eligible"
		if !n.Eligible {
			word = "ineligible"
		}
		fmt.Fprintf(e.stdout, "node %s: drain cancelled, %s\n", shown(n.Name), word)
		return nil
	}
	if c.detach {
		if e.json {
			return printJSON(e.stdout, n)
		}
		fmt.Fprintf(e.stdout, "node %s: draining (pclusterctl drain %s or node status %s to follow it)\n", shown(n.Name), shown(n.Name), shown(n.Name))
		printDrain(e.stdout, n.Drain)
		return nil
	}
	return c.follow(ctx, e, n)
}

// onlyConn reports whether the flags set are only the connection and
// output ones every command takes.
func onlyConn(set map[string]bool) bool {
	for f := range set {
		if f != "address" && f != "key-file" && f != "json" {
			return false
		}
	}
	return true
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// follow prints a line per workload moved off the node until the drain
// completes (nil), is cancelled, or leaves only workloads it cannot move
// (an error naming them).
func (c *nodeDrainCmd) follow(ctx context.Context, e *env, n api.Node) error {
	name := n.Name
	if !e.json {
		fmt.Fprintf(e.stdout, "node %s: draining\n", shown(name))
	}
	printed := map[string]bool{}
	var last api.Node
	for {
		if n.Drain == nil {
			return fmt.Errorf("drain of node %s cancelled", name)
		}
		ms, err := e.client.Migrations(ctx, true)
		if err != nil && !api.IsUnavailable(err) {
			return err
		}
		if err == nil && !e.json {
			printMoves(e.stdout, name, n.Drain.StartedAt, ms, printed)
		}
		for _, r := range n.Drain.Restarted {
			if !printed[r] && !e.json {
				printed[r] = true
				fmt.Fprintf(e.stdout, "restarted %s from its command: it could not be moved\n", shown(r))
			}
		}
		d := n.Drain
		if !d.CompletedAt.IsZero() {
			if e.json {
				return printJSON(e.stdout, n)
			}
			word := "ineligible"
			if n.Eligible {
				word = "eligible"
			}
			fmt.Fprintf(e.stdout, "node %s drained in %v: %d moved, %d failed moves; %s\n", shown(name),
				d.CompletedAt.Sub(d.StartedAt).Round(time.Millisecond), d.Moved, len(d.Failed), word)
			return nil
		}
		if len(d.Stuck) > 0 && d.InFlight == 0 && d.Remaining == len(d.Stuck) {
			if e.json {
				_ = printJSON(e.stdout, n)
			} else {
				for _, s := range d.Stuck {
					fmt.Fprintf(e.stdout, "cannot move %s\n", shown(s))
				}
			}
			return fmt.Errorf("drain of node %s: %d of its workloads cannot be moved; they stay until stopped (at the latest by the deadline, or -force)",
				name, len(d.Stuck))
		}
		last = n
		select {
		case <-ctx.Done():
			return fmt.Errorf("drain of node %s: interrupted, it goes on (pclusterctl drain %s to follow it)", name, name)
		case <-time.After(drainPoll):
		}
		n, err = e.client.Node(ctx, name)
		if err != nil {
			if api.IsUnavailable(err) {
				n = last // no leader for a moment: the state decides, ask again
				continue
			}
			return err
		}
	}
}

// printMoves prints, once each, the migrations out of node since the drain
// started that are done.
func printMoves(w io.Writer, node string, since time.Time, ms []api.Migration, printed map[string]bool) {
	for _, m := range ms {
		if m.Source != node || m.PlannedAt.Before(since) || m.State != "done" || printed[m.ID] {
			continue
		}
		printed[m.ID] = true
		label := shown(m.Workload)
		if m.Name != "" {
			label += " (" + shown(m.Name) + ")"
		}
		fmt.Fprintf(w, "moved %s to %s: %s, process stopped %s%s\n", label, shown(m.Target), bytesHuman(uint64(m.Bytes)),
			stoppedFor(m), precopied(m))
	}
}
