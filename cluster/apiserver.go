package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/internal/admit"
	"github.com/pcluster/pcluster/scheduler"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// headerForwarded marks a request one node passed to another, so it is never
// passed on twice.
const headerForwarded = "X-Pcluster-Forwarded"

// httpError is an error with the status the API answers it with.
type httpError struct {
	status int
	err    error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

func badRequest(format string, args ...any) error {
	return &httpError{http.StatusBadRequest, fmt.Errorf(format, args...)}
}

func statusOf(err error) int {
	var he *httpError
	switch {
	case errors.As(err, &he):
		return he.status
	case errors.Is(err, scheduler.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, scheduler.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, scheduler.ErrExists), errors.Is(err, scheduler.ErrStale), errors.Is(err, scheduler.ErrNoNode),
		errors.Is(err, scheduler.ErrRefused):
		return http.StatusConflict
	case errors.Is(err, errNotLeader), errors.Is(err, raft.ErrNotLeader):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(statusOf(err))
	_ = json.NewEncoder(w).Encode(api.ErrorBody{Error: err.Error()})
}

func (s *Server) setupAPI() error {
	if s.cfg.Socket == "" {
		return nil
	}
	s.peers = peerPolicy{uid: os.Geteuid(), group: -1}
	if s.cfg.SocketGroup != "" {
		gid, err := lookupGroup(s.cfg.SocketGroup)
		if err != nil {
			return fmt.Errorf("start: %w", err)
		}
		s.peers.group, s.peers.name = gid, s.cfg.SocketGroup
	}
	if err := os.MkdirAll(filepath.Dir(s.cfg.Socket), 0o755); err != nil {
		return fmt.Errorf("start: socket dir: %w", err)
	}
	if c, err := net.Dial("unix", s.cfg.Socket); err == nil {
		c.Close()
		return fmt.Errorf("start: socket %s: another pclusterd is listening", s.cfg.Socket)
	}
	ln, err := listenSocket(s.cfg.Socket, s.peers.group)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	s.sockLn = ln
	return nil
}

func (s *Server) mux() *http.ServeMux {
	m := http.NewServeMux()
	m.HandleFunc("GET "+api.PathMembers, s.handleMembers)
	m.HandleFunc("GET "+api.PathNodes, s.leaderRead(s.handleNodes))
	m.HandleFunc("GET "+api.PathNodes+"/{name}", s.handleNode)
	m.HandleFunc("POST "+api.PathNodes+"/{name}/eligibility", s.leaderWrite(s.handleEligibility))
	m.HandleFunc("POST "+api.PathNodes+"/{name}/drain", s.leaderWrite(s.handleDrain))
	m.HandleFunc("GET "+api.PathWorkloads, s.leaderRead(s.handleWorkloads))
	m.HandleFunc("POST "+api.PathWorkloads, s.leaderWrite(s.handleRun))
	m.HandleFunc("GET "+api.PathWorkloads+"/{id}", s.leaderRead(s.handleWorkload))
	m.HandleFunc("POST "+api.PathWorkloads+"/{id}/stop", s.leaderWrite(s.handleStop))
	m.HandleFunc("GET "+api.PathWorkloads+"/{id}/logs", s.handleLogs)
	m.HandleFunc("POST "+api.PathReport, s.leaderWrite(s.handleReport))
	m.HandleFunc("GET "+api.PathIndex, s.leaderWrite(s.handleIndex))
	m.HandleFunc("GET "+api.PathBalance, s.leaderRead(s.handleBalance))
	m.HandleFunc("POST "+api.PathBalance, s.leaderWrite(s.handleBalanceSet))
	s.migrationRoutes(m)
	m.HandleFunc("GET "+api.PathEvents, s.handleEvents) // from this node's replica, never forwarded
	s.checkpointRoutes(m)
	m.Handle("GET "+api.PathMetrics, s.metricsHandler())
	return m
}

// metricsHandler refreshes the gauges, then serves them.
func (s *Server) metricsHandler() http.Handler {
	h := promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.metrics.update()
		h.ServeHTTP(w, r)
	})
}

