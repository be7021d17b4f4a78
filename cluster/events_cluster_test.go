package cluster_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// readEvents parses the lines pclusterctl events -json wrote to path.
func readEvents(t *testing.T, path string) []api.Event {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []api.Event
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e api.Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			break // a line being written
		}
		out = append(out, e)
	}
	return out
}

// findEvent returns the position of the first event at or after from with
// type typ about workload or node who, or -1.
func findEvent(evs []api.Event, from int, typ, who string) int {
	for i := from; i < len(evs); i++ {
		if evs[i].Type == typ && (evs[i].Workload == who || evs[i].Workload == "" && evs[i].Node == who) {
			return i
		}
	}
	return -1
}

func eventKey(e api.Event) string {
	return fmt.Sprintf("%d.%d %s %s %s|%s|%s %s", e.Index, e.Seq, e.Time.Format(time.RFC3339Nano), e.Type, e.Node, e.Workload, e.Migration, e.Message)
}

// collect reads events from nd's API from index until one at or past
// upto arrives.
func collect(t *testing.T, nd *testNode, index, upto uint64) []api.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out []api.Event
	errDone := errors.New("done")
	from := index
	err := nd.client.Events(ctx, &from, func(e api.Event) error {
		if len(out) > 0 && !e.After(out[len(out)-1]) {
			return fmt.Errorf("event %s after %s: out of order or repeated", eventKey(e), eventKey(out[len(out)-1]))
		}
		out = append(out, e)
		if e.Index >= upto {
			return errDone
		}
		return nil
	})
	if !errors.Is(err, errDone) {
		t.Fatalf("events from %s at %d: %v (got %d events)", nd.name, index, err, len(out))
	}
	return out
}

