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

// BalanceThreshold returns how much busier than the least busy node a
// node must be before the balancer moves anything from it, as a share of a
// node's CPUs (VMware DRS's threshold levels): conservative 0.20,
// aggressive 0.10. A move must then gain at least a quarter of it
// (BalanceMinGain), and must not leave the target that much busier than
// the source: the hysteresis that keeps measurement noise and small
// workloads from moving anything, and a move from being undone by the
// next. ok is false for an unknown mode.
func BalanceThreshold(mode string) (threshold float64, ok bool) {
	switch mode {
	case BalanceConservative:
		return 0.20, true
	case BalanceAggressive:
		return 0.10, true
	}
	return 0, false
}

// BalanceMinGain is the smallest gain a move must bring: how much less
// busy the busier of its two nodes is after it than the source before.
func BalanceMinGain(threshold float64) float64 { return threshold / 4 }

// CheckBalanceMode says why mode is not one the balancer knows.
func CheckBalanceMode(mode string) error {
	if mode == BalanceOff {
		return nil
	}
	if _, ok := BalanceThreshold(mode); !ok {
		return invalid("mode", "%.32q: want off, conservative or aggressive", mode)
	}
	return nil
}

// BalanceMeasureWait is how long the balancer waits for the use of a
// workload that started or moved: its node reports it from its second
// sample, seconds later. A workload still unmeasured after that (its node
// runs a pclusterd that does not measure, or cannot read it) counts as
// using nothing rather than holding every move in the cluster.
const BalanceMeasureWait = 30 * time.Second

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
// workload, as a share of the node's CPUs), and moves a workload from a
// node at least BalanceThreshold busier than the least busy node that may
// take work, to the least busy node that can take that workload:
//
//   - only a move that gains at least BalanceMinGain (the busier of the
//     two nodes after it is that much less busy than the source before),
//     never onto a node that would then be the busiest, and never one that
//     leaves the target BalanceThreshold busier than the source (the move
//     back would be due);
//   - at most one move per node at a time: a node that is the source or
//     the target of a migration in flight takes part in no other;
//   - never a workload moved (by anyone) less than Cooldown ago, one run
//     with -migrate never, one not running where it is placed, one that
//     uses no CPU;
//   - never from a node that is draining (the drain moves its workloads)
//     or not ready; never to a node placement would refuse (ineligible,
//     draining, not ready, constraints, VIPs, memory hint), whose free
//     memory is below the workload's RSS, or that is in exclude (the
//     leader's view of nodes it cannot reach);
//   - nothing while a running workload's use is not known yet (it started
//     or moved since its node's last sample, less than BalanceMeasureWait
//     ago): the loads would lie.
//
// Sources are tried busiest first, until one is within the threshold of
// the least busy; from each, the workload whose move gains most (ties to
// the oldest). Each node gives or takes at most one workload per round.
func PlanBalance(s *State, now time.Time, p BalanceParams, exclude map[string]string) (plan BalancePlan) {
	mode := s.Balance.Mode
	if mode == "" {
		mode = BalanceOff
	}
	threshold, ok := BalanceThreshold(mode)
	minGain := BalanceMinGain(threshold)
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
	// arrived: when each workload started or last moved to its node.
	arrived := map[string]int64{}
	for _, w := range s.Workloads {
		arrived[w.ID] = w.StartedAt
	}
	for _, m := range s.Migrations {
		if m.State == MigrationDone && m.EndedAt > arrived[m.WorkloadID] {
			arrived[m.WorkloadID] = m.EndedAt
		}
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
			if w.PID != 0 && !nl.n.Load.UseTrunc && nl.n.Status == NodeReady && now.Sub(time.Unix(0, arrived[w.ID])) < BalanceMeasureWait {
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
	// order: busiest first; asc: least busy first. Ties go by name in
	// both, so the result depends on the state alone.
	busier := func(a, b *nodeLoad) bool {
		if la, lb := load(a), load(b); la != lb {
			return la > lb
		}
		return a.n.Name < b.n.Name
	}
	lessBusy := func(a, b *nodeLoad) bool {
		if la, lb := load(a), load(b); la != lb {
			return la < lb
		}
		return a.n.Name < b.n.Name
	}
	sort.Slice(order, func(i, j int) bool { return busier(order[i], order[j]) })
	asc := append([]*nodeLoad(nil), order...)
	sort.Slice(asc, func(i, j int) bool { return lessBusy(asc[i], asc[j]) })
	// resort puts the two nodes of a move back in place in both orders:
	// O(nodes) per move where sorting again would cost O(nodes log nodes).
	resort := func(moved ...*nodeLoad) {
		for _, nl := range moved {
			order = reposition(order, nl, busier)
			asc = reposition(asc, nl, lessBusy)
		}
	}
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
	if len(order) < 2 {
		plan.Why = "fewer than two nodes"
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
	// mayTake: a node some workload could move to (constraints and
	// memory aside, checked per workload).
	mayTake := func(nl *nodeLoad) bool { return whyNode[nl.n.Name] == "" && nl.n.Eligible }
	at := now.UnixNano()
	var why []string
	for _, src := range append([]*nodeLoad(nil), order...) {
		if whyNode[src.n.Name] != "" {
			continue
		}
		srcBefore := load(src)
		var least *nodeLoad
		for _, o := range asc {
			if o != src && mayTake(o) {
				least = o
				break
			}
		}
		if least == nil {
			why = append(why, "no other node may take work now (see each node's note)")
			break
		}
		if d := srcBefore - load(least); d < threshold-1e-9 {
			why = append(why, fmt.Sprintf("node %s (%.2f) and the least busy %s (%.2f) differ by %.2f < %.2f (%s)",
				src.n.Name, srcBefore, least.n.Name, load(least), max(d, 0), threshold, mode))
			break // every other source is less busy
		}
		type cand struct {
			w    *Workload
			dst  *nodeLoad
			gain float64
		}
		var best *cand
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
			// The least busy node that can take it (least busy first).
			for _, dst := range asc {
				if dst == src || !mayTake(dst) {
					continue
				}
				if unfit(dst.n, PlacementRequest{Constraints: w.Constraints, Resources: w.Resources, VIP: w.VIP != ""}) != "" ||
					dst.n.LoadAt != 0 && dst.n.Load.MemFree < u.RSS {
					continue
				}
				srcAfter := (src.cores - wc) / src.cpus
				dstAfter := (dst.cores + wc) / dst.cpus
				others := srcAfter
				for _, o := range order { // busiest first: the first other is the max
					if o != src && o != dst {
						others = max(others, load(o))
						break
					}
				}
				switch {
				case dstAfter > others+1e-9:
					counts["too big for any target"]++ // it would be the busiest (a tie is not busier)
				case dstAfter-srcAfter >= threshold-1e-9:
					counts["too big for any target"]++ // the move back would be due
				default:
					c := cand{w: w, dst: dst, gain: srcBefore - max(srcAfter, dstAfter)}
					if best == nil || c.gain > best.gain+1e-9 {
						best = &c
					}
				}
				break
			}
		}
		var skipped []string
		for k, v := range counts {
			skipped = append(skipped, fmt.Sprintf("%d %s", v, k))
		}
		sort.Strings(skipped)
		if best == nil || best.gain < minGain-1e-9 {
			r := fmt.Sprintf("node %s (%.2f)", src.n.Name, srcBefore)
			if best == nil {
				r += ": no workload it may move"
			} else {
				r += fmt.Sprintf(": best move %s to %s (%.2f) gains %.2f < %.2f (%s)", best.w.ID, best.dst.n.Name, load(best.dst), best.gain, minGain, mode)
			}
			if len(skipped) > 0 {
				r += " (" + strings.Join(skipped, ", ") + ")"
			}
			why = append(why, r)
			continue
		}
		reason := fmt.Sprintf("balance (%s): node %s %.2f → %s %.2f, %s uses %dm CPU, gain %.2f ≥ %.2f",
			mode, src.n.Name, srcBefore, best.dst.n.Name, load(best.dst), best.w.ID, uses[best.w.ID].CPU, best.gain, minGain)
		plan.Commands = append(plan.Commands, Command{CmdMigrationPlan, &MigrationPlanCmd{WorkloadID: best.w.ID,
			Target: best.dst.n.Name, Reason: reason, At: at}})
		plan.Moves = append(plan.Moves, BalanceMove{Workload: best.w.ID, Source: src.n.Name, Target: best.dst.n.Name,
			Gain: best.gain, Reason: reason})
		wc := float64(uses[best.w.ID].CPU) / 1000
		src.cores -= wc
		best.dst.cores += wc
		whyNode[src.n.Name] = "moving " + best.w.ID + " to " + best.dst.n.Name
		whyNode[best.dst.n.Name] = "receiving " + best.w.ID + " from " + src.n.Name
		resort(src, best.dst)
	}
	if len(plan.Moves) == 0 {
		switch {
		case len(order) > 0 && whyNode[order[0].n.Name] != "":
			plan.Why = fmt.Sprintf("busiest node %s (%.2f): %s", order[0].n.Name, load(order[0]), whyNode[order[0].n.Name])
		case len(why) > 0:
			plan.Why = why[0]
		default:
			plan.Why = "no node may give a workload (see each node's reason)"
		}
	}
	return plan
}

// reposition moves nl to its place in s, which is sorted by before but
// for nl.
func reposition[T comparable](s []T, nl T, before func(a, b T) bool) []T {
	for i, x := range s {
		if x == nl {
			s = append(s[:i], s[i+1:]...)
			break
		}
	}
	j := sort.Search(len(s), func(k int) bool { return before(nl, s[k]) })
	s = append(s, nl)
	copy(s[j+1:], s[j:])
	s[j] = nl
	return s
}
