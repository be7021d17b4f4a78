package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster"
	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/cluster/pki"
	"github.com/pcluster/pcluster/internal/keyfile"
)

// maxConfigBytes bounds the config file.
const maxConfigBytes = 1 << 20

// fileConfig is the config file's shape; its keys match the flags.
type fileConfig struct {
	Node            string    `json:"node"`
	Bind            string    `json:"bind"`
	RaftAddr        string    `json:"raft_addr"`
	APIAddr         string    `json:"api_addr"`
	Advertise       string    `json:"advertise"`
	Socket          string    `json:"socket"`
	SocketGroup     string    `json:"socket_group"`
	DataDir         string    `json:"data_dir"`
	Join            []string  `json:"join"`
	BootstrapExpect int       `json:"bootstrap_expect"`
	Encrypt         string    `json:"encrypt"`
	KeyFile         string    `json:"key_file"`
	Labels          labelFlag `json:"labels"`
	LogLevel        string    `json:"log_level"`
	MetricsAddr     string    `json:"metrics_addr"`
	WorkloadGCAfter string    `json:"workload_gc_after"`
	DrainOnShutdown bool      `json:"drain_on_shutdown"`
	DrainTimeout    string    `json:"drain_timeout"`
	VIPInterface    string    `json:"vip_interface"`
	Web             string    `json:"web"`
	WebTokenFile    string    `json:"web_token_file"`
	WebCert         string    `json:"web_cert"`
	WebKey          string    `json:"web_key"`
	BalanceInterval string    `json:"balance_interval"`
	BalanceCooldown string    `json:"balance_cooldown"`
	// CheckpointReserveMB: free MiB a checkpoint must leave on the data
	// directory's filesystem (nil: defaultCheckpointReserveMB).
	CheckpointReserveMB *uint64 `json:"checkpoint_reserve_mb"`
	Failover            bool    `json:"failover"` // on by default: a file's false turns it off
	FailoverAfter       string  `json:"failover_after"`
	FenceAfter          string  `json:"fence_after"`
	// MigrateLive: migrations copy memory while the workload runs (nil:
	// true).
	MigrateLive *bool `json:"migrate_live"`

	encryptFlag  bool          // Encrypt came from the command line
	drainTimeout time.Duration // DrainTimeout parsed by resolve
}

// defaultDrainTimeout is -drain-timeout's default: the drain's deadline on
// shutdown. A service manager must allow the stop this much plus
// cluster.DrainGrace (systemd: TimeoutStopSec=3min or more).
const defaultDrainTimeout = 2 * time.Minute

// defaultCheckpointReserveMB is -checkpoint-reserve-mb's default: a
// checkpoint that could leave less free on the data directory's
// filesystem is refused (and reported failed).
const defaultCheckpointReserveMB = 1024

// defaultFailoverAfter and defaultFenceAfter are -failover-after's and
// -fence-after's defaults: a cut-off node fences 3 s after its last raft
// contact, the leader fails over no sooner than 5 s after the cut
// (memberlist's detection, at least 4 s, then 1 s); cluster.Start checks
// the relation for any values given.
const (
	defaultFailoverAfter = time.Second
	defaultFenceAfter    = 3 * time.Second
)

