package scheduler

import "fmt"

func init() {
	register(CmdMigrationUpsert, applyMigrationUpsert)
	register(CmdCheckpointPolicyUpsert, applyCheckpointPolicyUpsert)
}

func applyMigrationUpsert(s *State, idx uint64, c *MigrationUpsertCmd) any {
	m := c.Migration
	if m.ID == "" {
		return fmt.Errorf("migration upsert: empty id")
	}
	if _, ok := s.Workloads[m.WorkloadID]; !ok {
		return fmt.Errorf("migration upsert %s: workload %s: %w", m.ID, m.WorkloadID, ErrNotFound)
	}
	s.Migrations[m.ID] = &m
	return m
}

func applyCheckpointPolicyUpsert(s *State, idx uint64, c *CheckpointPolicyUpsertCmd) any {
	p := c.Policy
	if p.Name == "" {
		return fmt.Errorf("checkpoint policy upsert: empty name")
	}
	s.CheckpointPolicies[p.Name] = &p
	return p
}
