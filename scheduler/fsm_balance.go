package scheduler

import "fmt"

func init() {
	register(CmdBalanceSet, applyBalanceSet)
}

// applyBalanceSet sets the balancer's mode; the leader's balancer reads
// it every round (scheduler/balance.go).
func applyBalanceSet(s *State, idx uint64, c *BalanceSetCmd) any {
	if err := CheckBalanceMode(c.Mode); err != nil {
		return fmt.Errorf("balance set: %w", err)
	}
	s.Balance = BalanceConfig{Mode: c.Mode, SetAt: c.At}
	return s.Balance
}