// serveAPI starts the HTTP servers; each goroutine ends when its server is
// shut down.
func (s *Server) serveAPI() {
	h := s.mux()
	serve := func(ln net.Listener, h http.Handler, connCtx func(context.Context, net.Conn) context.Context, connState func(net.Conn, http.ConnState)) {
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ConnContext: connCtx, ConnState: connState}
		s.httpSrvs = append(s.httpSrvs, srv)
		s.goLoop(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Warn("api server", "addr", ln.Addr().String(), "err", err)
			}
		})
	}
	serve(s.apiLn, h, nil, releaseOnRequest) // mutual TLS: only holders of the cluster key
	if s.sockLn != nil {
		serve(s.sockLn, s.checkPeer(h), peerOf, nil)
	}
	if s.cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", s.cfg.MetricsAddr)
		if err != nil {
			s.log.Error("metrics listener", "addr", s.cfg.MetricsAddr, "err", err)
			return
		}
		mm := http.NewServeMux()
		mm.Handle("GET "+api.PathMetrics, s.metricsHandler())
		// Read-only, as Prometheus scrapes: no writes, no workload details.
		// Nothing authenticates here: every connection keeps its place
		// among maxAPIPending until it is closed.
		serve(admit.NewListener(ln, maxAPIPending), mm, nil, nil)
	}
}

// leaderAPI returns the leader's API address, from gossip or the state.
func (s *Server) leaderAPI() (string, error) {
	_, id := s.raft.LeaderWithID()
	return s.apiAddrOf(id)
}

// apiAddrOf returns the API address of raft server id ("": no leader).
func (s *Server) apiAddrOf(id raft.ServerID) (string, error) {
	if id == "" {
		return "", &httpError{http.StatusServiceUnavailable, errors.New("no cluster leader")}
	}
	if m, ok := s.members()[string(id)]; ok && m.ok {
		return m.meta.APIAddr, nil
	}
	var addr string
	s.fsm.Read(func(st *scheduler.State) {
		if n, ok := st.Nodes[string(id)]; ok {
			addr = n.APIAddr
		}
	})
	if addr == "" {
		return "", &httpError{http.StatusServiceUnavailable, fmt.Errorf("leader %s: API address unknown", id)}
	}
	return addr, nil
}

// proxy passes r to the node whose API is at addr, over mutual TLS.
func (s *Server) proxy(w http.ResponseWriter, r *http.Request, addr string) {
	if r.Header.Get(headerForwarded) != "" {
		writeErr(w, &httpError{http.StatusServiceUnavailable, errors.New("forwarded request reached a non-leader; retry")})
		return
	}
	target := &url.URL{Scheme: "https", Host: addr}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Header.Set(headerForwarded, s.cfg.Name)
		},
		Transport: s.peerHTTP.Transport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if c := context.Cause(r.Context()); errors.Is(err, context.Canceled) && c != nil && !errors.Is(c, context.Canceled) {
				err = c // forward's reason: the leader changed
			}
			writeErr(w, &httpError{http.StatusServiceUnavailable, fmt.Errorf("forward to %s: %w", addr, err)})
		},
	}
	rp.ServeHTTP(w, r)
}

// leaderRead serves consistent reads: on the leader after confirming it
// still leads, elsewhere by forwarding to the leader.
func (s *Server) leaderRead(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("stale") != "" {
			h(w, r) // the caller asked for this node's replica as it is
			return
		}
		if s.IsLeader() {
			if err := s.raft.VerifyLeader().Error(); err == nil {
				h(w, r)
				return
			}
		}
		s.forward(w, r)
	}
}

// leaderWrite runs writes on the leader, forwarding them there if needed.
func (s *Server) leaderWrite(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.IsLeader() {
			h(w, r)
			return
		}
		s.forward(w, r)
	}
}

