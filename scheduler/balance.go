package scheduler

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// Balancer modes. The mode lives in the raft state (BalanceSetCmd); a
// cluster that never set one is off: a daemon upgraded into a running
// cluster does not start moving processes by itself.
const (
	BalanceOff          = "off"
	BalanceConservative = "conservative"
	BalanceAggressive   = "aggressive"
)

// BalanceConfig is the balancer's setting in the raft state.
type BalanceConfig struct {
	Mode  string `msgpack:"mode"` // "" is off
	SetAt int64  `msgpack:"set_at"`
}

// BalanceMinGain returns the smallest gain a move must bring in a mode, as
// a share of a node's CPUs (VMware DRS's threshold levels): the busier of
// the two nodes after the move must be at least this much less busy than
// the source was before. It is the hysteresis that keeps measurement noise
// from moving anything: a move between two nodes whose loads differ by
// less than twice the gain never pays. ok is false for an unknown mode.
func BalanceMinGain(mode string) (gain float64, ok bool) {
	switch mode {
	case BalanceConservative:
		return 0.10, true
	case BalanceAggressive:
		return 0.05, true
	}
	return 0, false
}

// CheckBalanceMode says why mode is not one the balancer knows.
func CheckBalanceMode(mode string) error {
	if mode == BalanceOff {
		return nil
	}
	if _, ok := BalanceMinGain(mode); !ok {
		return invalid("mode", "%.32q: want off, conservative or aggressive", mode)
	}
	return nil
}

// DefaultBalanceCooldown is how long a workload the balancer (or anyone)
// moved stays where it is before the balancer moves it again.
const DefaultBalanceCooldown = 5 * time.Minute

// BalanceParams are the balancer's settings that are not in the state:
// they are the leader daemon's (pclusterd -balance-cooldown).
type BalanceParams struct {
	Cooldown time.Duration
}

// BalanceNode is one node as the balancer sees it.
type BalanceNode struct {
	Name    string
	Load    float64 // CPU used by its workloads, as a share of its CPUs
	CPU     uint32  // milli-cores used by all its workloads
	Movable uint32  // milli-cores used by the workloads the balancer may move
	RSS     uint64  // bytes used by its workloads
	Why     string  // why it takes part in no move ("" when it may)
}

// BalancePlan is what the balance planner proposes in one round: the
// migrations to plan, each with its reason, and when there are none, why.
type BalancePlan struct {
	Commands []Command
	Moves    []BalanceMove
	Nodes    []BalanceNode // by load, busiest first
	Why      string        // why nothing (more) moved
}

// BalanceMove is one move the planner chose.
type BalanceMove struct {
	Workload, Source, Target string
	Gain                     float64
	Reason                   string
}

// BalanceUses returns what each running workload uses, by ID, from the
// loads its node (or, just after a move, its former node) gossiped.
func BalanceUses(s *State) map[string]Use {
	out := map[string]Use{}
	for _, n := range s.SortedNodes() {
		for id, u := range n.Load.Use {
			w, ok := s.Workloads[id]
			if !ok {
				continue
			}
			if _, seen := out[id]; !seen || w.Node == n.Name {
				out[id] = u
			}
		}
	}
	return out
}

