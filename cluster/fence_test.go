package cluster

import (
	"strings"
	"testing"
	"time"
)

// TestCheckFence: a fence time is refused unless the fence acts a margin
// before the leader's earliest failover (memberlist's least detection
// time, 4 s with our gossip config, + FailoverAfter) and is longer than an
// election.
func TestCheckFence(t *testing.T) {
	mc := gossipConfig()
	cases := []struct {
		failover     bool
		after, fence time.Duration
		want         string // "" : accepted; else in the error
	}{
		{true, time.Second, 3 * time.Second, ""},                // the defaults
		{true, 0, 3500 * time.Millisecond, "failover after 0s"}, // 3.5 s + 1 s margin > 4 s
		{true, 0, 3 * time.Second, ""},                          // 3 s + 1 s ≤ 4 s
		{true, time.Second, 5 * time.Second, "fence after"},     // after the failover could come
		{true, time.Minute, time.Second, "at least 2s"},         // an election is not a partition
		{true, 0, 0, ""},                 // no fencing
		{false, 0, 30 * time.Second, ""}, // no failover: the fence is off
	}
	for _, c := range cases {
		err := checkFence(Config{Failover: c.failover, FailoverAfter: c.after, FenceAfter: c.fence}, mc)
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("failover %v after %v, fence after %v: got %v, want %q", c.failover, c.after, c.fence, err, c.want)
		}
	}
}
