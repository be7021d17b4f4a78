package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster/pki"
)

// Environment variables read by NewFromEnv.
const (
	EnvAddress = "PCLUSTER_ADDR"     // unix socket path or host:port
	EnvKeyFile = "PCLUSTER_KEY_FILE" // cluster key, needed for host:port
)

// DefaultSocket is where pclusterd listens when not told otherwise.
const DefaultSocket = "/run/pcluster/pclusterd.sock"

// Error is a non-2xx answer from pclusterd.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string { return e.Message }

// IsNotFound reports whether err is a 404 answer.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

// IsUnavailable reports whether err means the cluster could not answer (no
// daemon, no leader), as opposed to refusing the request.
func IsUnavailable(err error) bool {
	var e *Error
	if errors.As(err, &e) {
		return e.Status == http.StatusServiceUnavailable || e.Status == http.StatusBadGateway
	}
	var ne net.Error
	var oe *net.OpError
	return errors.As(err, &ne) || errors.As(err, &oe) || errors.Is(err, os.ErrNotExist)
}

// IsAuth reports whether err is a failed TLS authentication: the two ends
// do not share the cluster key.
func IsAuth(err error) bool {
	var ua x509.UnknownAuthorityError
	var cv *tls.CertificateVerificationError
	var ae tls.AlertError
	return errors.As(err, &ua) || errors.As(err, &cv) || errors.As(err, &ae)
}

// Client talks to one pclusterd.
type Client struct {
	base  string
	where string // for messages: the socket path or host:port
	hc    *http.Client
	// Wait bounds how long writes are retried while the cluster has no
	// leader.
	Wait time.Duration
	// Stale makes reads answer from the contacted node's replica instead
	// of the leader's (faster, possibly behind).
	Stale bool
	// PerPage is the page size Workloads asks for (0: the server's
	// default).
	PerPage int
}

// New returns a client for address: a unix socket path (absolute, or
// "unix://PATH"), or "host:port" / "https://host:port", which needs the
// cluster key to make a client certificate.
func New(address string, key pki.Key) (*Client, error) {
	if address == "" {
		address = DefaultSocket
	}
	if p, ok := strings.CutPrefix(address, "unix://"); ok || strings.HasPrefix(address, "/") || strings.HasPrefix(address, ".") {
		if !ok {
			p = address
		}
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", p)
		}}
		return &Client{base: "http://pclusterd", where: p, hc: &http.Client{Transport: tr}, Wait: 10 * time.Second}, nil
	}
	hostport := strings.TrimPrefix(address, "https://")
	if _, _, err := net.SplitHostPort(hostport); err != nil {
		return nil, fmt.Errorf("address %q: want a socket path or host:port", address)
	}
	if key == nil {
		return nil, fmt.Errorf("address %s: a remote node needs the cluster key (-key-file or $%s)", address, EnvKeyFile)
	}
	ca, err := key.CA()
	if err != nil {
		return nil, err
	}
	cert, err := ca.Issue("pclusterctl")
	if err != nil {
		return nil, err
	}
	return NewTLS(hostport, ca.ClientTLS(cert)), nil
}

// NewTLS returns a client for hostport over TLS with cfg, for daemons that
// already hold a certificate.
func NewTLS(hostport string, cfg *tls.Config) *Client {
	tr := &http.Transport{TLSClientConfig: cfg.Clone(), MaxIdleConnsPerHost: 4, IdleConnTimeout: 30 * time.Second,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext, TLSHandshakeTimeout: 10 * time.Second}
	return &Client{base: "https://" + hostport, where: hostport, hc: &http.Client{Transport: tr}, Wait: 10 * time.Second}
}

// NewWithHTTP returns a client for hostport over TLS using hc, whose
// transport must carry the cluster TLS config (daemons share one).
func NewWithHTTP(hostport string, hc *http.Client) *Client {
	return &Client{base: "https://" + hostport, where: hostport, hc: hc, Wait: 10 * time.Second}
}

