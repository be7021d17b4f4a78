package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// Applier is all the leader's planners need from raft (Nomad's drainer
// depends on a two-method RaftApplier the same way): commit one command,
// and read the replicated state. Server.Applier gives the leader's; tests
// give an FSM directly.
type Applier interface {
	// Apply commits one command and returns the FSM's result, or its
	// refusal (a scheduler error), or raft's failure.
	Apply(t scheduler.CommandType, cmd any) (any, error)
	// Read calls fn with the state under a read lock; fn keeps nothing.
	Read(fn func(*scheduler.State))
}

// Applier returns this server's way to raft for planners. Apply fails with
// "not the leader" on a follower.
func (s *Server) Applier() Applier { return serverApplier{s} }

type serverApplier struct{ s *Server }

func (a serverApplier) Apply(t scheduler.CommandType, cmd any) (any, error) { return a.s.apply(t, cmd) }
func (a serverApplier) Read(fn func(*scheduler.State))                      { a.s.fsm.Read(fn) }

// Drainer carries the drains recorded in the state forward, a round at a
// time: scheduler.PlanDrain decides from the state, the Drainer applies.
// It keeps nothing between rounds, so a new leader's Drainer carries on
// any drain where the old one left it. The leader runs a round on every
// tick of its loop (leaderLoop); the agents carry out the migrations it
// plans (node/migrate.go).
type Drainer struct {
	a       Applier
	exclude func(*scheduler.State) map[string]string
	log     *slog.Logger
}

// NewDrainer returns a Drainer applying through a. exclude, if not nil,
// lists the nodes no migration may go to now, with the reason (the
// leader's Server.unreachable: nodes gossip no longer sees or raft fails to
// heartbeat); it is called under the state's read lock.
func NewDrainer(a Applier, exclude func(*scheduler.State) map[string]string, log *slog.Logger) *Drainer {
	if log == nil {
		log = slog.Default()
	}
	return &Drainer{a: a, exclude: exclude, log: log}
}

// DrainRound is what one round did.
type DrainRound struct {
	Applied []scheduler.Command
	// Refused holds the commands the state refused because it changed
	// between the plan and the apply (an agent's step, an operator's
	// write); the next round decides again.
	Refused []error
	Blocked []scheduler.DrainBlocked
}

// refusal reports whether err is the FSM refusing a command, as opposed to
// raft failing to commit it.
func refusal(err error) bool {
	for _, e := range []error{scheduler.ErrRefused, scheduler.ErrStale, scheduler.ErrNotFound, scheduler.ErrInvalid,
		scheduler.ErrExists, scheduler.ErrNoNode} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Round plans at now and applies the plan, in order. It stops at the first
// failure of raft itself (not the leader, no quorum), returning it.
func (d *Drainer) Round(now time.Time) (DrainRound, error) {
	var plan scheduler.DrainPlan
	d.a.Read(func(s *scheduler.State) {
		var ex map[string]string
		if d.exclude != nil {
			ex = d.exclude(s)
		}
		plan = scheduler.PlanDrain(s, now, ex)
	})
	r := DrainRound{Blocked: plan.Blocked}
	for _, b := range plan.Blocked {
		d.log.Warn("drain: no node can take workload", "node", b.Node, "workload", b.Workload, "why", b.Why)
	}
	for _, c := range plan.Commands {
		_, err := d.a.Apply(c.Type, c.Payload)
		switch {
		case err == nil:
			r.Applied = append(r.Applied, c)
			d.log.Info("drain", "applied", c.Type.String())
		case refusal(err):
			r.Refused = append(r.Refused, err)
			d.log.Info("drain: state changed meanwhile", "command", c.Type.String(), "err", err)
		default:
			return r, fmt.Errorf("drain round: %s: %w", c.Type, err)
		}
	}
	return r, nil
}
