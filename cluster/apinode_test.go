package cluster

import (
	"reflect"
	"testing"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// TestAPIDrain: a node's drain as the API shows it counts the migrations
// out of the node since the drain started: done ones moved, active ones in
// flight, aborted ones failed with their reason; the active workloads
// still placed there remain.
func TestAPIDrain(t *testing.T) {
	st := scheduler.NewState()
	st.Nodes["n1"] = &scheduler.Node{Name: "n1", Status: scheduler.NodeReady,
		Drain: &scheduler.DrainSpec{StartedAt: 100, Deadline: 200, MaxParallel: 2}}
	st.Nodes["n2"] = &scheduler.Node{Name: "n2", Status: scheduler.NodeReady}
	for _, w := range []*scheduler.Workload{
		{ID: "w1", Node: "n2", DesiredNode: "n2", State: scheduler.StateRunning},
		{ID: "w2", Node: "n1", DesiredNode: "n1", State: scheduler.StateRunning},
		{ID: "w3", Node: "n1", DesiredNode: "n1", State: scheduler.StateRunning},
		{ID: "w4", Node: "n1", DesiredNode: "n1", State: scheduler.StateExited},
	} {
		st.Workloads[w.ID] = w
	}
	for _, m := range []*scheduler.Migration{
		{ID: "m1", WorkloadID: "w1", Source: "n1", Target: "n2", State: scheduler.MigrationDone, PlannedAt: 150, PlanIndex: 1},
		{ID: "m2", WorkloadID: "w2", Source: "n1", Target: "n3", State: scheduler.MigrationAborted, Error: "node n3 down", PlannedAt: 160, PlanIndex: 2},
		{ID: "m3", WorkloadID: "w3", Source: "n1", Target: "n2", State: scheduler.MigrationTransferring, PlannedAt: 170, PlanIndex: 3},
		{ID: "m0", WorkloadID: "w2", Source: "n1", Target: "n2", State: scheduler.MigrationAborted, Error: "before", PlannedAt: 50},
		{ID: "m9", WorkloadID: "w9", Source: "n2", Target: "n1", State: scheduler.MigrationDone, PlannedAt: 180},
	} {
		st.Migrations[m.ID] = m
	}
	d := apiNode(st, st.Nodes["n1"]).Drain
	if d == nil {
		t.Fatal("no drain in the API's node")
	}
	if d.Moved != 1 || d.InFlight != 1 || d.Remaining != 2 || !reflect.DeepEqual(d.Failed, []string{"w2: node n3 down"}) {
		t.Errorf("got moved %d in flight %d remaining %d failed %q; want 1 1 2 [w2: node n3 down]", d.Moved, d.InFlight, d.Remaining, d.Failed)
	}
	if !d.StartedAt.Equal(time.Unix(0, 100)) || !d.Deadline.Equal(time.Unix(0, 200)) || d.MaxParallel != 2 || !d.CompletedAt.IsZero() {
		t.Errorf("spec: got %+v", d)
	}
	if apiNode(st, st.Nodes["n2"]).Drain != nil {
		t.Error("a node without a drain shows one")
	}
}