// NewFromEnv returns a client for address, or $PCLUSTER_ADDR, or the default
// socket, reading the key from keyFile or $PCLUSTER_KEY_FILE when remote.
func NewFromEnv(address, keyFile string) (*Client, error) {
	if address == "" {
		address = os.Getenv(EnvAddress)
	}
	if keyFile == "" {
		keyFile = os.Getenv(EnvKeyFile)
	}
	var key pki.Key
	if keyFile != "" {
		k, err := pki.ReadKeyFile(keyFile)
		if err != nil {
			return nil, err
		}
		key = k
	}
	return New(address, key)
}

// do sends one request and decodes a JSON answer into out (if not nil).
// Answers 503 (no leader yet) are retried until c.Wait has passed.
func (c *Client) do(ctx context.Context, method, path string, in, out any, header ...func(http.Header)) error {
	var body []byte
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%s %s: %w", method, path, err)
		}
		body = b
	}
	if c.Stale && method == http.MethodGet {
		if strings.Contains(path, "?") {
			path += "&stale=1"
		} else {
			path += "?stale=1"
		}
	}
	deadline := time.Now().Add(c.Wait)
	for {
		resp, err := c.send(ctx, method, path, body)
		if err != nil {
			return err
		}
		for _, h := range header {
			h(resp.Header)
		}
		err = decode(resp, out)
		var e *Error
		if errors.As(err, &e) && e.Status == http.StatusServiceUnavailable && time.Now().Before(deadline) {
			select {
			case <-time.After(250 * time.Millisecond):
				continue
			case <-ctx.Done():
				return err
			}
		}
		if err != nil && !errors.As(err, &e) {
			return fmt.Errorf("%s %s: %w", method, path, err)
		}
		return err
	}
}

func (c *Client) send(ctx context.Context, method, path string, body []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("reach pclusterd at %s: %w", c.where, err)
	}
	return resp, nil
}

