package cluster

import (
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/cluster/web"
	"github.com/pcluster/pcluster/internal/admit"
	"github.com/pcluster/pcluster/scheduler"
)

// The status page (package web) is served on its own listener: by default
// plain HTTP on 127.0.0.1 at the gossip port + 3, beyond loopback only over
// TLS (Config.WebCert, WebKey). Every request must carry the access token:
// the URL pclusterd prints (?token=, which sets an HttpOnly, SameSite=Strict
// cookie and redirects it away from the address bar), the cookie, or an
// "Authorization: Bearer" header. Loopback is not enough: every local user
// reaches it, and the page lists what every workload runs.

// webTokenCookie holds the access token in the browser.
const webTokenCookie = "pcluster_web"

// webRecent is how many past events the page is sent when it opens.
const webRecent = 100

// WebOff disables the status page (Config.WebAddr).
const WebOff = "off"

// setupWeb listens for the status page. An address that was not asked for
// (the default) that cannot be had is logged and skipped: the page is not
// worth a node.
func (s *Server) setupWeb() error {
	addr := s.cfg.WebAddr
	if addr == WebOff {
		return nil
	}
	asked := addr != ""
	if !asked {
		_, port, err := net.SplitHostPort(s.cfg.BindAddr)
		if err != nil {
			return fmt.Errorf("start: web: %w", err)
		}
		p, _ := strconv.Atoi(port)
		if p != 0 {
			p += 3
		}
		addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("start: web address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	loopback := ip != nil && ip.IsLoopback() || host == "localhost"
	useTLS := s.cfg.WebCert != "" || s.cfg.WebKey != ""
	if !loopback && !useTLS {
		return fmt.Errorf("start: web address %s is not loopback: serving the page beyond this host needs TLS (-web-cert and -web-key)", addr)
	}
	token, err := s.webToken()
	if err != nil {
		return fmt.Errorf("start: web: %w", err)
	}
	var tlsCfg *tls.Config
	if useTLS {
		cert, err := tls.LoadX509KeyPair(s.cfg.WebCert, s.cfg.WebKey)
		if err != nil {
			return fmt.Errorf("start: web certificate %s, key %s: %w", s.cfg.WebCert, s.cfg.WebKey, err)
		}
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if !asked {
			s.log.Warn("status page not served: its default address is taken (set -web ADDR or -web off)", "addr", addr, "err", err)
			return nil
		}
		return fmt.Errorf("start: web listen %s: %w", addr, err)
	}
	ln = admit.NewListener(ln, maxAPIPending)
	scheme := "http"
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg)
		scheme = "https"
	}
	s.webLn, s.webTok = ln, token
	shown := ln.Addr().String()
	if h, p, _ := net.SplitHostPort(shown); h == "::" || h == "0.0.0.0" {
		shown = net.JoinHostPort(s.advertise.String(), p)
	}
	s.webURL = scheme + "://" + shown + "/"
	return nil
}

// webToken returns the page's access token: the file Config.WebTokenFile
// names, else DATA_DIR/web-token, made (0600) when missing.
func (s *Server) webToken() (string, error) {
	path := s.cfg.WebTokenFile
	made := false
	if path == "" {
		path = filepath.Join(s.cfg.DataDir, "web-token")
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			b := make([]byte, 24)
			if _, err := rand.Read(b); err != nil {
				return "", err
			}
			if err := os.WriteFile(path, []byte(hex.EncodeToString(b)+"\n"), 0o600); err != nil {
				return "", fmt.Errorf("token file %s: %w", path, err)
			}
			made = true
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("token file %s: %w", path, err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < 16 || strings.ContainsAny(tok, " \t\r\n;,\"") {
		return "", fmt.Errorf("token file %s: want one token of 16 or more characters without spaces, quotes, commas or semicolons", path)
	}
	if !made {
		if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
			return "", fmt.Errorf("token file %s: mode %v lets other users read it; want 0600", path, fi.Mode().Perm())
		}
	}
	return tok, nil
}

// WebURL returns the status page's address ("" when not served) and the
// token that opens it.
func (s *Server) WebURL() (url, token string) { return s.webURL, s.webTok }

func (s *Server) webMux() http.Handler {
	m := http.NewServeMux()
	files := http.FileServerFS(web.Files())
	m.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		if tok := r.URL.Query().Get("token"); tok != "" {
			if !s.webTokenOK(tok) {
				webDenied(w)
				return
			}
			http.SetCookie(w, &http.Cookie{Name: webTokenCookie, Value: tok, Path: "/", HttpOnly: true,
				Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
			http.Redirect(w, r, "/", http.StatusSeeOther)
			return
		}
		if !s.webAuth(r) {
			webDenied(w)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		http.ServeFileFS(w, r, web.Files(), "index.html")
	})
	m.Handle("GET /ui/{file}", s.webAuthed(http.StripPrefix("/ui/", files)))
	m.Handle("GET /ui/state", s.webAuthed(http.HandlerFunc(s.handleWebState)))
	m.Handle("GET /ui/events", s.webAuthed(http.HandlerFunc(s.handleWebEvents)))
	return securityHeaders(m)
}

// securityHeaders: nothing of the page may be framed or load from
// elsewhere.
func securityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

func (s *Server) webTokenOK(tok string) bool {
	return subtle.ConstantTimeCompare([]byte(tok), []byte(s.webTok)) == 1
}

func (s *Server) webAuth(r *http.Request) bool {
	if c, err := r.Cookie(webTokenCookie); err == nil && s.webTokenOK(c.Value) {
		return true
	}
	if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok && s.webTokenOK(tok) {
		return true
	}
	return false
}

func (s *Server) webAuthed(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.webAuth(r) {
			webDenied(w)
			return
		}
		h.ServeHTTP(w, r)
	})
}

