package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/scheduler"
)

// The API side of migrations: operators plan them, agents step them, and
// the source agent opens the transfer to the target agent through the
// target's TLS API (docs/cluster.md, "Migration protocol").

// upgradeProto names the protocol a transfer connection switches to.
const upgradeProto = "pcluster-migration/1"

func (s *Server) migrationRoutes(m *http.ServeMux) {
	m.HandleFunc("GET "+api.PathMigrations, s.leaderRead(s.handleMigrations))
	m.HandleFunc("POST "+api.PathMigrations, s.leaderWrite(s.handleMigrate))
	m.HandleFunc("GET "+api.PathMigrations+"/{id}", s.leaderRead(s.handleMigration))
	m.HandleFunc("POST "+api.PathMigrations+"/{id}/step", s.leaderWrite(s.handleMigrationStep))
	// Served by the target itself, never forwarded: the source dials the
	// node the state names.
	m.HandleFunc("POST "+api.PathMigrations+"/{id}/transfer", s.handleTransfer)
}

func apiMigration(st *scheduler.State, m *scheduler.Migration) api.Migration {
	out := api.Migration{ID: m.ID, Workload: m.WorkloadID, Source: m.Source, Target: m.Target, State: string(m.State),
		Attempt: m.Attempt, Reason: m.Reason, Origin: m.Origin, Error: m.Error, PlannedAt: unixTime(m.PlannedAt), UpdatedAt: unixTime(m.UpdatedAt),
		EndedAt: unixTime(m.EndedAt), ModifyIndex: m.ModifyIndex, TransferAt: unixTime(m.TransferAt), Bytes: m.Bytes,
		Rounds: m.Rounds, PrecopyBytes: m.PrecopyBytes, StoppedAt: unixTime(m.StoppedAt)}
	if w, ok := st.Workloads[m.WorkloadID]; ok {
		out.Name = w.Name
	}
	return out
}

// handleMigrations lists the migrations in flight, or with ?all=1 all
// the state keeps, in the order they were planned.
func (s *Server) handleMigrations(w http.ResponseWriter, r *http.Request) {
	all := r.URL.Query().Get("all") != ""
	out := []api.Migration{}
	s.fsm.Read(func(st *scheduler.State) {
		ms := make([]*scheduler.Migration, 0, len(st.Migrations))
		for _, m := range st.Migrations {
			if all || m.State.Active() {
				ms = append(ms, m)
			}
		}
		sort.Slice(ms, func(i, j int) bool { return ms[i].PlanIndex < ms[j].PlanIndex })
		for _, m := range ms {
			out = append(out, apiMigration(st, m))
		}
	})
	writeJSON(w, out)
}

func (s *Server) handleMigration(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := scheduler.CheckWorkloadID(id); err != nil {
		writeErr(w, badRequest("migration: %v", err))
		return
	}
	var out api.Migration
	found := false
	s.fsm.Read(func(st *scheduler.State) {
		if m, ok := st.Migrations[id]; ok {
			out, found = apiMigration(st, m), true
		}
	})
	if !found {
		writeErr(w, fmt.Errorf("migration %s: %w", id, scheduler.ErrNotFound))
		return
	}
	writeJSON(w, out)
}

