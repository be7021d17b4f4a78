// Package cluster is pclusterd's cluster fabric: memberlist gossip for
// membership and load, raft for the replicated scheduler state, the leader's
// membership reconciliation (voters, node status, lost workloads), and the
// authenticated HTTP API that pclusterctl and peer nodes talk to.
package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/internal/admit"
	"github.com/pcluster/pcluster/netrehome"
	"github.com/pcluster/pcluster/node"
	"github.com/pcluster/pcluster/scheduler"
)

// Config configures a Server. Zero durations take the defaults noted.
type Config struct {
	Name            string            // node name; unique in the cluster
	BindAddr        string            // gossip host:port (UDP and TCP)
	RaftAddr        string            // raft host:port; default gossip port + 1
	APIAddr         string            // TLS API host:port; default gossip port + 2
	Advertise       string            // IP peers reach this node at; default: the bind IP, or a private IP when binding all
	Socket          string            // local API unix socket (0600); "" for none
	SocketGroup     string            // group (name or gid) also let in on the socket (0660); "" for none
	MetricsAddr     string            // plain-HTTP /metrics listener; "" for none
	DataDir         string            // raft log, snapshots, workload logs
	Join            []string          // gossip peers to join (and re-join)
	BootstrapExpect int               // bootstrap raft when this many servers see each other
	Key             pki.Key           // cluster key
	Labels          map[string]string // node labels, for placement constraints
	VIPInterface    string            // interface for virtual IPs; "": the one whose subnet holds each
	// MigrateStopAndCopy: migrations stop the workload for the whole
	// transfer instead of copying its memory live first (node.Config).
	MigrateStopAndCopy bool
	// CheckpointReserve is the free space (bytes) a checkpoint must leave
	// on the data directory's filesystem; 0: no check.
	CheckpointReserve uint64
	// Failover lets the leader bring lost workloads back elsewhere
	// (scheduler/failover.go), FailoverAfter after their node was
	// declared down. FenceAfter (with Failover; 0: no fencing): a node
	// out of contact with the raft majority this long freezes the
	// workloads a failover could bring back elsewhere (node/fence.go).
	// Start refuses a FenceAfter that is not shorter than the least time
	// the leader waits from a cut to a failover (fenceMargin).
	Failover      bool
	FailoverAfter time.Duration
	FenceAfter    time.Duration
	Logger        *slog.Logger

	// The status page (webui.go): WebAddr "" serves it on 127.0.0.1 at the
	// gossip port + 3, WebOff not at all; beyond loopback it needs WebCert
	// and WebKey (TLS). WebTokenFile holds its access token; default
	// DATA_DIR/web-token, made when missing.
	WebAddr, WebTokenFile, WebCert, WebKey string

	WorkloadGCAfter time.Duration // ended workloads are removed from the state after this; 1h
	// MigrationTimeout: a migration with no step for this long before its
	// commit is aborted by the leader; scheduler.DefaultMigrationTimeout.
	MigrationTimeout time.Duration

	// BalanceInterval: the leader's balancer runs a round this often
	// (DefaultBalanceInterval); BalanceCooldown: a moved workload stays
	// this long before the balancer moves it again
	// (scheduler.DefaultBalanceCooldown).
	BalanceInterval time.Duration
	BalanceCooldown time.Duration

	LoadInterval   time.Duration // gossip load refresh; 2s
	RejoinInterval time.Duration // re-join attempts when alone; 5s
	Reconcile      time.Duration // leader reconciliation period; 1s
}