// forward sends the request on to the leader's API, and gives it up (503,
// retry) as soon as this node's raft names another leader or none. A
// leader cut off from the others does not answer: without the watch a
// request forwarded to it in the second before this follower's heartbeat
// timeout would wait out the transport's 30 s ResponseHeaderTimeout on its
// kept-alive connection, long after the others elected a new leader (the
// TestPartitionHeals flake: raft itself named the new leader within
// seconds; the request sent to the old one was still waiting).
func (s *Server) forward(w http.ResponseWriter, r *http.Request) {
	_, id := s.raft.LeaderWithID()
	addr, err := s.apiAddrOf(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	ctx, cancel := context.WithCancelCause(r.Context())
	defer cancel(nil)
	go func() { // ends with the request: forward's cancel
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if _, now := s.raft.LeaderWithID(); now != id {
				if now == "" {
					now = "none"
				}
				cancel(fmt.Errorf("leader %s is no longer this node's leader (now %s); retry", id, now))
				return
			}
		}
	}()
	s.proxy(w, r.WithContext(ctx), addr)
}

func (s *Server) handleMembers(w http.ResponseWriter, r *http.Request) {
	roles := map[string]string{}
	if f := s.raft.GetConfiguration(); f.Error() == nil {
		for _, srv := range f.Configuration().Servers {
			if srv.Suffrage == raft.Voter {
				roles[string(srv.ID)] = "voter"
			} else {
				roles[string(srv.ID)] = "nonvoter"
			}
		}
	}
	if l := s.Leader(); l != "" {
		roles[l] = "leader"
	}
	var out []api.Member
	seen := map[string]bool{}
	for name, mv := range s.members() {
		role := roles[name]
		if role == "" {
			role = "none"
		}
		seen[name] = true
		out = append(out, api.Member{Name: name, Addr: mv.node.Address(), APIAddr: mv.meta.APIAddr, RaftAddr: mv.meta.RaftAddr,
			Status: "alive", Role: role, Load: apiLoad(mv.meta.Load)})
	}
	// Nodes the state knows that gossip no longer shows.
	s.fsm.Read(func(st *scheduler.State) {
		for _, n := range st.SortedNodes() {
			if seen[n.Name] {
				continue
			}
			role := roles[n.Name]
			if role == "" {
				role = "none"
			}
			out = append(out, api.Member{Name: n.Name, Addr: n.GossipAddr, APIAddr: n.APIAddr, RaftAddr: n.RaftAddr,
				Status: "dead", Role: role, Load: apiLoad(n.Load)})
		}
	})
	sortMembers(out)
	writeJSON(w, out)
}

func sortMembers(ms []api.Member) {
	for i := 1; i < len(ms); i++ {
		for j := i; j > 0 && ms[j].Name < ms[j-1].Name; j-- {
			ms[j], ms[j-1] = ms[j-1], ms[j]
		}
	}
}

func (s *Server) handleNodes(w http.ResponseWriter, r *http.Request) {
	var out []api.Node
	s.fsm.Read(func(st *scheduler.State) {
		for _, n := range st.SortedNodes() {
			out = append(out, apiNode(st, n))
		}
	})
	writeJSON(w, out)
}

func (s *Server) handleNode(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if name == "self" {
		// Resolved here: the leader would answer with itself.
		r.URL.Path = api.PathNodes + "/" + url.PathEscape(s.cfg.Name)
		r.SetPathValue("name", s.cfg.Name)
	}
	s.leaderRead(func(w http.ResponseWriter, r *http.Request) {
		name, err := pathName(r, "")
		if err != nil {
			writeErr(w, err)
			return
		}
		var out api.Node
		found := false
		s.fsm.Read(func(st *scheduler.State) {
			if n, ok := st.Nodes[name]; ok {
				out, found = apiNode(st, n), true
			}
		})
		if !found {
			writeErr(w, fmt.Errorf("node %s: %w", name, scheduler.ErrNotFound))
			return
		}
		writeJSON(w, out)
	})(w, r)
}

// pathName returns the {name} of r's path, checked as a node name: it is
// echoed in errors, which are one line. op prefixes the refusal unless "".
func pathName(r *http.Request, op string) (string, error) {
	name := r.PathValue("name")
	if err := scheduler.CheckNodeName(name); err != nil {
		if op == "" {
			return "", &httpError{http.StatusBadRequest, err}
		}
		return "", &httpError{http.StatusBadRequest, fmt.Errorf("%s: %w", op, err)}
	}
	return name, nil
}