func decode(resp *http.Response, out any) error {
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = strings.TrimSpace(string(b))
			if eb.Error == "" {
				eb.Error = resp.Status
			}
		}
		return &Error{Status: resp.StatusCode, Message: eb.Error}
	}
	if out == nil {
		_, err := io.Copy(io.Discard, resp.Body)
		return err
	}
	if w, ok := out.(io.Writer); ok {
		_, err := io.Copy(w, resp.Body)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Members lists the gossip members with their raft roles.
func (c *Client) Members(ctx context.Context) ([]Member, error) {
	var out []Member
	return out, c.do(ctx, http.MethodGet, PathMembers, nil, &out)
}

// Nodes lists the nodes in the replicated state.
func (c *Client) Nodes(ctx context.Context) ([]Node, error) {
	var out []Node
	return out, c.do(ctx, http.MethodGet, PathNodes, nil, &out)
}

// Node returns one node; name "" means the answering node.
func (c *Client) Node(ctx context.Context, name string) (Node, error) {
	var out Node
	if name == "" {
		name = "self"
	}
	return out, c.do(ctx, http.MethodGet, PathNodes+"/"+url.PathEscape(name), nil, &out)
}

// SetEligibility makes node name eligible for new workloads or not, and
// returns the node as the state then records it.
func (c *Client) SetEligibility(ctx context.Context, name string, eligible bool) (Node, error) {
	var out Node
	return out, c.do(ctx, http.MethodPost, PathNodes+"/"+url.PathEscape(name)+"/eligibility", EligibilityRequest{Eligible: &eligible}, &out)
}

// Drain starts, updates or cancels node name's drain and returns the node
// as the state then records it.
func (c *Client) Drain(ctx context.Context, name string, req DrainRequest) (Node, error) {
	var out Node
	return out, c.do(ctx, http.MethodPost, PathNodes+"/"+url.PathEscape(name)+"/drain", req, &out)
}

// Run creates a workload and returns it as placed.
func (c *Client) Run(ctx context.Context, req RunRequest) (Workload, error) {
	var out Workload
	return out, c.do(ctx, http.MethodPost, PathWorkloads, req, &out)
}

// Workloads lists all workloads, following the pages.
func (c *Client) Workloads(ctx context.Context) ([]Workload, error) {
	var all []Workload
	token := ""
	for {
		page, next, err := c.WorkloadsPage(ctx, c.PerPage, token)
		if err != nil {
			return all, err
		}
		all = append(all, page...)
		if next == "" {
			return all, nil
		}
		token = next
	}
}

// WorkloadsPage returns up to perPage workloads (0: the server's default)
// after the page whose next token is token ("" for the first), and the token
// of the next page, "" after the last.
func (c *Client) WorkloadsPage(ctx context.Context, perPage int, token string) ([]Workload, string, error) {
	q := url.Values{}
	if perPage > 0 {
		q.Set("per_page", strconv.Itoa(perPage))
	}
	if token != "" {
		q.Set("next_token", token)
	}
	path := PathWorkloads
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out []Workload
	var next string
	err := c.do(ctx, http.MethodGet, path, nil, &out, func(h http.Header) { next = h.Get(HeaderNextToken) })
	return out, next, err
}

// Workload returns one workload.
func (c *Client) Workload(ctx context.Context, id string) (Workload, error) {
	var out Workload
	return out, c.do(ctx, http.MethodGet, PathWorkloads+"/"+url.PathEscape(id), nil, &out)
}

// Stop asks for a workload to be stopped and returns it.
func (c *Client) Stop(ctx context.Context, id string) (Workload, error) {
	var out Workload
	return out, c.do(ctx, http.MethodPost, PathWorkloads+"/"+url.PathEscape(id)+"/stop", nil, &out)
}

// Logs copies a workload's stdout (or stderr) log into w.
func (c *Client) Logs(ctx context.Context, id string, stderr bool, w io.Writer) error {
	stream := "stdout"
	if stderr {
		stream = "stderr"
	}
	return c.do(ctx, http.MethodGet, PathWorkloads+"/"+url.PathEscape(id)+"/logs?stream="+stream, nil, w)
}

// Report sends a node agent's report to the leader.
func (c *Client) Report(ctx context.Context, r Report) error {
	return c.do(ctx, http.MethodPost, PathReport, r, nil)
}

// LeaderIndex asks the leader for the raft index its state has applied
// once every entry committed before the request has been (a barrier): a
// replica that has applied it is current as of the request.
func (c *Client) LeaderIndex(ctx context.Context) (uint64, error) {
	var out Index
	return out.Index, c.do(ctx, http.MethodGet, PathIndex, nil, &out)
}

// Migrate plans the move of a workload; the answer is the planned
// migration.
func (c *Client) Migrate(ctx context.Context, req MigrateRequest) (Migration, error) {
	var out Migration
	return out, c.do(ctx, http.MethodPost, PathMigrations, req, &out)
}

// Migrations lists the migrations in flight, or all the state keeps.
func (c *Client) Migrations(ctx context.Context, all bool) ([]Migration, error) {
	var out []Migration
	path := PathMigrations
	if all {
		path += "?all=1"
	}
	return out, c.do(ctx, http.MethodGet, path, nil, &out)
}

// Migration returns one migration.
func (c *Client) Migration(ctx context.Context, id string) (Migration, error) {
	var out Migration
	return out, c.do(ctx, http.MethodGet, PathMigrations+"/"+url.PathEscape(id), nil, &out)
}

// MigrationStep sends a node agent's migration step to the leader.
func (c *Client) MigrationStep(ctx context.Context, st MigrationStep) error {
	return c.do(ctx, http.MethodPost, PathMigrations+"/"+url.PathEscape(st.ID)+"/step", st, nil)
}

// Balance returns the balancer's status, from the leader.
func (c *Client) Balance(ctx context.Context) (BalanceStatus, error) {
	var out BalanceStatus
	return out, c.do(ctx, http.MethodGet, PathBalance, nil, &out)
}

// SetBalance sets the balancer's mode and returns its status.
func (c *Client) SetBalance(ctx context.Context, mode string) (BalanceStatus, error) {
	var out BalanceStatus
	return out, c.do(ctx, http.MethodPost, PathBalance, BalanceRequest{Mode: mode}, &out)
}