// PlanBalance is the balancing decision, a pure function of the state, the
// clock and the leader's settings, MOSIX-style: it compares the ready
// nodes by the CPU their own workloads use (Load.Use, measured per
// workload), and moves a workload from a busy node to a less busy one
// only when the move gains at least BalanceMinGain of the mode:
//
//   - at most one move per node at a time: a node that is the source or
//     the target of a migration in flight takes part in no other;
//   - never a workload moved (by anyone) less than Cooldown ago, one run
//     with -migrate never, one not running where it is placed, one whose
//     use is not measured;
//   - never from a node that is draining (the drain moves its workloads)
//     or not ready; never to a node placement would refuse (ineligible,
//     draining, not ready, constraints, VIPs, memory) or that is in
//     exclude (the leader's view of nodes it cannot reach);
//   - never onto a node that would then be the busiest;
//   - nothing while a running workload's use is not known yet (it started
//     or moved since its node's last sample): the loads would lie.
//
// Sources are tried busiest first; for each, the (workload, target) pair
// with the largest gain, ties to the less busy target, then by name.
func PlanBalance(s *State, now time.Time, p BalanceParams, exclude map[string]string) (plan BalancePlan) {
	mode := s.Balance.Mode
	if mode == "" {
		mode = BalanceOff
	}
	minGain, ok := BalanceMinGain(mode)
	uses := BalanceUses(s)
	type nodeLoad struct {
		n       *Node
		cores   float64 // milli-cores / 1000
		cpus    float64
		movable uint32
		rss     uint64
	}
	loads := map[string]*nodeLoad{}
	var unmeasured []string
	for _, n := range s.SortedNodes() {
		if n.Status == NodeDown {
			continue
		}
		nl := &nodeLoad{n: n, cpus: float64(max(n.Load.NumCPU, 1))}
		// The node's total less what it listed: workloads it did not list
		// (more than fit in its gossip) still count, those it listed count
		// where the state places them now.
		rest := int64(n.Load.WCPU)
		restRSS := int64(n.Load.WRSS)
		for _, u := range n.Load.Use {
			rest -= int64(u.CPU)
			restRSS -= int64(u.RSS)
		}
		nl.cores = float64(max(rest, 0)) / 1000
		nl.rss = uint64(max(restRSS, 0))
		loads[n.Name] = nl
	}
	onNode := map[string][]*Workload{} // running workloads by node, oldest first
	for _, w := range s.SortedWorkloads() {
		nl := loads[w.Node]
		if w.State != StateRunning || nl == nil {
			continue
		}
		onNode[w.Node] = append(onNode[w.Node], w)
		u, ok := uses[w.ID]
		if !ok {
			if w.PID != 0 && !nl.n.Load.UseTrunc && nl.n.Status == NodeReady {
				unmeasured = append(unmeasured, w.ID+" on "+w.Node)
			}
			continue
		}
		nl.cores += float64(u.CPU) / 1000
		nl.rss += u.RSS
		if w.Migrate != MigrateNever {
			nl.movable += u.CPU
		}
	}
	load := func(nl *nodeLoad) float64 { return nl.cores / nl.cpus }

	// Who is busy now: migrations in flight, and the workloads in cool-down.
	busyNode := map[string]string{}
	busyWorkload := map[string]bool{}
	cooling := map[string]bool{}
	for _, m := range s.Migrations {
		if m.State.Active() {
			busyWorkload[m.WorkloadID] = true
			busyNode[m.Source] = "migration " + m.ID + " in flight"
			busyNode[m.Target] = "migration " + m.ID + " in flight"
		}
		if p.Cooldown > 0 && now.Sub(time.Unix(0, m.PlannedAt)) < p.Cooldown {
			cooling[m.WorkloadID] = true
		}
	}

	order := make([]*nodeLoad, 0, len(loads))
	for _, nl := range loads {
		order = append(order, nl)
	}
	byLoad := func() {
		sort.Slice(order, func(i, j int) bool {
			li, lj := load(order[i]), load(order[j])
			if li != lj {
				return li > lj
			}
			return order[i].n.Name < order[j].n.Name
		})
	}
	byLoad()
	whyNode := map[string]string{}
	// Nodes is filled at the end, whichever return: plan is named.
	defer func() {
		for _, nl := range order {
			plan.Nodes = append(plan.Nodes, BalanceNode{Name: nl.n.Name, Load: load(nl), CPU: uint32(nl.cores*1000 + 0.5),
				Movable: nl.movable, RSS: nl.rss, Why: whyNode[nl.n.Name]})
		}
	}()
	if !ok {
		plan.Why = "mode " + mode
		return plan
	}
	if len(unmeasured) > 0 {
		plan.Why = "waiting for the use of workload " + strings.Join(unmeasured, ", ") + " (started or moved since its node's last sample)"
		return plan
	}
	// Why each node can be no source, and no target.
	for _, nl := range order {
		n := nl.n
		switch {
		case n.Status != NodeReady:
			whyNode[n.Name] = "node is " + string(n.Status)
		case n.Drain.Draining():
			whyNode[n.Name] = "node is draining"
		case busyNode[n.Name] != "":
			whyNode[n.Name] = busyNode[n.Name]
		case exclude[n.Name] != "":
			whyNode[n.Name] = "node " + exclude[n.Name]
		}
	}
	at := now.UnixNano()
	var why []string
	for _, src := range append([]*nodeLoad(nil), order...) {
		if whyNode[src.n.Name] != "" {
			continue
		}
		srcBefore := load(src)
		type cand struct {
			w      *Workload
			dst    *nodeLoad
			gain   float64
			dstNow float64
		}
		var best *cand
		var skipped []string
		counts := map[string]int{}
		for _, w := range onNode[src.n.Name] {
			switch {
			case w.Migrate == MigrateNever:
				counts["-migrate never"]++
				continue
			case busyWorkload[w.ID] || w.DesiredNode != w.Node || w.Desired != DesiredRunning:
				counts["moving, restarting or stopping"]++
				continue
			case cooling[w.ID]:
				counts["in cool-down"]++
				continue
			}
			u := uses[w.ID]
			if u.CPU == 0 {
				counts["idle"]++
				continue
			}
			wc := float64(u.CPU) / 1000
			for _, dst := range order {
				if dst == src || whyNode[dst.n.Name] != "" {
					continue
				}
				if reason := unfit(dst.n, PlacementRequest{Constraints: w.Constraints, Resources: w.Resources, VIP: w.VIP != ""}); reason != "" {
					continue
				}
				if dst.n.LoadAt != 0 && dst.n.Load.MemFree < u.RSS {
					continue
				}
				srcAfter := (src.cores - wc) / src.cpus
				dstAfter := (dst.cores + wc) / dst.cpus
				// Never onto a node that would then be the busiest (tied is
				// not busier).
				others := srcAfter
				for _, o := range order { // busiest first: the first other is the max
					if o != src && o != dst {
						others = max(others, load(o))
						break
					}
				}
				if dstAfter > others+1e-9 {
					continue
				}
				gain := srcBefore - max(srcAfter, dstAfter)
				c := cand{w: w, dst: dst, gain: gain, dstNow: load(dst)}
				if best == nil || c.gain > best.gain+1e-9 ||
					(c.gain > best.gain-1e-9 && (c.dstNow < best.dstNow || c.dstNow == best.dstNow && c.dst.n.Name < best.dst.n.Name)) {
					best = &c
				}
			}
		}
		for k, v := range counts {
			skipped = append(skipped, fmt.Sprintf("%d %s", v, k))
		}
		sort.Strings(skipped)
		if best == nil || best.gain < minGain-1e-9 {
			r := fmt.Sprintf("node %s (%.2f)", src.n.Name, srcBefore)
			switch {
			case best == nil && len(skipped) > 0:
				r += ": no move that leaves the target less busy than the busiest (" + strings.Join(skipped, ", ") + " not moved)"
			case best == nil:
				r += ": no move that leaves the target less busy than the busiest"
			default:
				r += fmt.Sprintf(": best move %s to %s (%.2f) gains %.2f < %.2f (%s)", best.w.ID, best.dst.n.Name, best.dstNow, best.gain, minGain, mode)
			}
			why = append(why, r)
			continue
		}
		reason := fmt.Sprintf("balance (%s): node %s %.2f → %s %.2f, %s uses %dm CPU, gain %.2f ≥ %.2f",
			mode, src.n.Name, srcBefore, best.dst.n.Name, best.dstNow, best.w.ID, uses[best.w.ID].CPU, best.gain, minGain)
		plan.Commands = append(plan.Commands, Command{CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: best.w.ID,
			Target: best.dst.n.Name, Reason: reason, At: at}})
		plan.Moves = append(plan.Moves, BalanceMove{Workload: best.w.ID, Source: src.n.Name, Target: best.dst.n.Name,
			Gain: best.gain, Reason: reason})
		wc := float64(uses[best.w.ID].CPU) / 1000
		src.cores -= wc
		best.dst.cores += wc
		whyNode[src.n.Name] = "moving " + best.w.ID + " to " + best.dst.n.Name
		whyNode[best.dst.n.Name] = "receiving " + best.w.ID + " from " + src.n.Name
		byLoad()
	}
	if len(plan.Moves) == 0 {
		switch {
		case len(order) > 0 && whyNode[order[0].n.Name] != "":
			plan.Why = fmt.Sprintf("busiest node %s (%.2f): %s", order[0].n.Name, load(order[0]), whyNode[order[0].n.Name])
		case len(why) > 0:
			plan.Why = why[0]
		case len(order) < 2:
			plan.Why = "fewer than two nodes"
		default:
			plan.Why = "no node may give a workload (see each node's reason)"
		}
	}
	return plan
}
