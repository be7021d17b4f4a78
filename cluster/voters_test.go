package cluster_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

func roleCount(ms []api.Member) map[string]int {
	roles := map[string]int{}
	for _, m := range ms {
		if m.Status == "alive" {
			roles[m.Role]++
		} else {
			roles["dead-"+m.Role]++
		}
	}
	return roles
}

// TestSixNodesFiveVoters checks voter management: three servers bootstrap,
// three more join by gossip alone, and the leader keeps 5 voters and 1
// non-voter; when a voter dies, the non-voter is promoted in its place.
func TestSixNodesFiveVoters(t *testing.T) {
	c := newTestCluster(t)
	nodes := startThree(c)
	for i := 4; i <= 6; i++ {
		nodes = append(nodes, c.start(i, "-join", nodes[0].bind))
	}
	var ms []api.Member
	want := map[string]int{"leader": 1, "voter": 4, "nonvoter": 1}
	c.waitFor(30*time.Second, "5 voters and 1 non-voter", func() error {
		var err error
		if ms, err = nodes[5].client.Members(context.Background()); err != nil {
			return err
		}
		if got := roleCount(ms); fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("roles %v", got)
		}
		return nil
	})
	// Every node is in the state and ready. The roles above are the
	// leader's raft configuration; a node's own record in the state is
	// its registration, applied on its own schedule, and read here from
	// n4's replica: waited for, not taken at once (CI saw 4 of 6).
	c.waitFor(30*time.Second, "six nodes in n4's replica of the state", func() error {
		ns, err := nodes[3].client.Nodes(context.Background())
		if err != nil {
			return err
		}
		if len(ns) != 6 {
			return fmt.Errorf("%d nodes", len(ns))
		}
		return nil
	})

	var victim *testNode
	for _, m := range ms {
		if m.Role == "voter" {
			victim = c.nodes[m.Name]
			break
		}
	}
	var observer *testNode
	for _, nd := range nodes {
		if nd != victim {
			observer = nd
		}
	}
	c.kill(victim)
	want = map[string]int{"leader": 1, "voter": 4, "dead-none": 1}
	c.waitFor(30*time.Second, "the non-voter promoted in place of "+victim.name, func() error {
		ms, err := observer.client.Members(context.Background())
		if err != nil {
			return err
		}
		if got := roleCount(ms); fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("roles %v", got)
		}
		return nil
	})
}