// Server is one running pclusterd.
type Server struct {
	cfg     Config
	log     *slog.Logger
	fsm     *scheduler.FSM
	evlog   *eventLog // events derived from the entries fsm applies (events.go)
	raft    *raft.Raft
	store   *raftboltdb.BoltStore
	trans   *raft.NetworkTransport
	ml      *memberlist.Memberlist
	agent   *node.Agent
	metrics *metrics
	// balancer is the leader's (it runs only while this node leads).
	balancer *Balancer
	// migClock times the migrations out on this server's clock (the
	// leader loop only).
	migClock scheduler.MigrationClock

	ca       *pki.Authority
	peerTLS  *tls.Config
	peerHTTP *http.Client

	// metaMu guards meta, read by memberlist's delegate.
	metaMu sync.Mutex
	meta   meta

	// contactMu guards ledAt: when this node last led (or started), for
	// majorityContact.
	contactMu sync.Mutex
	ledAt     time.Time

	// memMu guards live: copies of the live gossip members, kept by the
	// event delegate.
	memMu sync.Mutex
	live  map[string]memberlist.Node

	reach *reach // raft peers failing heartbeats (leader)
	obs   *raft.Observer
	obsCh chan raft.Observation // feeds reach; closed after raft stops

	gossipAddr string // this node's gossip address, fixed at start
	advertise  net.IP // the IP peers reach this node at

	events chan struct{} // member change notifications (coalesced)
	// joined is poked when a member joins: the peer list is saved then,
	// not only at the next load tick (a node restarted before that tick
	// had no one to rejoin).
	joined   chan struct{}
	apiLn    net.Listener
	sockLn   net.Listener
	peers    peerPolicy // who the socket serves
	httpSrvs []*http.Server
	webLn    net.Listener // the status page's, or nil
	webURL   string
	webTok   string

	ctx    context.Context // ends at Shutdown
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

func portPlus(hostport string, n int) (string, error) {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", err
	}
	pn, err := strconv.Atoi(p)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(h, strconv.Itoa(pn+n)), nil
}

