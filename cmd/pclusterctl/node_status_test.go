package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// TestNodeStatusDrain: `node status NODE` prints the node's drain and its
// progress, one line per failed move, per workload restarted elsewhere and
// per workload stuck, from the API's answer (a stand-in
// daemon on a unix socket here).
func TestNodeStatusDrain(t *testing.T) {
	started := time.Now().Add(-time.Minute)
	nodes := map[string]api.Node{
		"a": {Name: "a", Status: "ready", Drain: &api.NodeDrain{StartedAt: started, Deadline: time.Date(2026, 12, 7, 13, 0, 0, 0, time.UTC),
			MaxParallel: 2, Moved: 3, InFlight: 1, Remaining: 2, Failed: []string{"w2: node c down"},
			Restarted: []string{"w3 on b"}, Stuck: []string{"w4: fd 3: not supported"}}},
		"b": {Name: "b", Status: "ready", Drain: &api.NodeDrain{StartedAt: started, NoDeadline: true, MaxParallel: 1,
			CompletedAt: time.Now(), Moved: 4}},
		"c": {Name: "c", Status: "ready", Eligible: true},
	}
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(nodes[strings.TrimPrefix(r.URL.Path, api.PathNodes+"/")])
	})}
	go srv.Serve(ln)
	defer srv.Close()
	for _, tc := range []struct {
		node string
		want []string
		not  string
	}{
		{"a", []string{"Drain:      started ", " ago, deadline 2026-12-07T13:00:00Z, max-parallel 2: moved 3, in flight 1, remaining 2, failed 1\n",
			"  failed:   w2: node c down\n", "  restarted from its command: w3 on b\n", "  stuck:    w4: fd 3: not supported\n"}, ""},
		{"b", []string{"Drain:      complete ", ": moved 4, failed 0\n"}, "failed:  "},
		{"c", []string{"Eligible:   true\n"}, "Drain:"},
	} {
		var out, errb bytes.Buffer
		if code := realMain(context.Background(), []string{"node", "status", "-address", sock, tc.node}, &out, &errb); code != 0 {
			t.Fatalf("node status %s: exit %d: %s", tc.node, code, errb.String())
		}
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("node status %s: lacks %q:\n%s", tc.node, w, out.String())
			}
		}
		if tc.not != "" && strings.Contains(out.String(), tc.not) {
			t.Errorf("node status %s: has %q:\n%s", tc.node, tc.not, out.String())
		}
	}
}