// pathID returns the {id} of r's path, checked as a workload id.
func pathID(r *http.Request, op string) (string, error) {
	id := r.PathValue("id")
	if err := scheduler.CheckWorkloadID(id); err != nil {
		return "", &httpError{http.StatusBadRequest, fmt.Errorf("%s: %w", op, err)}
	}
	return id, nil
}

// handleEligibility sets whether placement may pick a node. Making a
// draining node eligible is refused by the FSM (409).
func (s *Server) handleEligibility(w http.ResponseWriter, r *http.Request) {
	name, err := pathName(r, "node eligibility")
	if err != nil {
		writeErr(w, err)
		return
	}
	op := "node eligibility " + name
	var req api.EligibilityRequest
	if err := decodeBody(w, r, op, &req); err != nil {
		writeErr(w, err)
		return
	}
	if req.Eligible == nil {
		writeErr(w, badRequest("%s: field eligible: missing (want true or false)", op))
		return
	}
	if _, err := s.apply(scheduler.CmdNodeEligibility, &scheduler.NodeEligibilityCmd{Name: name, Eligible: *req.Eligible}); err != nil {
		writeErr(w, err)
		return
	}
	s.log.Info("node eligibility set", "node", name, "eligible", *req.Eligible)
	var out api.Node
	s.fsm.Read(func(st *scheduler.State) {
		if n, ok := st.Nodes[name]; ok {
			out = apiNode(st, n)
		}
	})
	writeJSON(w, out)
}

// handleDrain starts (or updates) a node's drain, or cancels it; the
// leader's Drainer carries it out from the state. Refusals are the FSM's:
// unknown node (404), last eligible node, no drain to cancel (409).
func (s *Server) handleDrain(w http.ResponseWriter, r *http.Request) {
	name, err := pathName(r, "drain")
	if err != nil {
		writeErr(w, err)
		return
	}
	op := "drain " + name
	var req api.DrainRequest
	if err := decodeBody(w, r, op, &req); err != nil {
		writeErr(w, err)
		return
	}
	cmd, err := drainCommand(name, req, time.Now())
	if err != nil {
		writeErr(w, err)
		return
	}
	if _, err := s.apply(scheduler.CmdNodeDrain, cmd); err != nil {
		writeErr(w, err)
		return
	}
	s.log.Info("node drain", "node", name, "cancel", req.Disable)
	(&events{s}).poke() // the first round now, not at the next tick
	var out api.Node
	s.fsm.Read(func(st *scheduler.State) {
		if n, ok := st.Nodes[name]; ok {
			out = apiNode(st, n)
		}
	})
	writeJSON(w, out)
}

// drainCommand turns a drain request for node name into the raft command,
// the deadline counted from now; bad fields are a 400.
func drainCommand(name string, req api.DrainRequest, now time.Time) (*scheduler.NodeDrainCmd, error) {
	op := "drain " + name
	cmd := &scheduler.NodeDrainCmd{Name: name, KeepIneligible: req.KeepIneligible, At: now.UnixNano()}
	if req.Disable {
		if req.Deadline != 0 || req.NoDeadline || req.Force || req.MaxParallel != 0 {
			return nil, badRequest("%s: field disable: cancels the drain, takes no deadline, force or max_parallel", op)
		}
		return cmd, nil
	}
	switch {
	case req.Deadline < 0:
		return nil, badRequest("%s: field deadline: %v is negative", op, req.Deadline)
	case req.Deadline > 0 && (req.NoDeadline || req.Force):
		return nil, badRequest("%s: fields deadline, no_deadline and force: give one", op)
	case req.MaxParallel < 0 || req.MaxParallel > scheduler.MaxDrainParallel:
		return nil, badRequest("%s: field max_parallel: %d out of range 1..%d", op, req.MaxParallel, scheduler.MaxDrainParallel)
	}
	d := scheduler.DrainSpec{NoDeadline: req.NoDeadline, Force: req.Force, MaxParallel: req.MaxParallel,
		KeepIneligible: req.KeepIneligible}
	if !req.NoDeadline && !req.Force {
		dl := req.Deadline
		if dl == 0 {
			dl = scheduler.DefaultDrainDeadline
		}
		d.Deadline = now.Add(dl).UnixNano()
	}
	cmd.Drain = &d
	return cmd, nil
}

