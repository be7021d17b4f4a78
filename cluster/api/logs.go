package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// FollowLogs copies a workload's stdout (or stderr) log into w as it
// grows, across migrations and reschedules, until the workload ends (nil)
// or ctx ends (its error). It starts with the whole log on the node the
// workload is on; when that node's stream ends (the workload left it),
// it finds where the workload went (the migration out of that node, else
// the workload's node) and goes on there from where the next attempt's
// output begins, so no line is lost or repeated. A broken connection is
// resumed at the byte it reached, for up to c.Wait.
func (c *Client) FollowLogs(ctx context.Context, id string, stderr bool, w io.Writer) error {
	stream := "stdout"
	if stderr {
		stream = "stderr"
	}
	wl, err := c.Workload(ctx, id)
	if err != nil {
		return err
	}
	node, attempt := placedOn(wl), wl.Attempt
	from := 0 // the first node: its whole log
	var off int64
	failingSince := time.Time{}
	for {
		n, err := c.followOnce(ctx, id, stream, node, from, off, w)
		off += n
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			var ae *Error
			if errors.As(err, &ae) && ae.Status != http.StatusServiceUnavailable && ae.Status != http.StatusBadGateway {
				return err
			}
			if n > 0 || failingSince.IsZero() {
				failingSince = time.Now()
			}
			if time.Since(failingSince) > c.Wait {
				return err
			}
			if !sleepCtx(ctx, 250*time.Millisecond) {
				return ctx.Err()
			}
			continue
		}
		failingSince = time.Time{}
		// The node says the workload no longer runs there.
		if wl, err = c.Workload(ctx, id); err != nil {
			return err
		}
		next, nextAttempt := "", 0
		ms, err := c.Migrations(ctx, true)
		if err != nil {
			return err
		}
		for _, m := range ms {
			if m.Workload == id && m.Source == node && m.Attempt >= attempt && (m.State == "committed" || m.State == "done") {
				next, nextAttempt = m.Target, m.Attempt+1
				break
			}
		}
		if next == "" {
			switch cur := placedOn(wl); {
			case cur != node:
				next, nextAttempt = cur, wl.Attempt // rescheduled there
			case wl.State == "lost":
				return fmt.Errorf("logs %s: workload lost: %s", id, wl.Message)
			case wl.State != "pending" && wl.State != "running":
				return nil // ended where it was followed
			default:
				// Still here in the leader's state: the node's replica
				// was ahead or behind; read on from where it was.
				if !sleepCtx(ctx, 250*time.Millisecond) {
					return ctx.Err()
				}
				continue
			}
		}
		node, attempt, from, off = next, nextAttempt, nextAttempt, 0
	}
}

// placedOn is the node a workload runs on or is about to start on.
func placedOn(wl Workload) string {
	if wl.Node == "" || wl.State == "pending" && wl.DesiredNode != "" {
		return wl.DesiredNode
	}
	return wl.Node
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// followOnce streams node's log of the workload from where attempt began
// there (0: the file's start) plus off, and returns how many bytes it
// copied. It ends without error when the node says the workload left it.
func (c *Client) followOnce(ctx context.Context, id, stream, node string, attempt int, off int64, w io.Writer) (int64, error) {
	q := url.Values{"stream": {stream}, "follow": {"1"}, "node": {node}, "offset": {strconv.FormatInt(off, 10)}}
	if attempt > 0 {
		q.Set("attempt", strconv.Itoa(attempt))
	}
	resp, err := c.send(ctx, http.MethodGet, PathWorkloads+"/"+url.PathEscape(id)+"/logs?"+q.Encode(), nil)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode/100 != 2 {
		return 0, decode(resp, nil)
	}
	defer resp.Body.Close()
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("logs %s from %s: %w", id, node, err)
	}
	return n, nil
}
