package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcluster/pcluster/cluster/pki"
)

func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	key, _ := pki.NewKey()
	path := filepath.Join(dir, "pclusterd.json")
	os.WriteFile(path, []byte(`{"node":"from-file","bind":"127.0.0.1:9000","data_dir":"`+dir+`",
		"join":["a:1","b:2"],"bootstrap_expect":3,"encrypt":"`+key.String()+`","labels":{"zone":"x","rack":"1"}}`), 0o600)
	c := fileConfig{Node: "from-flag", Labels: labelFlag{"rack": "2"}}
	if err := c.mergeFile(path, map[string]bool{"node": true}); err != nil {
		t.Fatal(err)
	}
	cfg, cleanup, err := c.resolve(false)
	defer cleanup()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "from-flag" || cfg.BindAddr != "127.0.0.1:9000" || cfg.BootstrapExpect != 3 ||
		strings.Join(cfg.Join, ",") != "a:1,b:2" || cfg.Labels["zone"] != "x" || cfg.Labels["rack"] != "2" ||
		cfg.Key.String() != key.String() {
		t.Errorf("merged config: got %+v", cfg)
	}

	// A config file others can read must not carry the key; without it,
	// it may be world-readable.
	os.Chmod(path, 0o644)
	if err := (&fileConfig{Labels: labelFlag{}}).mergeFile(path, nil); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("mode 0644 config carrying the key: got %v, want a refusal", err)
	}
	if err := (&fileConfig{Labels: labelFlag{}}).mergeFile(path, map[string]bool{"encrypt": true}); err != nil {
		t.Errorf("mode 0644 config whose key the command line overrides: %v", err)
	}
	os.WriteFile(path, []byte(`{"node":"x"}`), 0o644)
	if err := (&fileConfig{Labels: labelFlag{}}).mergeFile(path, nil); err != nil {
		t.Errorf("mode 0644 config without a key: %v", err)
	}

	os.WriteFile(path, []byte(`{"nodee":"typo"}`), 0o600)
	if err := (&fileConfig{Labels: labelFlag{}}).mergeFile(path, nil); err == nil || !strings.Contains(err.Error(), "nodee") {
		t.Errorf("unknown key: got %v, want an error naming it", err)
	}
	// Over the size limit: said so, not "unexpected EOF"; a second object
	// is refused too.
	os.WriteFile(path, []byte(`{"node":"`+strings.Repeat("x", 1<<20)+`"}`), 0o600)
	if err := (&fileConfig{Labels: labelFlag{}}).mergeFile(path, nil); err == nil || !strings.Contains(err.Error(), "over 1048576 bytes (1 MiB)") {
		t.Errorf("config over 1 MiB: got %v, want the limit named", err)
	}
	os.WriteFile(path, []byte(`{"node":"x"} {"node":"y"}`), 0o600)
	if err := (&fileConfig{Labels: labelFlag{}}).mergeFile(path, nil); err == nil || !strings.Contains(err.Error(), "trailing data") {
		t.Errorf("two objects: got %v, want trailing data refused", err)
	}
	if _, _, err := (&fileConfig{DataDir: dir, BootstrapExpect: 1}).resolve(false); err == nil || !strings.Contains(err.Error(), "key") {
		t.Errorf("no key: got %v, want an error about the key", err)
	}
}

// TestConfigBalance: balance_interval and balance_cooldown come from the
// file unless the flags give them, and must be positive durations.
func TestConfigBalance(t *testing.T) {
	dir := t.TempDir()
	key, _ := pki.NewKey()
	path := filepath.Join(dir, "pclusterd.json")
	os.WriteFile(path, []byte(`{"data_dir":"`+dir+`","encrypt":"`+key.String()+`","bootstrap_expect":1,"balance_interval":"3s","balance_cooldown":"1m"}`), 0o600)
	c := fileConfig{Labels: labelFlag{}, BalanceCooldown: "90s"}
	if err := c.mergeFile(path, map[string]bool{"balance-cooldown": true}); err != nil {
		t.Fatal(err)
	}
	cfg, cleanup, err := c.resolve(false)
	defer cleanup()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.BalanceInterval != 3*time.Second || cfg.BalanceCooldown != 90*time.Second {
		t.Errorf("balance interval %v, cool-down %v: want 3s (file), 1m30s (flag)", cfg.BalanceInterval, cfg.BalanceCooldown)
	}
	for _, bad := range []string{"0s", "-1s", "soon"} {
		_, _, err := (&fileConfig{DataDir: dir, Encrypt: key.String(), BootstrapExpect: 1, BalanceInterval: bad}).resolve(false)
		if err == nil || !strings.Contains(err.Error(), "balance interval") {
			t.Errorf("balance interval %q: got %v, want a refusal naming it", bad, err)
		}
	}
}