// mergeFile fills the settings not given as flags from a JSON file.
func (c *fileConfig) mergeFile(path string, set map[string]bool) error {
	file, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	defer file.Close()
	fi, err := file.Stat() // the file read, for the key check below
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	// One byte past the limit tells "too big" from a file cut short.
	b, err := io.ReadAll(io.LimitReader(file, maxConfigBytes+1))
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	if len(b) > maxConfigBytes {
		return fmt.Errorf("config %s: over %d bytes (1 MiB)", path, maxConfigBytes)
	}
	var f fileConfig
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	if dec.Decode(&struct{}{}) != io.EOF {
		return fmt.Errorf("config %s: trailing data after the JSON object", path)
	}
	pick := func(flagName string, dst *string, v string) {
		if !set[flagName] && v != "" {
			*dst = v
		}
	}
	pick("node", &c.Node, f.Node)
	pick("bind", &c.Bind, f.Bind)
	pick("raft-addr", &c.RaftAddr, f.RaftAddr)
	pick("api-addr", &c.APIAddr, f.APIAddr)
	pick("advertise", &c.Advertise, f.Advertise)
	pick("socket", &c.Socket, f.Socket)
	pick("socket-group", &c.SocketGroup, f.SocketGroup)
	pick("data-dir", &c.DataDir, f.DataDir)
	if !set["encrypt"] && f.Encrypt != "" {
		// The file carries the cluster key: it must be as private as a
		// key file.
		if err := keyfile.Check(path, fi); err != nil {
			return fmt.Errorf("config %s carries the cluster key (\"encrypt\"): %w", path, err)
		}
		c.Encrypt = f.Encrypt
	}
	pick("key-file", &c.KeyFile, f.KeyFile)
	pick("log-level", &c.LogLevel, f.LogLevel)
	pick("metrics-addr", &c.MetricsAddr, f.MetricsAddr)
	pick("workload-gc-after", &c.WorkloadGCAfter, f.WorkloadGCAfter)
	pick("drain-timeout", &c.DrainTimeout, f.DrainTimeout)
	pick("vip-interface", &c.VIPInterface, f.VIPInterface)
	pick("web", &c.Web, f.Web)
	pick("web-token-file", &c.WebTokenFile, f.WebTokenFile)
	pick("web-cert", &c.WebCert, f.WebCert)
	pick("web-key", &c.WebKey, f.WebKey)
	pick("balance-interval", &c.BalanceInterval, f.BalanceInterval)
	pick("balance-cooldown", &c.BalanceCooldown, f.BalanceCooldown)
	pick("failover-after", &c.FailoverAfter, f.FailoverAfter)
	pick("fence-after", &c.FenceAfter, f.FenceAfter)
	var given struct {
		Failover *bool `json:"failover"`
	}
	json.Unmarshal(b, &given) // decoded above: it parses
	if !set["failover"] && given.Failover != nil {
		c.Failover = *given.Failover
	}
	if !set["migrate-live"] && f.MigrateLive != nil {
		c.MigrateLive = f.MigrateLive
	}
	if !set["checkpoint-reserve-mb"] && f.CheckpointReserveMB != nil {
		c.CheckpointReserveMB = f.CheckpointReserveMB
	}
	if !set["drain-on-shutdown"] && f.DrainOnShutdown {
		c.DrainOnShutdown = true
	}
	if !set["join"] && len(f.Join) > 0 {
		c.Join = f.Join
	}
	if !set["bootstrap-expect"] && f.BootstrapExpect != 0 {
		c.BootstrapExpect = f.BootstrapExpect
	}
	for k, v := range f.Labels {
		if _, ok := c.Labels[k]; !ok {
			c.Labels[k] = v
		}
	}
	return nil
}

