package cluster

import (
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are one server's Prometheus metrics, in a registry of its own so
// several servers can share a process (tests, benchmarks).
type metrics struct {
	s             *Server
	reg           *prometheus.Registry
	members       prometheus.Gauge
	isLeader      prometheus.Gauge
	leaderChanges prometheus.Counter
	workloads     *prometheus.GaugeVec
	applyLatency  prometheus.Histogram
}

func newMetrics(s *Server) *metrics {
	m := &metrics{
		s:   s,
		reg: prometheus.NewRegistry(),
		members: prometheus.NewGauge(prometheus.GaugeOpts{Name: "pcluster_members",
			Help: "Live gossip members seen by this node."}),
		isLeader: prometheus.NewGauge(prometheus.GaugeOpts{Name: "pcluster_is_leader",
			Help: "1 if this node is the raft leader."}),
		leaderChanges: prometheus.NewCounter(prometheus.CounterOpts{Name: "pcluster_leader_changes_total",
			Help: "Times this node gained or lost raft leadership."}),
		workloads: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "pcluster_workloads",
			Help: "Workloads in the replicated state, by state."}, []string{"state"}),
		applyLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "pcluster_raft_apply_seconds",
			Help: "Time from raft Apply to commit on this leader.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
	}
	balance := func(moves bool) func() float64 {
		return func() float64 {
			if s.balancer == nil {
				return 0
			}
			var st api.BalanceStatus
			s.balancer.Status(&st)
			if moves {
				return float64(st.Moves)
			}
			return float64(st.Rounds)
		}
	}
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pcluster_balance_rounds_total",
		Help: "Balancer rounds this node ran while it led."}, balance(false)),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "pcluster_balance_moves_total",
			Help: "Migrations the balancer planned on this node while it led."}, balance(true)))
	m.reg.MustRegister(m.members, m.isLeader, m.leaderChanges, m.workloads, m.applyLatency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// update refreshes the gauges; called by the leader loop.
func (m *metrics) update() {
	m.members.Set(float64(m.s.ml.NumMembers()))
	if m.s.IsLeader() {
		m.isLeader.Set(1)
	} else {
		m.isLeader.Set(0)
	}
	counts := map[scheduler.WorkloadState]int{scheduler.StatePending: 0, scheduler.StateRunning: 0,
		scheduler.StateExited: 0, scheduler.StateFailed: 0, scheduler.StateStopped: 0, scheduler.StateLost: 0}
	m.s.fsm.Read(func(st *scheduler.State) {
		for _, w := range st.Workloads {
			counts[w.State]++
		}
	})
	for st, n := range counts {
		m.workloads.WithLabelValues(string(st)).Set(float64(n))
	}
}