// handleWorkloads serves one page of the workload list, in creation order:
// ?per_page=N (1..api.MaxPerPage, default api.DefaultPerPage) and
// ?next_token=T from the previous page's api.HeaderNextToken, which is
// absent on the last page (Nomad's pagination).
func (s *Server) handleWorkloads(w http.ResponseWriter, r *http.Request) {
	perPage := api.DefaultPerPage
	if v := r.URL.Query().Get("per_page"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > api.MaxPerPage {
			writeErr(w, badRequest("workloads: per_page %q: want 1..%d", v, api.MaxPerPage))
			return
		}
		perPage = n
	}
	var after struct {
		created int64
		id      string
	}
	token := r.URL.Query().Get("next_token")
	if token != "" {
		c, id, ok := strings.Cut(token, ".")
		n, err := strconv.ParseInt(c, 10, 64)
		if !ok || err != nil || scheduler.CheckWorkloadID(id) != nil {
			writeErr(w, badRequest("workloads: next_token %.80q: malformed", token))
			return
		}
		after.created, after.id = n, id
	}
	out := []api.Workload{}
	next := ""
	s.fsm.Read(func(st *scheduler.State) {
		for _, wl := range st.SortedWorkloads() {
			if token != "" && (wl.CreatedAt < after.created || wl.CreatedAt == after.created && wl.ID < after.id) {
				continue
			}
			if len(out) == perPage {
				next = fmt.Sprintf("%d.%s", wl.CreatedAt, wl.ID)
				break
			}
			out = append(out, apiWorkload(wl))
		}
	})
	if next != "" {
		w.Header().Set(api.HeaderNextToken, next)
	}
	writeJSON(w, out)
}

func (s *Server) workload(id string) (scheduler.Workload, error) {
	var wl scheduler.Workload
	found := false
	s.fsm.Read(func(st *scheduler.State) {
		if p, ok := st.Workloads[id]; ok {
			wl, found = *p, true
		}
	})
	if !found {
		return wl, fmt.Errorf("workload %s: %w", id, scheduler.ErrNotFound)
	}
	return wl, nil
}

func (s *Server) handleWorkload(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "workload")
	if err != nil {
		writeErr(w, err)
		return
	}
	wl, err := s.workload(id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, apiWorkload(&wl))
}

func newID() string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return "w" + hex.EncodeToString(b)
}

// MaxBodyBytes bounds every request body the API reads.
const MaxBodyBytes = 1 << 20

// decodeBody decodes r's JSON body into v: one object, no field v does not
// have, at most MaxBodyBytes. Errors are one line naming what is wrong.
func decodeBody(w http.ResponseWriter, r *http.Request, op string, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.Decode(&struct{}{}) != io.EOF {
		err = errors.New("trailing data after the JSON object")
	}
	var mbe *http.MaxBytesError
	var ute *json.UnmarshalTypeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &mbe):
		return &httpError{http.StatusRequestEntityTooLarge, fmt.Errorf("%s: request body over %d bytes (1 MiB)", op, mbe.Limit)}
	case errors.Is(err, io.EOF):
		return badRequest("%s: empty request body", op)
	case errors.As(err, &ute) && ute.Field != "":
		return badRequest("%s: field %s: %s does not fit %s", op, ute.Field, ute.Value, ute.Type)
	}
	return badRequest("%s: request body: %s", op, strings.TrimPrefix(err.Error(), "json: "))
}

func (s *Server) handleRun(w http.ResponseWriter, r *http.Request) {
	var req api.RunRequest
	if err := decodeBody(w, r, "run", &req); err != nil {
		writeErr(w, err)
		return
	}
	wl, err := s.newWorkload(req)
	if err != nil {
		writeErr(w, err)
		return
	}
	res, err := s.apply(scheduler.CmdWorkloadCreate, &scheduler.WorkloadCreateCmd{Workload: wl})
	if err != nil {
		writeErr(w, err)
		return
	}
	created := res.(scheduler.Workload)
	s.log.Info("workload created", "workload", created.ID, "placed", created.DesiredNode, "command", created.Command)
	writeJSON(w, apiWorkload(&created))
}

