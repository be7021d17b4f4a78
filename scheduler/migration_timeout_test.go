package scheduler

import (
	"reflect"
	"testing"
	"time"
)

// TestMigrationTimeouts on a fake clock: only migrations planned or
// transferring with no step for the timeout, as the leader's clock
// measures from its first look, are aborted, by the leader; the abort
// applies (the workload stays on the source).
func TestMigrationTimeouts(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	s := NewState()
	for i, m := range []*Migration{
		{ID: "m1", State: MigrationPlanned},
		{ID: "m2", State: MigrationTransferring},
		{ID: "m4", State: MigrationCommitted},
		{ID: "m5", State: MigrationAborted},
		{ID: "m6", State: MigrationDone},
	} {
		m.Attempt, m.ModifyIndex, m.UpdatedAt = 1, uint64(i+1), now.UnixNano()
		s.Migrations[m.ID] = m
	}
	var c MigrationClock
	if got := c.Timeouts(s, now, DefaultMigrationTimeout); len(got) != 0 {
		t.Errorf("at the first look: %d aborts, want none", len(got))
	}
	if got := c.Timeouts(s, now.Add(DefaultMigrationTimeout-time.Second), DefaultMigrationTimeout); len(got) != 0 {
		t.Errorf("a second before the timeout: %d aborts, want none", len(got))
	}
	var got []string
	for _, cmd := range c.Timeouts(s, now.Add(DefaultMigrationTimeout), DefaultMigrationTimeout) {
		st := cmd.Payload.(*MigrationStepCmd)
		if cmd.Type != CmdMigrationStep || st.To != MigrationAborted || st.Node != "" || st.Attempt != 1 {
			t.Errorf("command %s %+v: want an abort by the leader at attempt 1", cmd.Type, st)
		}
		got = append(got, st.ID)
	}
	if want := []string{"m1", "m2"}; !reflect.DeepEqual(got, want) {
		t.Errorf("aborted %v, want %v", got, want)
	}

	// Through the FSM: the abort applies and the workload stays put.
	a := migrationFixture(t)
	m := a.plan("run", "b")
	a.ok(CmdMigrationStep, &MigrationStepCmd{ID: m.ID, Attempt: 1, Node: "a", To: MigrationTransferring, At: now.UnixNano()})
	var cs []Command
	var fc MigrationClock
	a.f.Read(func(s *State) { fc.Timeouts(s, now, DefaultMigrationTimeout) })
	a.f.Read(func(s *State) { cs = fc.Timeouts(s, now.Add(DefaultMigrationTimeout), DefaultMigrationTimeout) })
	if len(cs) != 1 {
		t.Fatalf("got %d commands, want 1", len(cs))
	}
	a.ok(cs[0].Type, cs[0].Payload)
	if got, w := a.migration(m.ID), a.workload("run"); got.State != MigrationAborted || w.Node != "a" || w.PID != 100 {
		t.Errorf("after the timeout: migration %s, workload on %s pid %d; want aborted, on a pid 100", got.State, w.Node, w.PID)
	}
}

// TestMigrationClockSkew: a migration's timeout is measured on the
// leader's clock from when the leader saw its last step, whatever time the
// step carries (the writing node's clock). A source whose clock is an
// hour behind the leader's has its transferring step stamped an hour ago:
// it is not aborted at the first look, and not while steps keep coming;
// one stamped an hour ahead (a clock jumped forward) still times out.
func TestMigrationClockSkew(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	s := NewState()
	s.Migrations["m1"] = &Migration{ID: "m1", Attempt: 1, State: MigrationTransferring, UpdatedAt: now.Add(-time.Hour).UnixNano(), ModifyIndex: 10}
	s.Migrations["m2"] = &Migration{ID: "m2", Attempt: 1, State: MigrationPlanned, UpdatedAt: now.Add(time.Hour).UnixNano(), ModifyIndex: 11}
	var c MigrationClock
	aborted := func(at time.Duration) []string {
		var ids []string
		for _, cmd := range c.Timeouts(s, now.Add(at), DefaultMigrationTimeout) {
			ids = append(ids, cmd.Payload.(*MigrationStepCmd).ID)
		}
		return ids
	}
	if got := aborted(0); len(got) != 0 {
		t.Errorf("at the first look: aborted %v, want none (the steps are new to the leader)", got)
	}
	s.Migrations["m1"].ModifyIndex = 12 // a step, seen after 4 min: its clock starts again
	if got := aborted(4 * time.Minute); len(got) != 0 {
		t.Errorf("after 4 min: aborted %v, want none", got)
	}
	if got := aborted(8 * time.Minute); !reflect.DeepEqual(got, []string{"m2"}) {
		t.Errorf("after 8 min, m1's last step 4 min ago: aborted %v, want [m2]", got)
	}
	if got := aborted(9*time.Minute + time.Second); !reflect.DeepEqual(got, []string{"m1", "m2"}) {
		t.Errorf("after 9 min, m1's last step 5 min ago: aborted %v, want [m1 m2]", got)
	}
	s.Migrations["m1"].State = MigrationAborted
	s.Migrations["m2"].State = MigrationAborted
	if got := aborted(10 * time.Minute); len(got) != 0 || len(c.seen) != 0 {
		t.Errorf("once ended: aborted %v, %d migrations still watched; want none", got, len(c.seen))
	}
}
