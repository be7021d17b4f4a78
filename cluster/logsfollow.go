package cluster

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// Following a workload's log (GET /v1/workloads/ID/logs?follow=1): each
// node keeps the output of the attempts that ran there, and the agent
// records where each attempt's output begins in the node's file
// (node/logstart.go). The node asked streams its file from a point (the
// file's start, or where attempt A began here, plus offset bytes) and keeps
// streaming what is appended until the workload no longer runs here: it
// ended, or moved (a migration's commit, a reschedule). Its state then
// says so only after the process stopped writing here (a source's process
// is frozen from the transferring step, before the commit), so the last
// read after that sees every line. The client (api.Client.FollowLogs) then
// goes on at the next node from where the next attempt began there: no
// line is lost or printed twice across a migration.

// logPoll is how often a followed log is read again when the state does
// not change.
const logPoll = 200 * time.Millisecond

// hostedHere reports whether wl occupies this node: running or about to
// start here.
func (s *Server) hostedHere(wl *scheduler.Workload) bool {
	if wl == nil || !wl.State.Active() {
		return false
	}
	return wl.Node == s.cfg.Name || wl.State == scheduler.StatePending && wl.Node == "" && wl.DesiredNode == s.cfg.Name
}

// handleLogsFollow serves ?follow=1[&node=N][&attempt=A][&offset=O].
func (s *Server) handleLogsFollow(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "logs")
	if err != nil {
		writeErr(w, err)
		return
	}
	wl, err := s.workload(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	q := r.URL.Query()
	where := q.Get("node")
	if where == "" {
		where = wl.Node
		if where == "" {
			where = wl.DesiredNode
		}
	} else if err := scheduler.CheckNodeName(where); err != nil {
		writeErr(w, badRequest("logs %s: node: %w", id, err))
		return
	}
	if where != s.cfg.Name {
		var addr string
		s.fsm.Read(func(st *scheduler.State) {
			if n, ok := st.Nodes[where]; ok {
				addr = n.APIAddr
			}
		})
		if addr == "" {
			writeErr(w, &httpError{http.StatusServiceUnavailable, fmt.Errorf("logs %s: node %s unknown", id, where)})
			return
		}
		s.proxy(w, r, addr)
		return
	}
	stream := q.Get("stream")
	if stream == "" {
		stream = "stdout"
	}
	path, err := s.agent.LogPath(id, stream)
	if err != nil {
		writeErr(w, badRequest("logs %s: %w", id, err))
		return
	}
	var attempt int
	var offset int64
	if v := q.Get("attempt"); v != "" {
		if attempt, err = strconv.Atoi(v); err != nil || attempt < 1 {
			writeErr(w, badRequest("logs %s: attempt %.20q: want 1 or more", id, v))
			return
		}
	}
	if v := q.Get("offset"); v != "" {
		if offset, err = strconv.ParseInt(v, 10, 64); err != nil || offset < 0 {
			writeErr(w, badRequest("logs %s: offset %.20q: want 0 or more", id, v))
			return
		}
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush() // the headers now: a forwarding node waits for them only so long

	var f *os.File
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	pos := int64(-1) // where to read next, once the start is known
	tick := time.NewTicker(logPoll)
	defer tick.Stop()
	buf := make([]byte, 64<<10)
	for {
		changed := s.fsm.Changed()
		var here bool
		s.fsm.Read(func(st *scheduler.State) { here = s.hostedHere(st.Workloads[id]) })
		if pos < 0 {
			start, ok := int64(0), true
			if attempt > 0 {
				start, ok, err = s.agent.LogStart(id, attempt, stream)
				if err != nil {
					s.log.Warn("follow logs", "workload", id, "err", err)
					return
				}
			}
			if ok {
				pos = start + offset
			}
		}
		if pos >= 0 && f == nil {
			f, err = os.Open(path)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				s.log.Warn("follow logs", "workload", id, "err", err)
				return
			}
		}
		if f != nil {
			for {
				n, err := f.ReadAt(buf, pos)
				if n > 0 {
					if _, werr := w.Write(buf[:n]); werr != nil {
						return
					}
					pos += int64(n)
				}
				if err == io.EOF || n == 0 {
					break
				}
				if err != nil {
					s.log.Warn("follow logs", "workload", id, "err", err)
					return
				}
			}
			if rc.Flush() != nil {
				return
			}
		}
		if !here {
			return // read to the end after the state said it left or ended
		}
		select {
		case <-changed:
		case <-tick.C:
		case <-r.Context().Done():
			return
		case <-s.ctx.Done():
			return
		}
	}
}
