// Command pclusterd is the per-host pcluster daemon: gossip membership, the
// raft-replicated scheduler state, the node agent and the API.
//
//	pclusterd -dev
//	pclusterd -node NAME -bind ADDR -data-dir DIR -key-file F [-join PEER,...] [-bootstrap-expect N]
//	pclusterd keygen [-out DIR]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pcluster/pcluster/cluster"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/node"
)

func main() {
	if node.IsInit() {
		// A workload's init, pid 1 of its PID namespace (node/init_linux.go).
		os.Exit(node.InitMain())
	}
	if node.IsWatchdog() {
		// The fence's dead-man switch (node/watchdog_linux.go).
		os.Exit(node.WatchdogMain())
	}
	err := run(os.Args[1:], os.Stderr)
	var ue usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
	case errors.As(err, &ue):
		fmt.Fprintln(os.Stderr, "pclusterd:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "pclusterd:", err)
		os.Exit(1)
	}
}

// usageError is bad input on the command line or in the config file.
type usageError struct{ error }

// parse parses args into fs, printing the flag list only for -h: a bad
// flag gets one line, from main.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stderr)
		fmt.Fprintf(stderr, "usage of %s:\n", fs.Name())
		fs.PrintDefaults()
		return err
	}
	if err != nil {
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

// labelFlag collects repeated -label k=v.
type labelFlag map[string]string

func (l labelFlag) String() string { return "" }
func (l labelFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("label %q: want KEY=VALUE", v)
	}
	l[k] = val
	return nil
}