func webDenied(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusUnauthorized)
	io.WriteString(w, "web: missing or wrong access token: open the URL pclusterd printed, or send Authorization: Bearer TOKEN (DATA_DIR/web-token)\n")
}

// webState is what the page's tables show, from this node's replica.
type webState struct {
	Node       string          `json:"node"`
	Leader     string          `json:"leader"`
	Index      uint64          `json:"index"`
	Nodes      []api.Node      `json:"nodes"`
	Workloads  []api.Workload  `json:"workloads"`
	Migrations []api.Migration `json:"migrations"` // in flight
	// Checkpoints: each workload's newest kept checkpoint.
	Checkpoints []api.Checkpoint `json:"checkpoints"`
}

func (s *Server) handleWebState(w http.ResponseWriter, r *http.Request) {
	out := webState{Node: s.cfg.Name, Leader: s.Leader(), Nodes: []api.Node{}, Workloads: []api.Workload{}, Migrations: []api.Migration{},
		Checkpoints: []api.Checkpoint{}}
	s.fsm.Read(func(st *scheduler.State) {
		out.Index = st.Index
		for _, n := range st.SortedNodes() {
			out.Nodes = append(out.Nodes, apiNode(st, n))
		}
		for _, wl := range st.SortedWorkloads() {
			aw := apiWorkload(wl)
			aw.Env, aw.Args = nil, nil // may hold secrets; the page does not show them
			out.Workloads = append(out.Workloads, aw)
			if r := st.Checkpoints[wl.ID]; r != nil && len(r.List) > 0 {
				out.Checkpoints = append(out.Checkpoints, apiCheckpoint(r.List[len(r.List)-1]))
			}
		}
		for _, m := range st.Migrations {
			if m.State.Active() {
				out.Migrations = append(out.Migrations, apiMigration(st, m))
			}
		}
	})
	sort.Slice(out.Migrations, func(i, j int) bool { return out.Migrations[i].PlannedAt.Before(out.Migrations[j].PlannedAt) })
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, out)
}

// serveWeb serves the status page until Shutdown.
func (s *Server) serveWeb() {
	if s.webLn == nil {
		return
	}
	srv := &http.Server{Handler: s.webMux(), ReadHeaderTimeout: 10 * time.Second}
	s.httpSrvs = append(s.httpSrvs, srv)
	ln := s.webLn
	s.goLoop(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Warn("web server", "addr", ln.Addr().String(), "err", err)
		}
	})
	s.log.Info("status page", "url", s.webURL, "token_file", s.webTokenPath())
}

// webTokenPath names the file holding the page's token, for the log.
func (s *Server) webTokenPath() string {
	if s.cfg.WebTokenFile != "" {
		return s.cfg.WebTokenFile
	}
	return filepath.Join(s.cfg.DataDir, "web-token")
}

// handleWebEvents serves the event stream as server-sent events: "id" is
// INDEX.SEQ, which the browser sends back as Last-Event-ID when it
// reconnects; an index the node no longer keeps is an event "gone".
func (s *Server) handleWebEvents(w http.ResponseWriter, r *http.Request) {
	var from uint64
	var after *api.Event
	recent := false
	if id := r.Header.Get("Last-Event-ID"); id != "" {
		i, q, _ := strings.Cut(id, ".")
		idx, err1 := strconv.ParseUint(i, 10, 64)
		seq, err2 := strconv.Atoi(q)
		if err1 != nil || err2 != nil {
			http.Error(w, "web events: Last-Event-ID "+strconv.Quote(id)+": want INDEX.SEQ", http.StatusBadRequest)
			return
		}
		from, after = idx, &api.Event{Index: idx, Seq: seq}
	} else if r.URL.Query().Get("index") == "0" {
		recent = true
	} else {
		from = s.evlog.next()
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	tick := time.NewTicker(eventHeartbeat)
	defer tick.Stop()
	for {
		evs, changed, next, err := s.evlog.since(from)
		if err != nil {
			fmt.Fprintf(w, "event: gone\ndata: %s\n\n", strings.ReplaceAll(err.Error(), "\n", " "))
			_ = rc.Flush()
			return
		}
		if recent && len(evs) > webRecent {
			evs = evs[len(evs)-webRecent:]
		}
		recent = false
		for _, e := range evs {
			if after != nil && !e.After(*after) {
				continue
			}
			b, _ := json.Marshal(e)
			if _, err := fmt.Fprintf(w, "id: %d.%d\ndata: %s\n\n", e.Index, e.Seq, b); err != nil {
				return
			}
		}
		after = nil
		if rc.Flush() != nil {
			return
		}
		from = next
		select {
		case <-changed:
		case <-tick.C:
			if _, err := io.WriteString(w, ": ping\n\n"); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		case <-s.ctx.Done():
			return
		}
	}
}