// newWorkload validates a run request and places it. The limits are
// scheduler.ValidateWorkload's; the FSM does not apply them again.
func (s *Server) newWorkload(req api.RunRequest) (scheduler.Workload, error) {
	if req.Restart == "" {
		req.Restart = scheduler.RestartNever
	}
	name := req.Name
	if name == "" {
		name = filepath.Base(req.Command)
		if len(name) > scheduler.MaxNameLen {
			name = name[:scheduler.MaxNameLen]
		}
	}
	wl := scheduler.Workload{ID: newID(), Name: name, Command: req.Command, Args: req.Args, Env: req.Env, Cwd: req.Cwd,
		UID: -1, GID: -1, Labels: req.Labels, Constraints: req.Constraints, VIP: req.VIP,
		Resources: scheduler.Resources{CPUMilli: req.CPUMilli, MemoryMB: req.MemoryMB},
		Restart:   scheduler.RestartPolicy{Mode: req.Restart, Max: req.MaxRestarts}, Migrate: req.Migrate, Fence: req.Fence, CreatedAt: time.Now().UnixNano()}
	// Range-checked before the conversion: 2^32 or -7 must never wrap.
	if req.UID != nil {
		id, err := scheduler.CheckID("uid", *req.UID)
		if err != nil {
			return wl, fmt.Errorf("run: %w", err)
		}
		wl.UID = int(id)
	}
	if req.GID != nil {
		id, err := scheduler.CheckID("gid", *req.GID)
		if err != nil {
			return wl, fmt.Errorf("run: %w", err)
		}
		wl.GID = int(id)
	}
	wl.User, wl.Group = req.User, req.Group
	// The limits are checked here, where the command is proposed: the FSM
	// applies whatever is committed (scheduler.CheckCreate says why).
	var err error
	s.fsm.Read(func(st *scheduler.State) { err = scheduler.CheckCreate(st, &wl) })
	if err != nil {
		return wl, fmt.Errorf("run: %w", err)
	}
	if req.Node != "" {
		if err := scheduler.CheckNodeName(req.Node); err != nil {
			return wl, fmt.Errorf("run: %w", err) // echoed below: one line only once checked
		}
	}
	wl.DesiredNode, err = s.place(scheduler.PlacementRequest{Node: req.Node, Constraints: req.Constraints,
		Resources: wl.Resources, VIP: wl.VIP != ""})
	if err != nil {
		return wl, fmt.Errorf("run: %w", err)
	}
	return wl, nil
}

func (s *Server) handleStop(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r, "stop")
	if err != nil {
		writeErr(w, err)
		return
	}
	res, err := s.apply(scheduler.CmdWorkloadStop, &scheduler.WorkloadStopCmd{ID: id, At: time.Now().UnixNano()})
	if err != nil {
		writeErr(w, err)
		return
	}
	wl := res.(scheduler.Workload)
	writeJSON(w, apiWorkload(&wl))
}

// handleLogs serves a workload's log from the node that ran it, forwarding
// the request there when that is another node.
func (s *Server) handleLogs(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("follow") != "" {
		s.handleLogsFollow(w, r) // logsfollow.go
		return
	}
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
	where := wl.Node
	if where == "" {
		where = wl.DesiredNode
	}
	if where != s.cfg.Name {
		var addr string
		s.fsm.Read(func(st *scheduler.State) {
			if n, ok := st.Nodes[where]; ok {
				addr = n.APIAddr
			}
		})
		if addr == "" {
			writeErr(w, &httpError{http.StatusServiceUnavailable, fmt.Errorf("logs %s: node %s unknown", wl.ID, where)})
			return
		}
		s.proxy(w, r, addr)
		return
	}
	stream := r.URL.Query().Get("stream")
	if stream == "" {
		stream = "stdout"
	}
	p, err := s.agent.LogPath(wl.ID, stream)
	if err != nil {
		writeErr(w, &httpError{http.StatusBadRequest, err})
		return
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		w.Header().Set("Content-Type", "text/plain")
		return // not started yet: empty log
	}
	if err != nil {
		writeErr(w, fmt.Errorf("logs %s: %w", wl.ID, err))
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "text/plain")
	_, _ = io.Copy(w, f)
}

