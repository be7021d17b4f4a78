package scheduler

import "fmt"

func init() {
	register(CmdCheckpointPolicyUpsert, applyCheckpointPolicyUpsert)
}

func applyCheckpointPolicyUpsert(s *State, idx uint64, c *CheckpointPolicyUpsertCmd) any {
	p := c.Policy
	if p.Name == "" {
		return fmt.Errorf("checkpoint policy upsert: empty name")
	}
	s.CheckpointPolicies[p.Name] = &p
	return p
}
