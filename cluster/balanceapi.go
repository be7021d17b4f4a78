package cluster

import (
	"net/http"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// handleBalance answers the balancer's status: the mode from the state,
// the rest from this node's Balancer (the leader's: reads are forwarded
// there).
func (s *Server) handleBalance(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, s.balanceStatus())
}

// handleBalanceSet sets the balancer's mode in the state; the next round
// (at once) plays by it.
func (s *Server) handleBalanceSet(w http.ResponseWriter, r *http.Request) {
	var req api.BalanceRequest
	if err := decodeBody(w, r, "balance set", &req); err != nil {
		writeErr(w, err)
		return
	}
	if err := scheduler.CheckBalanceMode(req.Mode); err != nil {
		writeErr(w, badRequest("balance set: field %s", err))
		return
	}
	if _, err := s.apply(scheduler.CmdBalanceSet, &scheduler.BalanceSetCmd{Mode: req.Mode, At: time.Now().UnixNano()}); err != nil {
		writeErr(w, err)
		return
	}
	s.log.Info("balance mode set", "mode", req.Mode)
	writeJSON(w, s.balanceStatus())
}

func (s *Server) balanceStatus() api.BalanceStatus {
	st := api.BalanceStatus{Interval: s.cfg.BalanceInterval, Cooldown: s.cfg.BalanceCooldown, Leader: s.cfg.Name,
		Nodes: []api.BalanceNode{}, Decisions: []api.BalanceDecision{}}
	s.fsm.Read(func(state *scheduler.State) {
		st.Mode, st.SetAt = state.Balance.Mode, unixTime(state.Balance.SetAt)
	})
	if st.Mode == "" {
		st.Mode = scheduler.BalanceOff
	}
	if th, ok := scheduler.BalanceThreshold(st.Mode); ok {
		st.Threshold, st.MinGain = th, scheduler.BalanceMinGain(th)
	}
	s.balancer.Status(&st)
	return st
}