// Start brings a node up: raft (bootstrapping if this is a single-node
// cluster), gossip, the node agent and the API.
func Start(cfg Config) (s *Server, err error) {
	if cfg.Name == "" {
		h, _ := os.Hostname()
		cfg.Name = h
	}
	// The name goes into the state, every list and every log line: the
	// leader would refuse to register it (scheduler.ValidateNode).
	if err := scheduler.CheckNodeName(cfg.Name); err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Key == nil {
		return nil, errors.New("start: no cluster key (-encrypt or -key-file)")
	}
	if cfg.LoadInterval == 0 {
		cfg.LoadInterval = 2 * time.Second
	}
	if cfg.RejoinInterval == 0 {
		cfg.RejoinInterval = 5 * time.Second
	}
	if cfg.Reconcile == 0 {
		cfg.Reconcile = time.Second
	}
	if cfg.WorkloadGCAfter == 0 {
		cfg.WorkloadGCAfter = scheduler.DefaultGCAfter
	}
	if cfg.MigrationTimeout == 0 {
		cfg.MigrationTimeout = scheduler.DefaultMigrationTimeout
	}
	if cfg.BalanceInterval == 0 {
		cfg.BalanceInterval = DefaultBalanceInterval
	}
	if cfg.BalanceCooldown == 0 {
		cfg.BalanceCooldown = scheduler.DefaultBalanceCooldown
	}
	if cfg.BalanceInterval < 0 || cfg.BalanceCooldown < 0 {
		return nil, fmt.Errorf("start: balance interval %v, cool-down %v: want positive durations", cfg.BalanceInterval, cfg.BalanceCooldown)
	}
	if cfg.WorkloadGCAfter < 0 {
		return nil, fmt.Errorf("start: workload gc retention %v: want a positive duration", cfg.WorkloadGCAfter)
	}
	if err := checkFence(cfg, gossipConfig()); err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	var fenceAfter time.Duration // the agent's: fencing follows failover
	if cfg.Failover {
		fenceAfter = cfg.FenceAfter
	}
	if cfg.BindAddr == "" {
		cfg.BindAddr = "0.0.0.0:7946"
	}
	gHost, gPortS, err := net.SplitHostPort(cfg.BindAddr)
	if err != nil {
		return nil, fmt.Errorf("start: bind address %q: %w", cfg.BindAddr, err)
	}
	gPort, _ := strconv.Atoi(gPortS)
	if cfg.RaftAddr == "" {
		if gPort == 0 {
			cfg.RaftAddr = net.JoinHostPort(gHost, "0")
		} else if cfg.RaftAddr, err = portPlus(cfg.BindAddr, 1); err != nil {
			return nil, fmt.Errorf("start: %w", err)
		}
	}
	if cfg.APIAddr == "" {
		if gPort == 0 {
			cfg.APIAddr = net.JoinHostPort(gHost, "0")
		} else if cfg.APIAddr, err = portPlus(cfg.BindAddr, 2); err != nil {
			return nil, fmt.Errorf("start: %w", err)
		}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("start: data dir: %w", err)
	}
	// Raft writes its snapshots (the whole state: every workload's
	// command, env and credentials) with the umask's mode, and the workload
	// logs live here too: the directory itself must keep other users out,
	// and no other user may own it or anything on the way to it.
	if err := checkPrivateDir(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("start: data dir %s: %w", cfg.DataDir, err)
	}
	adv, err := advertiseIP(cfg.Advertise, gHost)
	if err != nil {
		return nil, err
	}

	ctx, cancel := context.WithCancel(context.Background())
	s = &Server{cfg: cfg, log: cfg.Logger.With("node", cfg.Name), fsm: scheduler.NewFSM(), evlog: newEventLog(DefaultEventBuffer),
		events: make(chan struct{}, 1), joined: make(chan struct{}, 1), ctx: ctx, cancel: cancel, live: map[string]memberlist.Node{}, advertise: adv,
		ledAt: time.Now()} // the fence's clock starts with the daemon
	if c, ok := node.LeaseContact(cfg.DataDir); ok && c.Before(s.ledAt) {
		// Or earlier: a previous daemon's last contact, which its
		// watchdog counts from (node/watchdog_linux.go). A restart must
		// not push the fence past the leader's failover.
		s.ledAt = c
	}
	s.metrics = newMetrics(s)
	s.balancer = NewBalancer(s.Applier(), s.unreachable, scheduler.BalanceParams{Cooldown: cfg.BalanceCooldown}, s.log)
	started := s // "return nil, err" sets s to nil before this runs
	defer func() {
		if err != nil {
			started.Shutdown()
		}
	}()

	if err := s.setupTLS(); err != nil {
		return nil, err
	}
	if err := s.setupAPI(); err != nil {
		return nil, err
	}
	if err := s.setupWeb(); err != nil {
		return nil, err
	}
	if err := s.setupRaft(); err != nil {
		return nil, err
	}
	// Workloads get only fds 0-2 and their own (node.KeepFDsFromWorkloads).
	node.KeepFDsFromWorkloads()
	s.agent = node.New(node.Config{Name: cfg.Name, DataDir: cfg.DataDir, FSM: s.fsm,
		Report: s.report, Step: s.step, DialTarget: s.dialTarget, Sync: s.leaderIndex, Leader: s.Leader, Cgroups: true, Logger: s.log,
		VIPInterface: cfg.VIPInterface, Checkpoint: s.checkpointReport, PushCheckpoint: s.pushCheckpoint,
		CheckpointKey: cfg.Key.CheckpointKey(), CheckpointReserve: cfg.CheckpointReserve,
		FenceAfter: fenceAfter, Contact: s.majorityContact, Watchdog: true, StopAndCopy: cfg.MigrateStopAndCopy})
	if err := s.setupGossip(); err != nil {
		return nil, err
	}
	s.goLoop(func() { s.agent.Run(ctx) })
	s.goLoop(func() { s.gossipLoop(ctx) })
	s.goLoop(func() { s.leaderLoop(ctx) })
	s.serveAPI()
	s.serveWeb()
	s.log.Info("pclusterd started", "gossip", s.gossipAddr, "raft", s.trans.LocalAddr(),
		"api", s.meta.APIAddr, "socket", cfg.Socket, "data_dir", cfg.DataDir)
	return s, nil
}

// advertiseIP picks the address peers use: the -advertise IP, else the
// bind IP, else (binding all addresses) the host's private IP, as memberlist
// would pick.
func advertiseIP(flag, bindHost string) (net.IP, error) {
	if flag != "" {
		ip := net.ParseIP(flag)
		if ip == nil || ip.IsUnspecified() {
			return nil, fmt.Errorf("start: advertise address %q is not a usable IP", flag)
		}
		return ip, nil
	}
	if ip := net.ParseIP(bindHost); ip != nil && !ip.IsUnspecified() {
		return ip, nil
	}
	priv, err := sockaddr.GetPrivateIP()
	if err != nil || priv == "" {
		return nil, fmt.Errorf("start: binding all addresses and no private IP found to advertise; give -advertise IP")
	}
	return net.ParseIP(priv), nil
}

// advertised returns addr (a listener address) with the advertise IP.
func (s *Server) advertised(addr net.Addr) string {
	_, port, _ := net.SplitHostPort(addr.String())
	return net.JoinHostPort(s.advertise.String(), port)
}