// resolveWorkload finds a workload by ID, else by name: the one active
// workload of that name.
func resolveWorkload(st *scheduler.State, ref string) (*scheduler.Workload, error) {
	if w, ok := st.Workloads[ref]; ok {
		return w, nil
	}
	var found []*scheduler.Workload
	for _, w := range st.SortedWorkloads() {
		if w.Name == ref && w.State.Active() {
			found = append(found, w)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("workload %s: %w", ref, scheduler.ErrNotFound)
	case 1:
		return found[0], nil
	}
	return nil, &httpError{http.StatusConflict, fmt.Errorf("workload name %s is ambiguous: %d active workloads (%s, %s, ...); give an ID",
		ref, len(found), found[0].ID, found[1].ID)}
}

// handleMigrate plans a migration: the target given, or placement's pick
// among the other nodes. The state's rules (scheduler.CheckMigration) are
// checked first to answer at once, and again by the FSM.
func (s *Server) handleMigrate(w http.ResponseWriter, r *http.Request) {
	var req api.MigrateRequest
	if err := decodeBody(w, r, "migrate", &req); err != nil {
		writeErr(w, err)
		return
	}
	if err := scheduler.CheckWorkloadID(req.Workload); err != nil {
		writeErr(w, badRequest("migrate: %v", err))
		return
	}
	if req.Node != "" {
		if err := scheduler.CheckNodeName(req.Node); err != nil {
			writeErr(w, badRequest("migrate: %v", err))
			return
		}
	}
	reason := req.Reason
	if reason == "" {
		reason = "operator"
	}
	var (
		wl  scheduler.Workload
		err error
	)
	s.fsm.Read(func(st *scheduler.State) {
		var p *scheduler.Workload
		if p, err = resolveWorkload(st, req.Workload); err == nil {
			wl = *p
			// The checks that do not depend on the target come first.
			err = scheduler.CheckMigration(st, p, req.Node)
			if req.Node == "" && err != nil && errors.Is(err, scheduler.ErrInvalid) {
				err = nil
			}
		}
	})
	if err != nil {
		writeErr(w, err)
		return
	}
	target := req.Node
	if target == "" {
		target, err = s.place(scheduler.PlacementRequest{Constraints: wl.Constraints, Resources: wl.Resources, VIP: wl.VIP != "",
			Exclude: map[string]string{wl.Node: "the workload runs there"}})
		if err != nil {
			writeErr(w, fmt.Errorf("migrate %s: %w", wl.ID, err))
			return
		}
	} else if why, ok := s.unreachableNode(target); ok {
		writeErr(w, &httpError{http.StatusConflict, fmt.Errorf("migrate %s: target %s: %s", wl.ID, target, why)})
		return
	}
	res, err := s.apply(scheduler.CmdMigrationPlan, &scheduler.MigrationPlanCmd{WorkloadID: wl.ID, Target: target,
		Reason: reason, Origin: scheduler.OriginOperator, At: time.Now().UnixNano()})
	if err != nil {
		writeErr(w, err)
		return
	}
	m := res.(scheduler.Migration)
	s.log.Info("migration planned", "migration", m.ID, "workload", m.WorkloadID, "source", m.Source, "target", m.Target)
	var out api.Migration
	s.fsm.Read(func(st *scheduler.State) { out = apiMigration(st, &m) })
	writeJSON(w, out)
}

// unreachableNode says why node name cannot be reached now, if so.
func (s *Server) unreachableNode(name string) (string, bool) {
	var why string
	var ok bool
	s.fsm.Read(func(st *scheduler.State) {
		if _, known := st.Nodes[name]; known {
			why, ok = s.unreachable(st)[name]
		}
	})
	return why, ok
}

func (s *Server) handleMigrationStep(w http.ResponseWriter, r *http.Request) {
	var st api.MigrationStep
	if err := decodeBody(w, r, "migration step", &st); err != nil {
		writeErr(w, err)
		return
	}
	if st.ID != r.PathValue("id") {
		writeErr(w, badRequest("migration step: body names migration %.64q, path %.64q", st.ID, r.PathValue("id")))
		return
	}
	if _, err := s.applyStep(st); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) applyStep(st api.MigrationStep) (any, error) {
	if st.Node == "" {
		return nil, badRequest("migration step %.64q: field node: empty (only the leader writes steps without one)", st.ID)
	}
	return s.apply(scheduler.CmdMigrationStep, &scheduler.MigrationStepCmd{ID: st.ID, Attempt: st.Attempt, Node: st.Node,
		To: scheduler.MigrationState(st.To), Error: scheduler.CutMessage(st.Error), PID: st.PID, StartTicks: st.StartTicks,
		InitPID: st.InitPID, Bytes: st.Bytes, Rounds: st.Rounds, PrecopyBytes: st.PrecopyBytes, StoppedAt: unixNano(st.StoppedAt),
		At: st.At.UnixNano()})
}

// step is the node agent's way to write a migration step (toLeader).
func (s *Server) step(ctx context.Context, st api.MigrationStep) error {
	return s.toLeader(func() (any, error) { return s.applyStep(st) },
		func(c *api.Client) error { return c.MigrationStep(ctx, st) })
}

// handleTransfer takes the stream of a migration to this node. Only over
// the TLS API: the connection's client certificate proves the peer holds
// the cluster key, and the migration, which this node's replica must list
// as planned or transferring to this node at the request's attempt, binds
// the transfer to one move. Then the connection switches protocols (101)
// and this handler runs the agent's whole target side on it.
func (s *Server) handleTransfer(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		writeErr(w, &httpError{http.StatusForbidden, fmt.Errorf("migration %.64q: transfers come only over the cluster's mutual TLS", id)})
		return
	}
	attempt, err := strconv.Atoi(r.URL.Query().Get("attempt"))
	if err != nil {
		writeErr(w, badRequest("migration %.64q: attempt %q: want a number", id, r.URL.Query().Get("attempt")))
		return
	}
	if v := r.URL.Query().Get("index"); v != "" {
		idx, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeErr(w, badRequest("migration %.64q: index %q: want a number", id, v))
			return
		}
		// The source saw the migration at idx: our replica may lag.
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		err = s.agent.AwaitIndex(ctx, idx)
		cancel()
		if err != nil {
			writeErr(w, &httpError{http.StatusServiceUnavailable, fmt.Errorf("migration %.64q: %w", id, err)})
			return
		}
	}
	if err := s.agent.CheckIncoming(id, attempt); err != nil {
		writeErr(w, err)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		writeErr(w, errors.New("transfer: connection cannot be taken over"))
		return
	}
	conn, rw, err := hj.Hijack()
	if err != nil {
		s.log.Warn("transfer: hijack", "migration", id, "err", err)
		return
	}
	_ = conn.SetDeadline(time.Time{}) // the stream sets its own
	_, err = fmt.Fprintf(rw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n", upgradeProto)
	if err == nil {
		err = rw.Flush()
	}
	if err != nil {
		conn.Close()
		return
	}
	from := r.TLS.PeerCertificates[0].Subject.CommonName
	s.log.Info("incoming migration", "migration", id, "from", from, "peer", conn.RemoteAddr().String())
	_ = s.agent.Receive(s.ctx, &bufConn{Conn: conn, r: rw.Reader}, id, attempt)
}

