package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// rawNumber is what a human form must not print: a run of 7 digits or
// more (bytes, nanoseconds, unix times; PIDs and counts here are small)
// or a float in e-notation.
var rawNumber = regexp.MustCompile(`\d{7,}|\d\.?\d*e[+-]\d+`)

// syncBuffer is a bytes.Buffer that a command writes while the test
// reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestHumanOutput runs every command that shows the cluster against a
// stand-in daemon whose answers hold sizes in bytes, times and durations
// in nanoseconds, and fails on any of them printed raw in the human
// form; -json keeps the raw values for scripts.
func TestHumanOutput(t *testing.T) {
	const big = 3<<30 + 12345 // bytes
	now := time.Now()
	at := now.Add(-90 * time.Second)
	load := api.Load{CPULoad1: 0.5, NumCPU: 2, MemUsed: big, MemFree: big + 1, Workloads: 1, WorkloadCPUMilli: 300, WorkloadRSS: big + 2}
	node := api.Node{Name: "a", GossipAddr: "198.18.0.1:7946", RaftAddr: "198.18.0.1:7947", APIAddr: "198.18.0.1:7948", Status: "ready",
		Eligible: true, Load: load, LoadAt: at, StatusAt: at, Workloads: 1,
		Drain: &api.NodeDrain{StartedAt: at, Deadline: now.Add(time.Hour), MaxParallel: 1, Moved: 1}}
	wl := api.Workload{ID: "w1", Name: "web", Command: "sleep", Args: []string{"100"}, UID: -1, GID: -1, MemoryMB: 512, CPUMilli: 500,
		Restart: "never", Desired: "running", DesiredNode: "a", Node: "a", State: "running", Attempt: 1, PID: 42, NSPID: 1, InitPID: 41,
		CreatedAt: at, StartedAt: at.Add(time.Second), ModifyIndex: 9}
	ended := wl
	ended.ID, ended.State, ended.Desired, ended.EndedAt = "w2", "exited", "stopped", now.Add(-time.Second)
	mig := api.Migration{ID: "m5", Workload: "w1", Name: "web", Source: "b", Target: "a", State: "done", Attempt: 1,
		Reason: "drain of node b", Origin: "drain", PlannedAt: at, UpdatedAt: at.Add(2 * time.Second), EndedAt: at.Add(2 * time.Second),
		TransferAt: at.Add(time.Second), Bytes: big, ModifyIndex: 7}
	bal := api.BalanceStatus{Mode: "aggressive", SetAt: at, Threshold: 0.1, MinGain: 0.025, Interval: 5 * time.Second,
		Cooldown: 5 * time.Minute, Leader: "a", Rounds: 3, Moves: 1,
		Nodes: []api.BalanceNode{{Name: "a", Load: 0.15, CPUMilli: 300, MovableMilli: 300, RSS: big}},
		Decisions: []api.BalanceDecision{{At: at, Last: at.Add(10 * time.Second), Rounds: 3, Kind: api.BalanceHeld, Reason: "nothing to gain"},
			{At: at.Add(11 * time.Second), Rounds: 1, Kind: "moved", Workload: "w1", Source: "b", Target: "a", Migration: "m5", Reason: "balance"}}}
	ev := api.EventLine{Event: api.Event{Index: 12, Time: at, Type: "migration-committed", Node: "a", Workload: "w1", Migration: "m5",
		Message: "migration m5 of w1 from b to a committed (3.0 GiB)"}}

	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var v any
		switch p := r.URL.Path; {
		case p == api.PathMembers:
			v = []api.Member{{Name: "a", Addr: node.GossipAddr, APIAddr: node.APIAddr, RaftAddr: node.RaftAddr, Status: "alive", Role: "leader", Load: load}}
		case p == api.PathNodes:
			v = []api.Node{node}
		case strings.HasPrefix(p, api.PathNodes+"/"):
			v = node
		case p == api.PathWorkloads:
			v = []api.Workload{wl, ended}
		case strings.HasPrefix(p, api.PathWorkloads+"/"):
			v = wl
		case p == api.PathMigrations:
			v = []api.Migration{mig}
		case p == api.PathBalance:
			v = bal
		case p == api.PathEvents:
			w.Header().Set(api.HeaderEventsIndex, "12")
			json.NewEncoder(w).Encode(ev)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return
		default:
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(v)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	raws := []string{strconv.Itoa(big), strconv.FormatInt(at.Unix(), 10), strconv.FormatInt(at.UnixNano(), 10),
		strconv.FormatInt(int64(5*time.Minute), 10)}
	for _, args := range [][]string{ // command words, flags, then "." and the arguments
		{"members"}, {"node", "status"}, {"node", "status", ".", "a"}, {"ps", "-a"}, {"status", ".", "w1"}, {"migrations", "-a"},
		{"balance", "status"}, {"events", "-index", "0"},
	} {
		for _, asJSON := range []bool{false, true} {
			a := append([]string(nil), args...)
			var operands []string
			if i := len(a) - 2; i >= 0 && a[i] == "." {
				a, operands = a[:i], a[i+1:]
			}
			a = append(a, "-address", sock)
			if asJSON {
				a = append(a, "-json")
			}
			a = append(a, operands...)
			ctx, cancel := context.WithCancel(context.Background())
			var out syncBuffer
			var errb bytes.Buffer
			code := make(chan int)
			go func() { code <- realMain(ctx, a, &out, &errb) }()
			if args[0] == "events" {
				// It follows until interrupted: once the event is out.
				for !strings.Contains(out.String(), "\n") {
					select {
					case c := <-code:
						t.Fatalf("%s: exit %d before an event: %s", strings.Join(a, " "), c, errb.String())
					case <-time.After(10 * time.Millisecond):
					}
				}
				cancel()
			}
			if c := <-code; c != 0 {
				t.Fatalf("%s: exit %d: %s", strings.Join(a, " "), c, errb.String())
			}
			cancel()
			got := out.String()
			if asJSON {
				// Scripts get the values as they are.
				if args[0] == "members" && !strings.Contains(got, raws[0]) {
					t.Errorf("%s: lacks the raw %s:\n%s", strings.Join(a, " "), raws[0], got)
				}
				continue
			}
			if args[0] == "status" {
				for _, want := range []string{`\nCreated:   \d+m\d+s ago\n`, `\nStarted:   \d+m\d+s ago\n`, `\nLimits:    memory 512M, cpu 500m\n`, `\nExit:      -\n`} {
					if !regexp.MustCompile(want).MatchString(got) {
						t.Errorf("status: lacks %q:\n%s", want, got)
					}
				}
			}
			if m := rawNumber.FindString(got); m != "" || got == "" {
				t.Errorf("%s: prints the raw number %q:\n%s", strings.Join(args, " "), m, got)
			}
			for _, r := range raws {
				if strings.Contains(got, r) {
					t.Errorf("%s: prints the raw value %s:\n%s", strings.Join(args, " "), r, got)
				}
			}
		}
	}
}