// resolve checks the settings and turns them into a cluster.Config. The
// cleanup function removes what -dev created.
func (c *fileConfig) resolve(dev bool) (cluster.Config, func(), error) {
	cleanup := func() {}
	var level slog.Level
	if c.LogLevel != "" {
		if err := level.UnmarshalText([]byte(c.LogLevel)); err != nil {
			return cluster.Config{}, cleanup, fmt.Errorf("log level %q: want debug, info, warn or error", c.LogLevel)
		}
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(logger)
	cfg := cluster.Config{Name: c.Node, BindAddr: c.Bind, RaftAddr: c.RaftAddr, APIAddr: c.APIAddr, Advertise: c.Advertise, Socket: c.Socket,
		SocketGroup: c.SocketGroup,
		MetricsAddr: c.MetricsAddr, DataDir: c.DataDir, Join: c.Join, BootstrapExpect: c.BootstrapExpect,
		Labels: c.Labels, VIPInterface: c.VIPInterface, Logger: logger,
		WebAddr: c.Web, WebTokenFile: c.WebTokenFile, WebCert: c.WebCert, WebKey: c.WebKey, CheckpointReserve: defaultCheckpointReserveMB << 20}
	if (c.WebCert == "") != (c.WebKey == "") {
		return cfg, cleanup, fmt.Errorf("web: give both -web-cert and -web-key, or neither")
	}
	if c.CheckpointReserveMB != nil {
		cfg.CheckpointReserve = *c.CheckpointReserveMB << 20
	}
	cfg.MigrateStopAndCopy = c.MigrateLive != nil && !*c.MigrateLive
	cfg.Failover = c.Failover
	cfg.FailoverAfter, cfg.FenceAfter = defaultFailoverAfter, defaultFenceAfter
	if c.FailoverAfter != "" {
		d, err := time.ParseDuration(c.FailoverAfter)
		if err != nil || d < 0 {
			return cfg, cleanup, fmt.Errorf("failover after %q: want a duration such as 5s", c.FailoverAfter)
		}
		cfg.FailoverAfter = d
	}
	if c.FenceAfter != "" {
		d, err := time.ParseDuration(c.FenceAfter)
		if err != nil || d < 0 {
			return cfg, cleanup, fmt.Errorf("fence after %q: want a duration such as 3s (0: no fencing)", c.FenceAfter)
		}
		cfg.FenceAfter = d
	}
	if cfg.Socket == "" {
		cfg.Socket = api.DefaultSocket
	}
	c.drainTimeout = defaultDrainTimeout
	if c.DrainTimeout != "" {
		d, err := time.ParseDuration(c.DrainTimeout)
		if err != nil || d <= 0 {
			return cfg, cleanup, fmt.Errorf("drain timeout %q: want a positive duration such as 2m", c.DrainTimeout)
		}
		c.drainTimeout = d
	}
	if c.WorkloadGCAfter != "" {
		d, err := time.ParseDuration(c.WorkloadGCAfter)
		if err != nil || d <= 0 {
			return cfg, cleanup, fmt.Errorf("workload gc retention %q: want a positive duration such as 1h", c.WorkloadGCAfter)
		}
		cfg.WorkloadGCAfter = d
	}
	for _, d := range []struct {
		what, v string
		dst     *time.Duration
	}{{"balance interval", c.BalanceInterval, &cfg.BalanceInterval}, {"balance cool-down", c.BalanceCooldown, &cfg.BalanceCooldown}} {
		if d.v == "" {
			continue
		}
		v, err := time.ParseDuration(d.v)
		if err != nil || v <= 0 {
			return cfg, cleanup, fmt.Errorf("%s %q: want a positive duration such as 10s", d.what, d.v)
		}
		*d.dst = v
	}
	var err error
	switch {
	case c.Encrypt != "" && c.KeyFile != "":
		return cfg, cleanup, fmt.Errorf("give -encrypt or -key-file, not both")
	case c.Encrypt != "":
		if c.encryptFlag {
			logger.Warn("the cluster key given with -encrypt can be read by every local user (/proc/PID/cmdline); use -key-file with a mode 0600 file")
		}
		cfg.Key, err = pki.ParseKey(c.Encrypt)
	case c.KeyFile != "":
		cfg.Key, err = pki.ReadKeyFile(c.KeyFile)
	}
	if err != nil {
		return cfg, cleanup, err
	}
	if dev {
		if cfg.DataDir == "" {
			dir, err := os.MkdirTemp("", "pclusterd-dev-")
			if err != nil {
				return cfg, cleanup, fmt.Errorf("dev data dir: %w", err)
			}
			cfg.DataDir = dir
			cleanup = func() { os.RemoveAll(dir) }
		}
		if cfg.Key == nil {
			if cfg.Key, err = pki.NewKey(); err != nil {
				return cfg, cleanup, err
			}
		}
		if cfg.BindAddr == "" {
			cfg.BindAddr = "127.0.0.1:0"
		}
		if cfg.BootstrapExpect == 0 {
			cfg.BootstrapExpect = 1
		}
		return cfg, cleanup, nil
	}
	if cfg.DataDir == "" {
		return cfg, cleanup, fmt.Errorf("-data-dir is required (or use -dev)")
	}
	if cfg.Key == nil {
		return cfg, cleanup, fmt.Errorf("no cluster key: give -key-file or -encrypt (make one with: pclusterd keygen)")
	}
	if cfg.BootstrapExpect == 0 && len(cfg.Join) == 0 {
		return cfg, cleanup, fmt.Errorf("give -bootstrap-expect N for a new cluster or -join PEER to join one")
	}
	return cfg, cleanup, nil
}
