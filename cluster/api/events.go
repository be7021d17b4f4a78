package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"
)

// PathEvents streams what the cluster does (GET; ?index=N resumes): one
// JSON Event per line (application/x-ndjson), blank lines as heartbeats.
// Any node serves it from its own replica: events are derived from the
// raft entries as they apply, so every node sees the same ones with the
// same indexes. Without ?index the stream starts after the last entry
// applied; ?index=0 starts at the oldest event the node keeps.
const PathEvents = "/v1/events"

// Event is one thing that happened in the cluster, in raft order: Index is
// the raft entry that made it happen, Seq its place among the events of
// that entry (from 0).
type Event struct {
	Index     uint64    `json:"index"`
	Seq       int       `json:"seq"`
	Time      time.Time `json:"time,omitzero"` // when the leader appended the entry
	Type      string    `json:"type"`          // node-joined, workload-started, migration-done, ...
	Node      string    `json:"node,omitempty"`
	Workload  string    `json:"workload,omitempty"`
	Migration string    `json:"migration,omitempty"`
	Message   string    `json:"message"` // one line for humans
}

// After reports whether e comes after o in the stream.
func (e Event) After(o Event) bool {
	return e.Index > o.Index || e.Index == o.Index && e.Seq > o.Seq
}

// EventLine is one line of the events stream: an event, or an error that
// ends the stream (the reader fell behind what the node keeps).
type EventLine struct {
	Event
	Error string `json:"error,omitempty"`
}

// StreamError is an error line that ended an events stream.
type StreamError struct{ Message string }

func (e *StreamError) Error() string { return e.Message }

// EventsNow asks Events for only the events after the node's last applied
// entry.
const EventsNow = ^uint64(0)

// HeaderEventsIndex is the first raft index an events stream covers (the
// one asked for, or, for only new events, the node's next).
const HeaderEventsIndex = "X-Pcluster-Events-Index"

// Events streams events from *index (EventsNow: only new ones; 0: the
// oldest the node keeps) and calls fn for each until ctx ends, fn fails,
// the connection ends or the node sends an error (*StreamError). It keeps
// *index at the index to resume from (the stream's first, then the last
// event's: an entry's events may have been cut off in the middle, so the
// caller skips those it saw, by Event.After). A request the node refuses
// (index too old, 410) is an *Error.
func (c *Client) Events(ctx context.Context, index *uint64, fn func(Event) error) error {
	path := PathEvents
	if *index != EventsNow {
		path += "?index=" + strconv.FormatUint(*index, 10)
	}
	resp, err := c.send(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return decode(resp, nil)
	}
	if v, err := strconv.ParseUint(resp.Header.Get(HeaderEventsIndex), 10, 64); err == nil && *index == EventsNow {
		*index = v
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue // heartbeat
		}
		var el EventLine
		if err := json.Unmarshal(line, &el); err != nil {
			return fmt.Errorf("events from %s: %w", c.where, err)
		}
		if el.Error != "" {
			return &StreamError{Message: el.Error}
		}
		*index = el.Index
		if err := fn(el.Event); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("events from %s: %w", c.where, err)
	}
	return fmt.Errorf("events from %s: stream closed by the node: %w", c.where, io.ErrUnexpectedEOF)
}
