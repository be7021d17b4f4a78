package cluster

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// DefaultBalanceInterval is how often the leader's balancer runs a round.
const DefaultBalanceInterval = 10 * time.Second

// maxBalanceDecisions is how many decisions the balancer remembers for
// `balance status`.
const maxBalanceDecisions = 32

// Balancer moves workloads from busy nodes to less busy ones, a round at a
// time: scheduler.PlanBalance decides from the state (the mode is there),
// the Balancer applies the migrations it plans; the agents carry them out
// as any other (node/migrate.go). Between rounds it keeps only what
// `balance status` shows: the last round's view of the nodes and the last
// decisions this node took while it led, which another leader does not
// have.
type Balancer struct {
	a       Applier
	exclude func(*scheduler.State) map[string]string
	params  scheduler.BalanceParams
	log     *slog.Logger

	// mu guards nodes, decisions and rounds, read by Status.
	mu        sync.Mutex
	nodes     []scheduler.BalanceNode
	decisions []api.BalanceDecision // oldest first
	rounds    int
	moves     int
}

// NewBalancer returns a Balancer applying through a; exclude is as for
// NewDrainer.
func NewBalancer(a Applier, exclude func(*scheduler.State) map[string]string, params scheduler.BalanceParams, log *slog.Logger) *Balancer {
	if log == nil {
		log = slog.Default()
	}
	return &Balancer{a: a, exclude: exclude, params: params, log: log}
}

// Round plans at now and applies the plan. It stops at the first failure
// of raft itself (not the leader, no quorum), returning it; a plan the
// state refuses (it changed meanwhile) is recorded and decided again
// next round.
func (b *Balancer) Round(now time.Time) ([]scheduler.BalanceMove, error) {
	var plan scheduler.BalancePlan
	b.a.Read(func(s *scheduler.State) {
		var ex map[string]string
		if b.exclude != nil {
			ex = b.exclude(s)
		}
		plan = scheduler.PlanBalance(s, now, b.params, ex)
	})
	var moved []scheduler.BalanceMove
	var failed error
	var notes []api.BalanceDecision
	for i, c := range plan.Commands {
		mv := plan.Moves[i]
		res, err := b.a.Apply(c.Type, c.Payload)
		d := api.BalanceDecision{At: now, Kind: api.BalanceMoved, Workload: mv.Workload, Source: mv.Source, Target: mv.Target,
			Reason: mv.Reason, Rounds: 1}
		switch {
		case err == nil:
			if m, ok := res.(scheduler.Migration); ok {
				d.Migration = m.ID
			}
			moved = append(moved, mv)
			b.log.Info("balance: moving workload", "workload", mv.Workload, "from", mv.Source, "to", mv.Target, "migration", d.Migration, "reason", mv.Reason)
		case refusal(err):
			d.Kind, d.Reason = api.BalanceRefused, mv.Reason+": refused: "+err.Error()
			b.log.Info("balance: state changed meanwhile", "workload", mv.Workload, "err", err)
		default:
			failed = fmt.Errorf("balance round: %s: %w", c.Type, err)
		}
		if failed != nil {
			break
		}
		notes = append(notes, d)
	}
	if len(plan.Commands) == 0 {
		notes = append(notes, api.BalanceDecision{At: now, Kind: api.BalanceHeld, Reason: plan.Why, Rounds: 1})
	}
	b.mu.Lock()
	b.rounds++
	b.moves += len(moved)
	b.nodes = plan.Nodes
	for _, d := range notes {
		// Rounds that moved nothing make one entry: the first time, how
		// many rounds, and the latest reason.
		if k := len(b.decisions); d.Kind == api.BalanceHeld && k > 0 && b.decisions[k-1].Kind == api.BalanceHeld {
			last := &b.decisions[k-1]
			last.Rounds++
			last.Reason, last.Last = d.Reason, d.At
			continue
		}
		b.decisions = append(b.decisions, d)
		if len(b.decisions) > maxBalanceDecisions {
			b.decisions = b.decisions[len(b.decisions)-maxBalanceDecisions:]
		}
	}
	b.mu.Unlock()
	return moved, failed
}

// Status fills in what the balancer knows: its rounds and moves, the last
// round's nodes and the last decisions.
func (b *Balancer) Status(st *api.BalanceStatus) {
	b.mu.Lock()
	defer b.mu.Unlock()
	st.Rounds, st.Moves = b.rounds, b.moves
	for _, n := range b.nodes {
		st.Nodes = append(st.Nodes, api.BalanceNode{Name: n.Name, Load: n.Load, CPUMilli: n.CPU, MovableMilli: n.Movable,
			RSS: n.RSS, Why: n.Why})
	}
	st.Decisions = append([]api.BalanceDecision(nil), b.decisions...)
}