func (s *Server) handleReport(w http.ResponseWriter, r *http.Request) {
	var rep api.Report
	if err := decodeBody(w, r, "report", &rep); err != nil {
		writeErr(w, err)
		return
	}
	_, err := s.applyReport(rep)
	if err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// applyReport checks an agent's report and proposes it. The checks are
// made here, not by the FSM (scheduler.CheckReport says why).
func (s *Server) applyReport(rep api.Report) (any, error) {
	signal := ""
	if rep.Kind == api.ReportExited {
		signal = rep.Signal
	}
	if err := scheduler.CheckReport(rep.ID, rep.Node, signal, rep.PID, rep.NSPID, rep.InitPID); err != nil {
		return nil, fmt.Errorf("report: %w", err)
	}
	rep.Message = scheduler.CutMessage(rep.Message)
	switch rep.Kind {
	case api.ReportStarted:
		return s.apply(scheduler.CmdWorkloadStarted, &scheduler.WorkloadStartedCmd{ID: rep.ID, Node: rep.Node,
			Attempt: rep.Attempt, PID: rep.PID, StartTicks: rep.StartTicks, NSPID: rep.NSPID, InitPID: rep.InitPID, At: rep.At.UnixNano()})
	case api.ReportLost:
		return s.apply(scheduler.CmdWorkloadLost, &scheduler.WorkloadLostCmd{ID: rep.ID, Node: rep.Node,
			Attempt: rep.Attempt, Message: rep.Message, At: rep.At.UnixNano()})
	case api.ReportExited:
		return s.apply(scheduler.CmdWorkloadExited, &scheduler.WorkloadExitedCmd{ID: rep.ID, Node: rep.Node,
			Attempt: rep.Attempt, ExitCode: rep.ExitCode, Signal: rep.Signal, Message: rep.Message, At: rep.At.UnixNano()})
	}
	return nil, badRequest("report: unknown kind %q", rep.Kind)
}

func (s *Server) handleIndex(w http.ResponseWriter, r *http.Request) {
	idx, err := s.barrierIndex()
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, api.Index{Index: idx})
}

// barrierIndex, on the leader, waits until every entry committed so far
// is applied here and returns the state's index then.
func (s *Server) barrierIndex() (uint64, error) {
	if err := s.raft.Barrier(10 * time.Second).Error(); err != nil {
		return 0, &httpError{http.StatusServiceUnavailable, fmt.Errorf("barrier: %w", err)}
	}
	var idx uint64
	s.fsm.Read(func(st *scheduler.State) { idx = st.Index })
	return idx, nil
}

// leaderIndex is the node agent's way to learn how far its replica must
// come to be current (node.Config.Sync): the leader's applied index after
// a barrier, from this node when it leads.
func (s *Server) leaderIndex(ctx context.Context) (uint64, error) {
	if s.IsLeader() {
		return s.barrierIndex()
	}
	addr, err := s.leaderAPI()
	if err != nil {
		return 0, err
	}
	c := api.NewWithHTTP(addr, s.peerHTTP)
	c.Wait = 0
	return c.LeaderIndex(ctx)
}

// report is the node agent's way to send a report to the leader (toLeader).
func (s *Server) report(ctx context.Context, rep api.Report) error {
	return s.toLeader(func() (any, error) { return s.applyReport(rep) },
		func(c *api.Client) error { return c.Report(ctx, rep) })
}

// toLeader carries a write of this node's agent to the leader: apply runs
// it when this node leads (a refusal the API would answer with a 4xx comes
// back as the *api.Error a remote leader would send, so the agent tells
// refusals from failures the same way both ways); otherwise send makes
// the request to the leader's API, once (the agent retries).
func (s *Server) toLeader(apply func() (any, error), send func(*api.Client) error) error {
	if s.IsLeader() {
		_, err := apply()
		if err != nil && statusOf(err) < 500 {
			return &api.Error{Status: statusOf(err), Message: err.Error()}
		}
		return err
	}
	addr, err := s.leaderAPI()
	if err != nil {
		return err
	}
	c := api.NewWithHTTP(addr, s.peerHTTP)
	c.Wait = 0
	return send(c)
}