func (s *Server) goLoop(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

func (s *Server) setupTLS() error {
	ca, err := s.cfg.Key.CA()
	if err != nil {
		return err
	}
	ips := []net.IP{s.advertise}
	for _, a := range []string{s.cfg.BindAddr, s.cfg.RaftAddr, s.cfg.APIAddr} {
		if h, _, err := net.SplitHostPort(a); err == nil {
			if ip := net.ParseIP(h); ip != nil && !ip.IsUnspecified() {
				ips = append(ips, ip)
			}
		}
	}
	cert, err := ca.Issue(s.cfg.Name, ips...)
	if err != nil {
		return err
	}
	s.ca = ca
	s.peerTLS = ca.ClientTLS(cert)
	// Bounded dials: a request forwarded to a leader that just vanished
	// must fail fast (and be retried) rather than wait out TCP's retries.
	s.peerHTTP = &http.Client{Transport: &http.Transport{
		TLSClientConfig:       ca.ClientTLS(cert),
		DialContext:           (&net.Dialer{Timeout: 3 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       30 * time.Second,
	}, Timeout: 30 * time.Second}
	ln, err := listenAPI(s.cfg.APIAddr, ca.ServerTLS(cert))
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	s.apiLn = ln
	return nil
}

// maxAPIPending bounds the connections to an API port (TLS API, metrics)
// that have not yet sent a request (on the TLS API: completed mutual TLS
// and sent a request header). Beyond it a new connection is taken and the
// oldest pending one from the address holding the most is closed (package
// admit): whoever reaches the port can neither exhaust the descriptors
// raft and gossip share with the API, nor lock key holders out.
const maxAPIPending = 64

// listenAPI listens for the TLS API on addr; its connections are admitted
// into a table of maxAPIPending places, which releaseOnRequest gives back.
func listenAPI(addr string, cfg *tls.Config) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("api listen %s: %w", addr, err)
	}
	return tls.NewListener(admit.NewListener(ln, maxAPIPending), cfg), nil
}

// releaseOnRequest is the TLS API server's ConnState: a connection that
// has sent a request has completed mutual TLS with a cluster certificate,
// and leaves the table of pending ones.
func releaseOnRequest(c net.Conn, st http.ConnState) {
	if st == http.StateActive || st == http.StateHijacked {
		admit.Release(c)
	}
}

func (s *Server) setupRaft() error {
	dir := filepath.Join(s.cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("start: raft dir: %w", err)
	}
	srvCert := s.peerTLS.Certificates[0]
	stream, err := newTLSStream(s.cfg.RaftAddr, s.ca.ServerTLS(srvCert), s.peerTLS)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	stream.advertise = &net.TCPAddr{IP: s.advertise, Port: stream.listenAddr().Port}
	rlog := newRaftLogger(s.log)
	s.trans = raft.NewNetworkTransportWithLogger(stream, 3, 10*time.Second, rlog)
	store, err := raftboltdb.NewBoltStore(filepath.Join(dir, "raft.db"))
	if err != nil {
		return fmt.Errorf("start: raft store: %w", err)
	}
	s.store = store
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, rlog)
	if err != nil {
		return fmt.Errorf("start: raft snapshots: %w", err)
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(s.cfg.Name)
	rc.Logger = rlog
	booted, err := raft.HasExistingState(store, store, snaps)
	if err != nil {
		return fmt.Errorf("start: raft state: %w", err)
	}
	r, err := raft.NewRaft(rc, eventFSM{s.fsm, s.evlog}, store, store, snaps, s.trans)
	if err != nil {
		return fmt.Errorf("start: raft: %w", err)
	}
	s.raft = r
	s.observeHeartbeats()
	s.meta = meta{APIAddr: s.advertised(s.apiLn.Addr()), RaftAddr: string(s.trans.LocalAddr()),
		Expect: s.cfg.BootstrapExpect, Booted: booted, Labels: s.cfg.Labels, NoVIP: netrehome.Capable()}
	if !booted && s.cfg.BootstrapExpect == 1 {
		if err := s.bootstrap([]raft.Server{{ID: rc.LocalID, Address: s.trans.LocalAddr()}}); err != nil {
			return err
		}
	}
	return nil
}

func (s *Server) bootstrap(servers []raft.Server) error {
	s.log.Info("bootstrapping raft", "servers", len(servers))
	if err := s.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return fmt.Errorf("bootstrap raft: %w", err)
	}
	s.metaMu.Lock()
	s.meta.Booted = true
	s.metaMu.Unlock()
	return nil
}