// TestEventsAcrossLeaderChange: pclusterctl events follows one node while
// the leader leaves, a new one is elected and the old one comes back:
// every change is printed once, in raft order, and every node (the
// restarted one included) derives the same events with the same indexes,
// so a stream resumes on another node from the index it had reached.
func TestEventsAcrossLeaderChange(t *testing.T) {
	c := newTestCluster(t)
	nodes := startThree(c)
	var ms []api.Member
	c.ctlJSON(nodes[0], &ms, "members")
	byName := map[string]*testNode{}
	for _, nd := range nodes {
		byName[nd.name] = nd
	}
	leader := byName[leaderOf(ms)]
	var followers []*testNode
	for _, nd := range nodes {
		if nd != leader {
			followers = append(followers, nd)
		}
	}
	watch, other := followers[0], followers[1]

	// Bad input first: one line, exit 2.
	if _, errs, code := c.ctlRun("events", "-address", watch.socket, "-index", "x"); code != 2 || strings.Count(errs, "\n") != 1 || !strings.Contains(errs, "-index") {
		t.Errorf("events -index x: exit %d, %q; want 2 and one line naming -index", code, errs)
	}

	outPath := filepath.Join(c.dir, "events.json")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var errb strings.Builder
	cmd := exec.Command(c.ctlBin, "events", "-address", watch.socket, "-json", "-index", "0")
	cmd.Stdout, cmd.Stderr = out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	var w1 api.Workload
	c.ctlJSON(watch, &w1, "run", "-node", other.name, "--", "true")
	waitState(c, watch, w1.ID, "exited", 15*time.Second)

	// The leader leaves; another is elected.
	c.stop(leader)
	c.waitFor(30*time.Second, "a new leader", func() error {
		ms, err := watch.client.Members(context.Background())
		if err != nil {
			return err
		}
		if l := leaderOf(ms); l == "" || l == leader.name {
			return fmt.Errorf("leader %q", l)
		}
		return nil
	})
	// ... and the state has it down: its return is then a change (under
	// load the new leader may not have written it yet).
	c.waitFor(30*time.Second, leader.name+" down in the state", func() error {
		n, err := watch.client.Node(context.Background(), leader.name)
		if err != nil {
			return err
		}
		if n.Status == "ready" {
			return fmt.Errorf("status %s", n.Status)
		}
		return nil
	})
	var w2 api.Workload
	c.ctlJSON(other, &w2, "run", "-node", watch.name, "--", "sleep", "300")
	waitState(c, other, w2.ID, "running", 15*time.Second)
	c.ctl(other, "stop", w2.ID)
	waitState(c, watch, w2.ID, "stopped", 15*time.Second)
	// The old leader comes back (told where the others are: the seed
	// node may not have saved its peers yet).
	leader.args = append(leader.args, "-join", other.bind)
	c.launch(leader)
	for _, nd := range nodes {
		c.waitFor(30*time.Second, nd.name+" to converge", func() error { return converged(nd, 3) })
	}
	c.waitFor(30*time.Second, leader.name+" ready again", nodeStatus(watch, leader.name, "ready"))

	var evs []api.Event
	c.waitFor(20*time.Second, "the events printed", func() error {
		evs = readEvents(t, outPath)
		if findEvent(evs, 0, "node-status", leader.name) < 0 || findEvent(evs, findEvent(evs, 0, "workload-stopped", w2.ID)+1, "node-status", leader.name) < 0 {
			return fmt.Errorf("%d events, not yet %s ready again after %s stopped", len(evs), leader.name, w2.ID)
		}
		return nil
	})
	cmd.Process.Signal(syscall.SIGINT)
	if err := <-exited; err != nil {
		t.Errorf("pclusterctl events after SIGINT: %v (%s), want exit 0", err, errb.String())
	}
	exited <- nil // for the deferred kill

	// Once each, in raft order.
	for i := 1; i < len(evs); i++ {
		if !evs[i].After(evs[i-1]) {
			t.Fatalf("event %d (%s) does not come after %s", i, eventKey(evs[i]), eventKey(evs[i-1]))
		}
	}
	// What happened, in the order it happened. The new leader may place
	// w2 before it records the old one down: that order is not checked.
	var lines []string
	for _, e := range evs {
		lines = append(lines, eventKey(e))
	}
	inOrder := func(steps ...struct{ typ, who string }) int {
		pos := 0
		for _, want := range steps {
			i := findEvent(evs, pos, want.typ, want.who)
			if i < 0 {
				t.Fatalf("no %s of %s after event %d; events:\n%s", want.typ, want.who, pos, strings.Join(lines, "\n"))
			}
			pos = i + 1
		}
		return pos - 1
	}
	type step = struct{ typ, who string }
	inOrder(step{"node-joined", nodes[0].name}, step{"workload-placed", w1.ID}, step{"workload-started", w1.ID},
		step{"workload-exited", w1.ID}, step{"workload-placed", w2.ID}, step{"workload-started", w2.ID},
		step{"workload-stop", w2.ID}, step{"workload-stopped", w2.ID}, step{"node-status", leader.name})
	down := evs[inOrder(step{"workload-exited", w1.ID}, step{"node-status", leader.name})]
	ready := evs[inOrder(step{"workload-stopped", w2.ID}, step{"node-status", leader.name})]
	if !strings.Contains(down.Message, "is down") || !strings.Contains(ready.Message, "is ready") || !ready.After(down) {
		t.Errorf("the leader's leave and return: %q then %q, want down then ready", down.Message, ready.Message)
	}

	// Every node derives the same events: the other follower from the
	// index of w2's placement (a resumed stream), the restarted old leader
	// from the oldest it keeps.
	last := evs[len(evs)-1].Index
	placed := evs[findEvent(evs, 0, "workload-placed", w2.ID)]
	var want []string
	for _, e := range evs {
		if e.Index >= placed.Index {
			want = append(want, eventKey(e))
		}
	}
	var got []string
	for _, e := range collect(t, other, placed.Index, last) {
		got = append(got, eventKey(e))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("events from %s resumed at %d:\n%s\nwant (from %s):\n%s", other.name, placed.Index, strings.Join(got, "\n"), watch.name, strings.Join(want, "\n"))
	}
	again := collect(t, leader, 0, last)
	keys := map[string]bool{}
	for _, e := range evs {
		keys[eventKey(e)] = true
	}
	for _, e := range again {
		if e.Index <= last && !keys[eventKey(e)] {
			t.Fatalf("the restarted %s derived %s, which %s did not", leader.name, eventKey(e), watch.name)
		}
	}
	if len(again) == 0 || again[0].Index > placed.Index {
		t.Fatalf("the restarted %s keeps events from %d, want from before %d", leader.name, again[0].Index, placed.Index)
	}
}