func run(args []string, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "keygen" {
		return keygen(args[1:], stderr)
	}
	if len(args) > 0 && args[0] == "remove-cgroups" {
		return removeCgroups(args[1:], stderr)
	}
	fs := flag.NewFlagSet("pclusterd", flag.ContinueOnError)
	c := fileConfig{Labels: labelFlag{}}
	configPath := fs.String("config", "", "JSON config `file` (flags override it)")
	dev := fs.Bool("dev", false, "run a complete single-node cluster with its data in a temporary directory")
	fs.StringVar(&c.Node, "node", "", "node `name` (default: host name)")
	fs.StringVar(&c.Bind, "bind", "", "gossip `host:port`; raft uses port+1, the TLS API port+2 (default 0.0.0.0:7946)")
	fs.StringVar(&c.RaftAddr, "raft-addr", "", "raft `host:port` (default: gossip port + 1)")
	fs.StringVar(&c.APIAddr, "api-addr", "", "TLS API `host:port` (default: gossip port + 2)")
	fs.StringVar(&c.Advertise, "advertise", "", "`IP` peers reach this node at (default: the -bind IP, or a private IP when binding 0.0.0.0)")
	fs.StringVar(&c.Socket, "socket", "", "local API unix `socket` (default "+api.DefaultSocket+")")
	fs.StringVar(&c.SocketGroup, "socket-group", "", "also serve the socket to members of `group` (name or gid; socket mode 0660)")
	fs.StringVar(&c.DataDir, "data-dir", "", "`directory` for the raft log, snapshots and workload logs")
	join := fs.String("join", "", "comma-separated gossip `peers` to join")
	fs.IntVar(&c.BootstrapExpect, "bootstrap-expect", 0, "bootstrap raft when `N` servers see each other over gossip")
	fs.StringVar(&c.Encrypt, "encrypt", "", "cluster `key` (base64; see pclusterd keygen); every local user can read it from the command line: prefer -key-file")
	fs.StringVar(&c.KeyFile, "key-file", "", "`file` holding the cluster key")
	fs.Var(c.Labels, "label", "node label `key=value` for placement constraints (repeatable)")
	fs.StringVar(&c.LogLevel, "log-level", "", "debug, info, warn or error (default info)")
	fs.StringVar(&c.WorkloadGCAfter, "workload-gc-after", "", "remove ended workloads from the state this `duration` after they end (default 1h)")
	fs.BoolVar(&c.DrainOnShutdown, "drain-on-shutdown", false, "on SIGTERM or SIGINT, drain this node (move its workloads to others) before shutting down; a second signal stops waiting")
	fs.StringVar(&c.BalanceInterval, "balance-interval", "", "when leader, run a balancer round this `often` (default 10s)")
	fs.StringVar(&c.BalanceCooldown, "balance-cooldown", "", "the balancer moves a workload moved less than this `duration` ago no further (default 5m)")
	fs.StringVar(&c.DrainTimeout, "drain-timeout", "", "with -drain-on-shutdown: the drain's deadline, after which the workloads still here are stopped (default 2m)")
	fs.StringVar(&c.VIPInterface, "vip-interface", "", "carry workloads' virtual IPs on `interface` (default: the one whose subnet holds each VIP)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", "", "serve plain-HTTP /metrics on `host:port`")
	fs.StringVar(&c.Web, "web", "", "serve the status page on `host:port` (default 127.0.0.1 at the gossip port + 3; off: none); beyond loopback only with -web-cert and -web-key")
	fs.StringVar(&c.WebTokenFile, "web-token-file", "", "`file` holding the status page's access token (default DATA_DIR/web-token, made when missing)")
	fs.StringVar(&c.WebCert, "web-cert", "", "TLS certificate `file` (PEM) for the status page")
	fs.StringVar(&c.WebKey, "web-key", "", "TLS key `file` (PEM) for the status page")
	fs.BoolVar(&c.Failover, "failover", true, "bring the workloads of a node declared down back on others (from their newest checkpoint, else from their command as their restart policy says); a node cut off from the majority fences its own (-fence-after)")
	fs.StringVar(&c.FailoverAfter, "failover-after", "", "with -failover: wait this `duration` after a node is declared down (default 1s)")
	fs.StringVar(&c.FenceAfter, "fence-after", "", "with -failover: freeze the workloads a failover could restore elsewhere once this node has been out of contact with the raft majority this `long` (default 3s; 0: never; must end before the leader's failover: detection 4s + -failover-after)")
	live := fs.Bool("migrate-live", true, "move workloads by live migration: copy their memory while they run, in rounds, and stop them only for the last (false: stopped for the whole transfer)")
	reserve := fs.Uint64("checkpoint-reserve-mb", defaultCheckpointReserveMB, "refuse a checkpoint that could leave less than `MiB` free on the data directory's filesystem (0: no check)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *join != "" {
		c.Join = strings.Split(*join, ",")
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	c.encryptFlag = set["encrypt"]
	if set["checkpoint-reserve-mb"] {
		c.CheckpointReserveMB = reserve
	}
	if set["migrate-live"] {
		c.MigrateLive = live
	}
	if *configPath != "" {
		if err := c.mergeFile(*configPath, set); err != nil {
			return usageError{err}
		}
	}
	cfg, cleanup, err := c.resolve(*dev)
	if err != nil {
		return usageError{err}
	}
	defer cleanup()

	srv, err := cluster.Start(cfg)
	if err != nil {
		return err
	}
	if *dev {
		// Up once the replicated state lists this node: until then a
		// run finds no node to place on (the demo's first run did).
		if !srv.WaitListed(10 * time.Second) {
			fmt.Fprintf(stderr, "pclusterd: this node is not in the cluster state after 10s: runs fail until it is\n")
		}
		// pclusterctl takes its flags after the command words, and
		// needs none for the default socket.
		try := "pclusterctl members"
		if cfg.Socket != api.DefaultSocket {
			try += " -address " + cfg.Socket
		}
		fmt.Fprintf(stderr, "pclusterd: dev cluster up; data in %s; try: %s\n", cfg.DataDir, try)
		if url, token := srv.WebURL(); url != "" {
			fmt.Fprintf(stderr, "pclusterd: status page: %s?token=%s\n", url, token)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	s := <-sig
	if c.DrainOnShutdown {
		ctx, cancel := context.WithCancel(context.Background())
		go func() { // a second signal stops waiting for the drain
			select {
			case <-sig:
				cancel()
			case <-ctx.Done():
			}
		}()
		if err := srv.DrainSelf(ctx, c.drainTimeout); err != nil {
			slog.Warn("shutting down undrained", "err", err)
		}
		cancel()
	}
	slog.Info("shutting down", "signal", s.String())
	srv.Shutdown()
	return nil
}

// removeCgroups kills what is left in a stopped node's workload cgroups
// and removes them: workloads outlive their pclusterd by design, so their
// cgroups do too; this is for when the node is gone for good (a
// throwaway cluster, a test, an uninstall).
func removeCgroups(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("pclusterd remove-cgroups", flag.ContinueOnError)
	name := fs.String("node", "", "the node's `name`")
	dataDir := fs.String("data-dir", "", "the node's data `directory` (it need not exist any more)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *name == "" || *dataDir == "" {
		return usageError{errors.New("remove-cgroups: give -node and -data-dir")}
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		return err
	}
	return node.RemoveCgroups(*name, dir)
}

func keygen(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("pclusterd keygen", flag.ContinueOnError)
	out := fs.String("out", ".", "`directory` to write cluster.key (0600) and ca.pem into")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	keyPath, caPath, err := pki.WriteKeyFiles(*out)
	if err != nil {
		return err
	}
	fmt.Printf("cluster key: %s\ncluster CA:  %s (derived from the key)\ncopy the key to every node; run pclusterd -key-file %s\n", keyPath, caPath, keyPath)
	return nil
}