// TestConfigFailover: failover is on unless the flag or the file turns
// it off; failover_after and fence_after have their defaults and must be
// durations.
func TestConfigFailover(t *testing.T) {
	dir := t.TempDir()
	key, _ := pki.NewKey()
	path := filepath.Join(dir, "pclusterd.json")
	base := `"data_dir":"` + dir + `","encrypt":"` + key.String() + `","bootstrap_expect":1`
	cases := []struct {
		file                 string
		flagOn               bool // -failover's value (its default: true)
		set                  map[string]bool
		wantOn               bool
		wantAfter, wantFence time.Duration
	}{
		{file: `{` + base + `}`, flagOn: true, wantOn: true, wantAfter: defaultFailoverAfter, wantFence: defaultFenceAfter},
		{file: `{` + base + `,"failover":false}`, flagOn: true, wantAfter: defaultFailoverAfter, wantFence: defaultFenceAfter},
		{file: `{` + base + `,"failover":false}`, flagOn: true, set: map[string]bool{"failover": true}, wantOn: true,
			wantAfter: defaultFailoverAfter, wantFence: defaultFenceAfter},
		{file: `{` + base + `,"failover_after":"3s","fence_after":"0s"}`, flagOn: true, wantOn: true, wantAfter: 3 * time.Second},
	}
	for _, tc := range cases {
		os.WriteFile(path, []byte(tc.file), 0o600)
		c := fileConfig{Labels: labelFlag{}, Failover: tc.flagOn}
		if err := c.mergeFile(path, tc.set); err != nil {
			t.Fatal(err)
		}
		cfg, cleanup, err := c.resolve(false)
		cleanup()
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		if cfg.Failover != tc.wantOn || cfg.FailoverAfter != tc.wantAfter || cfg.FenceAfter != tc.wantFence {
			t.Errorf("%s (flags %v): failover %v after %v, fence after %v; want %v, %v, %v", tc.file, tc.set,
				cfg.Failover, cfg.FailoverAfter, cfg.FenceAfter, tc.wantOn, tc.wantAfter, tc.wantFence)
		}
	}
	for _, bad := range []string{"-1s", "soon"} {
		_, _, err := (&fileConfig{DataDir: dir, Encrypt: key.String(), BootstrapExpect: 1, FenceAfter: bad}).resolve(false)
		if err == nil || !strings.Contains(err.Error(), "fence after") {
			t.Errorf("fence after %q: got %v, want a refusal naming it", bad, err)
		}
	}
}

// TestConfigMigrateLive: migrations are live unless the file or the flag
// says false; the flag wins over the file.
func TestConfigMigrateLive(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "pclusterd.json")
	os.WriteFile(path, []byte(`{"data_dir":"`+dir+`","migrate_live":false}`), 0o600)
	key, _ := pki.NewKey()
	yes := true
	for _, tc := range []struct {
		name    string
		file    bool
		flag    *bool
		stopped bool // want MigrateStopAndCopy
	}{
		{"default", false, nil, false},
		{"file false", true, nil, true},
		{"file false, flag true", true, &yes, false},
	} {
		c := fileConfig{Labels: labelFlag{}, DataDir: dir, MigrateLive: tc.flag, Encrypt: key.String(), BootstrapExpect: 1}
		set := map[string]bool{}
		if tc.flag != nil {
			set["migrate-live"] = true
		}
		if tc.file {
			if err := c.mergeFile(path, set); err != nil {
				t.Fatal(err)
			}
		}
		cfg, cleanup, err := c.resolve(false)
		cleanup()
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if cfg.MigrateStopAndCopy != tc.stopped {
			t.Errorf("%s: MigrateStopAndCopy = %v, want %v", tc.name, cfg.MigrateStopAndCopy, tc.stopped)
		}
	}
}
