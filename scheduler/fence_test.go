package scheduler

import "testing"

func TestFenceApplies(t *testing.T) {
	held := func(holders ...string) map[string]*WorkloadCheckpoints {
		return map[string]*WorkloadCheckpoints{"w": {Seq: 1, List: []*Checkpoint{{WorkloadID: "w", Seq: 1, Node: "a", Holders: holders}}}}
	}
	run := func(f func(w *Workload)) *Workload {
		w := &Workload{ID: "w", Node: "a", DesiredNode: "a", Desired: DesiredRunning, State: StateRunning, Attempt: 1,
			Labels: map[string]string{"app": "db"}}
		if f != nil {
			f(w)
		}
		return w
	}
	off := map[string]*CheckpointPolicy{"p": {Name: "p", Selector: map[string]string{"app": "db"}, Fence: FenceOff}}
	offOther := map[string]*CheckpointPolicy{"p": {Name: "p", Selector: map[string]string{"app": "web"}, Fence: FenceOff}}
	cases := []struct {
		name     string
		w        *Workload
		ckpts    map[string]*WorkloadCheckpoints
		policies map[string]*CheckpointPolicy
		want     bool
	}{
		{name: "copy on another node", w: run(nil), ckpts: held("a", "b"), want: true},
		{name: "copy only here: nothing to restore elsewhere", w: run(nil), ckpts: held("a")},
		{name: "copy pushed, its entry not in this replica yet", w: run(nil), want: true,
			ckpts: map[string]*WorkloadCheckpoints{"w": {Seq: 1, List: []*Checkpoint{{WorkloadID: "w", Seq: 1, Node: "a", Holders: []string{"a"}, Targets: []string{"b"}}}}}},
		{name: "no checkpoint, restart never", w: run(nil)},
		{name: "no checkpoint, restart on-failure", w: run(func(w *Workload) { w.Restart.Mode = RestartOnFailure }), want: true},
		{name: "restarts used up", w: run(func(w *Workload) { w.Restart = RestartPolicy{Mode: RestartAlways, Max: 2}; w.Restarts = 2 })},
		{name: "lost here (declared down)", w: run(func(w *Workload) { w.State = StateLost }), ckpts: held("a", "b"), want: true},
		{name: "runs on another node", w: run(func(w *Workload) { w.Node = "b" }), ckpts: held("a", "b")},
		{name: "being stopped", w: run(func(w *Workload) { w.Desired = DesiredStopped }), ckpts: held("a", "b")},
		{name: "workload fence off", w: run(func(w *Workload) { w.Fence = FenceOff }), ckpts: held("a", "b")},
		{name: "policy fence off", w: run(nil), ckpts: held("a", "b"), policies: off},
		{name: "policy fence off, workload freeze", w: run(func(w *Workload) { w.Fence = FenceFreeze }), ckpts: held("a", "b"), policies: off, want: true},
		{name: "policy off for other labels", w: run(nil), ckpts: held("a", "b"), policies: offOther, want: true},
	}
	for _, c := range cases {
		s := &State{Workloads: map[string]*Workload{"w": c.w}, Checkpoints: c.ckpts, CheckpointPolicies: c.policies}
		if got := FenceApplies(s, c.w, "a"); got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, got, c.want)
		}
	}
}

func TestAfterFence(t *testing.T) {
	cases := []struct {
		name      string
		w         *Workload // nil: removed from the state
		want      FenceVerdict
		migration *Migration
	}{
		{name: "still running here", w: &Workload{Node: "a", Attempt: 1, State: StateRunning, Desired: DesiredRunning}, want: FenceThaw},
		{name: "stopped meanwhile", w: &Workload{Node: "a", Attempt: 1, State: StateRunning, Desired: DesiredStopped}, want: FenceThaw},
		{name: "lost here, not failed over yet", w: &Workload{Node: "a", Attempt: 1, State: StateLost, Desired: DesiredRunning}, want: FenceWait},
		{name: "failed over", w: &Workload{Node: "b", Attempt: 2, State: StateRunning, Desired: DesiredRunning}, want: FenceKill},
		{name: "failed over, pending there", w: &Workload{Node: "b", Attempt: 2, State: StatePending, Desired: DesiredRunning}, want: FenceKill},
		{name: "restarted here at a later attempt", w: &Workload{Node: "a", Attempt: 2, State: StateRunning, Desired: DesiredRunning}, want: FenceKill},
		{name: "ended", w: &Workload{Node: "a", Attempt: 1, State: StateExited, Desired: DesiredRunning}, want: FenceKill},
		{name: "removed", want: FenceKill},
		{name: "its migration transferring", w: &Workload{Node: "a", Attempt: 1, State: StateRunning, Desired: DesiredRunning}, want: FenceWait,
			migration: &Migration{ID: "m", WorkloadID: "w", Source: "a", Target: "b", Attempt: 1, State: MigrationTransferring}},
		{name: "its migration only planned", w: &Workload{Node: "a", Attempt: 1, State: StateRunning, Desired: DesiredRunning}, want: FenceThaw,
			migration: &Migration{ID: "m", WorkloadID: "w", Source: "a", Target: "b", Attempt: 1, State: MigrationPlanned}},
	}
	for _, c := range cases {
		s := &State{Workloads: map[string]*Workload{}, Migrations: map[string]*Migration{}}
		if c.migration != nil {
			s.Migrations[c.migration.ID] = c.migration
		}
		if c.w != nil {
			c.w.ID = "w"
			s.Workloads["w"] = c.w
		}
		if got := AfterFence(s, "w", 1, "a"); got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, got, c.want)
		}
	}
	if err := ValidateCheckpointPolicy(&CheckpointPolicy{Name: "p", Interval: 5e9, Fence: "thaw"}); err == nil {
		t.Errorf("a policy with fence \"thaw\" is valid, want an error naming fence")
	}
}