func apiLoad(l scheduler.Load) api.Load {
	return api.Load{CPULoad1: l.CPULoad1, NumCPU: l.NumCPU, MemUsed: l.MemUsed, MemFree: l.MemFree, Workloads: l.Workloads,
		WorkloadCPUMilli: l.WCPU, WorkloadRSS: l.WRSS}
}

func unixTime(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns).UTC()
}

// unixNano is unixTime's inverse: 0 for the zero time.
func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func apiNode(st *scheduler.State, n *scheduler.Node) api.Node {
	return api.Node{Name: n.Name, GossipAddr: n.GossipAddr, RaftAddr: n.RaftAddr, APIAddr: n.APIAddr, Labels: n.Labels,
		Status: string(n.Status), Eligible: n.Eligible, Load: apiLoad(n.Load), LoadAt: unixTime(n.LoadAt),
		StatusAt: unixTime(n.StatusAt), Workloads: st.ActiveOn(n.Name), Drain: apiDrain(st, n)}
}

// apiDrain reports n's drain with its progress: the migrations out of n
// planned since the drain started.
func apiDrain(st *scheduler.State, n *scheduler.Node) *api.NodeDrain {
	d := n.Drain
	if d == nil {
		return nil
	}
	out := &api.NodeDrain{StartedAt: unixTime(d.StartedAt), Deadline: unixTime(d.Deadline), NoDeadline: d.NoDeadline, Force: d.Force,
		MaxParallel: d.MaxParallel, KeepIneligible: d.KeepIneligible, CompletedAt: unixTime(d.CompletedAt), Remaining: st.ActiveOn(n.Name)}
	var failed []*scheduler.Migration
	for _, m := range st.Migrations {
		if m.Source != n.Name || m.PlannedAt < d.StartedAt {
			continue
		}
		switch {
		case m.State.Active():
			out.InFlight++
		case m.State == scheduler.MigrationDone:
			out.Moved++
		case m.State == scheduler.MigrationAborted:
			failed = append(failed, m)
		}
	}
	// Past the deadline the stuck workloads are being stopped: the drain
	// ends by itself, nothing stays.
	if !d.Force && (d.NoDeadline || time.Now().UnixNano() < d.Deadline) {
		for id, why := range scheduler.DrainStuck(st, n) {
			out.Stuck = append(out.Stuck, id+": "+why)
		}
	}
	sort.Strings(out.Stuck)
	for id, node := range scheduler.DrainRestarted(st, n) {
		out.Restarted = append(out.Restarted, id+" on "+node)
	}
	sort.Strings(out.Restarted)
	sort.Slice(failed, func(i, j int) bool { return failed[i].PlanIndex < failed[j].PlanIndex })
	for _, m := range failed {
		out.Failed = append(out.Failed, m.WorkloadID+": "+m.Error)
	}
	return out
}

func apiWorkload(w *scheduler.Workload) api.Workload {
	var fo *api.Failover
	if f := w.Failover; f != nil {
		fo = &api.Failover{At: unixTime(f.At), From: f.From, To: f.To, Checkpoint: f.Seq, Age: api.Duration(f.Age)}
	}
	return api.Workload{Failover: fo, ID: w.ID, Name: w.Name, Command: w.Command, Args: w.Args, Env: w.Env, Cwd: w.Cwd, UID: w.UID,
		GID: w.GID, User: w.User, Group: w.Group, Labels: w.Labels, Constraints: w.Constraints, VIP: w.VIP, MemoryMB: w.Resources.MemoryMB,
		CPUMilli: w.Resources.CPUMilli, Restart: w.Restart.Mode, MaxRestarts: w.Restart.Max, Migrate: w.Migrate, Fence: w.Fence, Desired: w.Desired,
		DesiredNode: w.DesiredNode, Node: w.Node, State: string(w.State), Attempt: w.Attempt, Restarts: w.Restarts,
		PID: w.PID, NSPID: w.NSPID, InitPID: w.InitPID, ExitCode: w.ExitCode, Signal: w.Signal, Message: w.Message, CreatedAt: unixTime(w.CreatedAt),
		StartedAt: unixTime(w.StartedAt), EndedAt: unixTime(w.EndedAt), ModifyIndex: w.ModifyIndex}
}