// bufConn reads first what the HTTP server had buffered.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// dialTarget opens the transfer of migration m: mutual TLS to the API of
// the node the state names as target, a request naming the migration and
// its attempt, and the switch to the stream once the target accepted.
func (s *Server) dialTarget(ctx context.Context, m scheduler.Migration) (net.Conn, error) {
	var addr string
	s.fsm.Read(func(st *scheduler.State) {
		if n, ok := st.Nodes[m.Target]; ok {
			addr = n.APIAddr
		}
	})
	if addr == "" {
		return nil, fmt.Errorf("migration %s: target %s: API address unknown", m.ID, m.Target)
	}
	d := net.Dialer{Timeout: 5 * time.Second, KeepAlive: 15 * time.Second}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("migration %s: target %s at %s: %w", m.ID, m.Target, addr, err)
	}
	cfg := s.peerTLS
	if cfg.ServerName == "" {
		// As tls.Dialer does: the certificate is checked against the
		// address dialled.
		cfg = cfg.Clone()
		cfg.ServerName, _, _ = net.SplitHostPort(addr)
	}
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	conn, err := dialBatchedTLS(hctx, raw, cfg)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("migration %s: target %s at %s: %w", m.ID, m.Target, addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	path := api.PathMigrations + "/" + url.PathEscape(m.ID) + "/transfer?attempt=" + strconv.Itoa(m.Attempt) +
		"&index=" + strconv.FormatUint(m.ModifyIndex, 10)
	req, _ := http.NewRequest(http.MethodPost, "https://"+addr+path, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", upgradeProto)
	br := bufio.NewReader(conn)
	err = req.Write(conn)
	var resp *http.Response
	if err == nil {
		resp, err = http.ReadResponse(br, req)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("migration %s: target %s at %s: %w", m.ID, m.Target, addr, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		var eb api.ErrorBody
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		conn.Close()
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = resp.Status
		}
		return nil, fmt.Errorf("migration %s: target %s refused the transfer: %s", m.ID, m.Target, eb.Error)
	}
	_ = conn.SetDeadline(time.Time{})
	return &bufConn{Conn: conn, r: br}, nil
}

// timeOutMigrations aborts, on the leader, the migrations stuck before
// their commit (scheduler.MigrationClock decides, on this server's clock;
// the leader loop alone calls it).
func (s *Server) timeOutMigrations(now time.Time) {
	var cmds []scheduler.Command
	s.fsm.Read(func(st *scheduler.State) { cmds = s.migClock.Timeouts(st, now, s.cfg.MigrationTimeout) })
	for _, c := range cmds {
		if _, err := s.apply(c.Type, c.Payload); err != nil {
			s.log.Info("migration timeout not applied", "err", err)
			continue
		}
		s.log.Warn("migration aborted: no progress", "migration", c.Payload.(*scheduler.MigrationStepCmd).ID)
	}
}