// gossipConfig is memberlist's LAN profile with a faster probe and the
// same 4 s of suspicion (docs/cluster.md, "Failure detection"): a probe
// every 500 ms (LAN: 1 s) with a 200 ms direct-ack timeout (LAN: 500 ms;
// the indirect probe's nack, sent by the relay after its own timeout,
// then comes within the probe's 500 ms), and SuspicionMult 8 (LAN: 4), so
// that a suspect still has 8 × 500 ms = 4 s (× log10 of the node count
// from 10 nodes on) to refute before it is declared dead. What the faster
// probe buys is the time from a failure to the first failed probe, the
// spread of the detection: with 3 nodes each peer probes a node every 1–3
// probe periods.
func gossipConfig() *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.ProbeInterval = 500 * time.Millisecond
	mc.ProbeTimeout = 200 * time.Millisecond
	mc.SuspicionMult = 8
	return mc
}

func (s *Server) setupGossip() error {
	mc := gossipConfig()
	mc.Name = s.cfg.Name
	host, port, _ := net.SplitHostPort(s.cfg.BindAddr)
	mc.BindAddr = host
	mc.BindPort, _ = strconv.Atoi(port)
	mc.AdvertiseAddr, mc.AdvertisePort = s.advertise.String(), mc.BindPort
	mc.SecretKey = s.cfg.Key.GossipKey()
	mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	mc.Delegate = &delegate{s: s}
	mc.Events = &events{s: s}
	mc.Logger = newMemberlistLogger(s.log)
	if _, err := newGossipTransport(mc); err != nil {
		return fmt.Errorf("start: gossip on %s: %w", s.cfg.BindAddr, err)
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		mc.Transport.Shutdown()
		return fmt.Errorf("start: gossip on %s: %w", s.cfg.BindAddr, err)
	}
	s.ml = ml
	s.gossipAddr = ml.LocalNode().Address()
	if peers := s.seeds(); len(peers) > 0 {
		if n, err := ml.Join(peers); err != nil {
			s.log.Warn("join failed; will retry", "peers", peers, "err", err)
		} else {
			s.log.Info("joined cluster", "contacted", n)
		}
	}
	return nil
}

