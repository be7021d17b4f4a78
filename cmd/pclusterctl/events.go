package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

type eventsCmd struct {
	index *uint64
}

func (*eventsCmd) name() string { return "events" }
func (*eventsCmd) synopsis() string {
	return "events [-index N]        follow what the cluster does, in raft order, until interrupted"
}
func (c *eventsCmd) flags(fs *flag.FlagSet) {
	fs.Func("index", "start at raft index `N` (0: the oldest event the node keeps; default: only new events)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return fmt.Errorf("want a raft index, 0 or more")
		}
		c.index = &n
		return nil
	})
}

// run follows the stream; when the connection breaks it reconnects for as
// long as the client's Wait and resumes after the last event printed.
func (c *eventsCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usagef("events takes no arguments, got %q", args[0])
	}
	from := api.EventsNow
	if c.index != nil {
		from = *c.index
	}
	var last *api.Event
	enc := json.NewEncoder(e.stdout)
	print := func(ev api.Event) error {
		if last != nil && !ev.After(*last) {
			return nil // already printed before the reconnection
		}
		l := ev
		last = &l
		if e.json {
			return enc.Encode(ev)
		}
		_, err := fmt.Fprintf(e.stdout, "%s %7d %-22s %s\n", ev.Time.Local().Format("2006-01-02 15:04:05.000"), ev.Index,
			shown(ev.Type), shown(ev.Message))
		return err
	}
	failingSince := time.Time{}
	for {
		before := last
		err := e.client.Events(ctx, &from, print) // keeps from where to resume
		if ctx.Err() != nil {
			return nil // interrupted: the normal end
		}
		var ae *api.Error
		var se *api.StreamError
		if errors.As(err, &ae) || errors.As(err, &se) || api.IsAuth(err) {
			return err
		}
		if last != before || failingSince.IsZero() {
			failingSince = time.Now() // failing since this attempt
		}
		if time.Since(failingSince) > e.client.Wait {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
}
