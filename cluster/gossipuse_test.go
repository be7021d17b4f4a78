package cluster

import (
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/memberlist"
	"github.com/pcluster/pcluster/scheduler"
)

// TestWithUses: the totals count every workload; the list keeps the
// busiest that fit in memberlist's metadata, and says when it left some
// out.
func TestWithUses(t *testing.T) {
	m := meta{APIAddr: "198.18.0.1:7948", RaftAddr: "198.18.0.1:7947", Expect: 3, Booted: true,
		Labels: map[string]string{"zone": "a"}}
	uses := map[string]scheduler.Use{}
	for i := range 4 {
		uses[fmt.Sprintf("w%010x", i)] = scheduler.Use{CPU: uint32(100 * (i + 1)), RSS: 1 << 20}
	}
	l := withUses(m, scheduler.Load{NumCPU: 2}, uses)
	if l.WCPU != 1000 || l.WRSS != 4<<20 || len(l.Use) != 4 || l.UseTrunc {
		t.Fatalf("4 workloads: WCPU %d WRSS %d, %d listed, trunc %v; want 1000, 4 MiB, 4, false", l.WCPU, l.WRSS, len(l.Use), l.UseTrunc)
	}
	for i := range 60 {
		uses[fmt.Sprintf("x%010x", i)] = scheduler.Use{CPU: uint32(i), RSS: 1 << 30}
	}
	// Labels that leave little room: the list shrinks, the totals stay.
	m.Labels["notes"] = strings.Repeat("x", 200)
	l = withUses(m, scheduler.Load{NumCPU: 2}, uses)
	m.Load = l
	b, err := m.encode()
	if err != nil || len(b) > memberlist.MetaMaxSize {
		t.Fatalf("meta %d bytes, %v: want at most %d", len(b), err, memberlist.MetaMaxSize)
	}
	if !l.UseTrunc || len(l.Use) == 0 || len(l.Use) > maxGossipUses {
		t.Fatalf("64 workloads: %d listed, trunc %v; want 1..%d, trunc", len(l.Use), l.UseTrunc, maxGossipUses)
	}
	if _, ok := l.Use["w0000000003"]; !ok {
		t.Errorf("the busiest workload (400m) is not listed: %v", l.Use)
	}
	if want := uint32(1000 + 59*60/2); l.WCPU != want {
		t.Errorf("WCPU %d, want %d: every workload counts", l.WCPU, want)
	}
}