// seeds returns the -join peers plus the members seen before a restart.
func (s *Server) seeds() []string {
	peers := append([]string{}, s.cfg.Join...)
	b, err := os.ReadFile(filepath.Join(s.cfg.DataDir, "peers.json"))
	if err == nil {
		var saved []string
		if json.Unmarshal(b, &saved) == nil {
			peers = append(peers, saved...)
		}
	}
	seen := map[string]bool{s.gossipAddr: true}
	out := peers[:0]
	for _, p := range peers {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// Shutdown stops the node's loops and servers; workloads keep running.
func (s *Server) Shutdown() {
	s.once.Do(func() {
		s.cancel()
		if s.ml != nil {
			if n := s.failoverable(); n > 0 {
				// A graceful leave would have the leader fail these
				// over at once while they still run here (pclusterd's
				// workloads outlive it): go silent instead, as a crash
				// does, so that the watchdog fences them before the
				// peers declare this node dead (docs/cluster.md).
				s.log.Warn("stopping without leaving the cluster: workloads a failover could restore elsewhere run here; the cluster sees this node fail, and fencing and failover apply as after a crash (drain the node first to move them)", "workloads", n)
			} else {
				_ = s.ml.Leave(time.Second)
			}
		}
		for _, h := range s.httpSrvs {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = h.Shutdown(ctx)
			cancel()
		}
		for _, ln := range []net.Listener{s.apiLn, s.sockLn, s.webLn} {
			if ln != nil {
				ln.Close()
			}
		}
		s.wg.Wait()
		if s.ml != nil {
			_ = s.ml.Shutdown()
		}
		if s.raft != nil {
			if err := s.raft.Shutdown().Error(); err != nil {
				s.log.Warn("raft shutdown", "err", err)
			}
			s.raft.DeregisterObserver(s.obs)
			close(s.obsCh)
		}
		if s.trans != nil {
			s.trans.Close()
		}
		if s.store != nil {
			s.store.Close()
		}
		if s.cfg.Socket != "" && s.sockLn != nil {
			os.Remove(s.cfg.Socket)
		}
		s.log.Info("pclusterd stopped")
	})
}

// failoverable counts the workloads this node's replica runs here that a
// failover could bring back elsewhere (scheduler.FenceApplies), when the
// cluster fails over.
func (s *Server) failoverable() int {
	if !s.cfg.Failover || s.fsm == nil {
		return 0
	}
	n := 0
	s.fsm.Read(func(st *scheduler.State) {
		for _, w := range st.Workloads {
			if scheduler.FenceApplies(st, w, s.cfg.Name) {
				n++
			}
		}
	})
	return n
}

// majorityContact is when this node was last in contact with the raft
// majority (node.Config.Contact): now while it leads (a leader that hears
// from no majority for raft's LeaderLeaseTimeout, 500 ms, steps down),
// else its last contact with a leader (raft's LastContact: the last
// AppendEntries or heartbeat accepted from one), and never before it
// started or last led (a leader that steps down has no recent contact of
// a follower's).
func (s *Server) majorityContact() time.Time {
	s.contactMu.Lock()
	defer s.contactMu.Unlock()
	now := time.Now()
	if s.raft.State() == raft.Leader {
		s.ledAt = now
		return now
	}
	if c := s.raft.LastContact(); c.After(s.ledAt) {
		return c
	}
	return s.ledAt
}

// minFenceAfter: a fence time below this would freeze workloads during an
// ordinary leader election (raft's heartbeat timeout is 1 s, randomized
// up to 2 s, before followers even start one).
const minFenceAfter = 2 * time.Second

// checkFence checks that a node fences its workloads before any leader
// can fail them over: the leader waits from a cut at least memberlist's
// detection (suspicion cannot end sooner than SuspicionMult ×
// ProbeInterval after the first failed probe, 4 s in the LAN profile) and
// then FailoverAfter, while the node fences FenceAfter after its last
// contact (plus one fence check, 200 ms). Every node runs the same check
// with its own flags: they must agree across the cluster.
func checkFence(cfg Config, mc *memberlist.Config) error {
	if !cfg.Failover || cfg.FenceAfter == 0 {
		return nil
	}
	if cfg.FenceAfter < minFenceAfter {
		return fmt.Errorf("fence after %v: at least %v (a leader election is not a partition)", cfg.FenceAfter, minFenceAfter)
	}
	detect := time.Duration(mc.SuspicionMult) * mc.ProbeInterval
	if wait := detect + cfg.FailoverAfter; cfg.FenceAfter+fenceMargin > wait {
		return fmt.Errorf("fence after %v: a leader may fail workloads over %v after a cut (detection %v + failover after %v); the fence must act at least %v earlier",
			cfg.FenceAfter, wait, detect, cfg.FailoverAfter, fenceMargin)
	}
	return nil
}

// fenceMargin is the least time between a fence and the earliest
// failover: the fence's check period, the freeze itself, and a node's
// last raft contact coming a heartbeat before the cut.
const fenceMargin = time.Second

// Name returns the node name.
func (s *Server) Name() string { return s.cfg.Name }

// IsLeader reports whether this node is the raft leader.
func (s *Server) IsLeader() bool { return s.raft.State() == raft.Leader }

// Leader returns the leader's node name, or "".
func (s *Server) Leader() string {
	_, id := s.raft.LeaderWithID()
	return string(id)
}

// WaitListed waits, at most d, until this node's replica of the state
// lists it (the leader registered it and the entry is applied here), and
// reports whether it does: until then no workload can be placed on it.
func (s *Server) WaitListed(d time.Duration) bool {
	deadline := time.After(d)
	for {
		changed := s.fsm.Changed()
		listed := false
		s.fsm.Read(func(st *scheduler.State) { listed = st.Nodes[s.cfg.Name] != nil })
		if listed {
			return true
		}
		select {
		case <-changed:
		case <-deadline:
			return false
		}
	}
}

// FSM returns the node's replica of the state.
func (s *Server) FSM() *scheduler.FSM { return s.fsm }

// GossipAddr returns the address peers join.
func (s *Server) GossipAddr() string { return s.gossipAddr }

// APIAddr returns the TLS API address.
func (s *Server) APIAddr() string { return s.advertised(s.apiLn.Addr()) }

// NumMembers returns the number of alive gossip members known locally.
func (s *Server) NumMembers() int { return s.ml.NumMembers() }
