// Package netlab builds test "hosts": network namespaces joined by a
// bridge, with addresses from the benchmarking range 198.18.0.0/15
// (RFC 2544). Tests use it to run the two ends of a migration on
// different hosts of one machine. It never touches the machine's own
// interfaces, and everything it creates is removed by t.Cleanup.
package netlab

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Host is one namespace with one interface, eth0, on the lab's bridge.
type Host struct {
	NS   string // name under /run/netns
	Addr string // IPv4 address on eth0
	port string // its veth end in the switch namespace
	lab  *Lab
}

// Lab is a set of hosts on one bridge; the bridge lives in a namespace of
// its own, so the host's network stack is not involved.
type Lab struct {
	sw     string
	prefix string
	subnet int
	Hosts  []*Host
}

// Available reports why a lab cannot be built here, or "" if it can.
func Available() string {
	if os.Geteuid() != 0 {
		return "needs root to create network namespaces (CI runs as root)"
	}
	for _, tool := range []string{"ip", "tc", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + " not installed (iproute2, util-linux)"
		}
	}
	return ""
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// New creates n hosts with addresses 198.18.<subnet>.1, .2, ... Tests
// running at the same time in one test binary should use different
// subnets; names include the test binary's pid.
func New(tb testing.TB, n int, subnet int) *Lab {
	tb.Helper()
	if why := Available(); why != "" {
		tb.Skip(why)
	}
	prefix := fmt.Sprintf("pcl%d-%d", os.Getpid(), subnet)
	l := &Lab{sw: prefix + "-sw", prefix: prefix, subnet: subnet}
	tb.Cleanup(l.remove)
	must := func(args ...string) {
		if err := ip(args...); err != nil {
			tb.Fatal(err)
		}
	}
	must("netns", "add", l.sw)
	must("-n", l.sw, "link", "add", "br0", "type", "bridge")
	must("-n", l.sw, "link", "set", "br0", "up")
	for i := 0; i < n; i++ {
		l.AddHost(tb)
	}
	return l
}

// AddHost adds a host to the lab's bridge, with the next address.
func (l *Lab) AddHost(tb testing.TB) *Host {
	tb.Helper()
	must := func(args ...string) {
		if err := ip(args...); err != nil {
			tb.Fatal(err)
		}
	}
	i := len(l.Hosts)
	h := &Host{NS: fmt.Sprintf("%s-h%d", l.prefix, i), Addr: fmt.Sprintf("198.18.%d.%d", l.subnet, i+1),
		port: fmt.Sprintf("p%d", i), lab: l}
	must("netns", "add", h.NS)
	l.Hosts = append(l.Hosts, h)
	must("-n", l.sw, "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.NS)
	must("-n", l.sw, "link", "set", h.port, "master", "br0", "up")
	must("-n", h.NS, "addr", "add", h.Addr+"/24", "dev", "eth0")
	must("-n", h.NS, "link", "set", "eth0", "up")
	must("-n", h.NS, "link", "set", "lo", "up")
	h.waitUp(tb)
	return h
}

// waitUp waits until h's link carries frames both ways: its eth0 and its
// bridge port operationally up and the port forwarding. "ip link set up"
// returns before that: the kernel's linkwatch work (which needs the rtnl
// lock, busy on a host where other tests make namespaces) later gives
// each end its queue discipline and the bridge its port; until then
// frames are dropped without an error to the sender (noop qdisc, port
// disabled), so a test's first ARP or SYN could vanish under load.
func (h *Host) waitUp(tb testing.TB) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second) // a failure bound
	for {
		host, err := exec.Command("ip", "-n", h.NS, "-o", "link", "show", "eth0").CombinedOutput()
		var port []byte
		if err == nil {
			port, err = exec.Command("ip", "-n", h.lab.sw, "-o", "-d", "link", "show", h.port).CombinedOutput()
		}
		if err == nil && strings.Contains(string(host), " state UP ") && strings.Contains(string(port), " state UP ") &&
			strings.Contains(string(port), "state forwarding") {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("lab host %s: link not up after 30s: %s / %s (%v)", h.NS, bytes.TrimSpace(host), bytes.TrimSpace(port), err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Cut takes host i's link down (down true) or up again.
func (l *Lab) Cut(tb testing.TB, i int, down bool) {
	tb.Helper()
	state := "up"
	if down {
		state = "down"
	}
	if err := ip("-n", l.sw, "link", "set", l.Hosts[i].port, state); err != nil {
		tb.Fatal(err)
	}
}

// Shape limits what h sends to rate (tc's syntax, e.g. "10gbit") with a
// token bucket on its eth0, as a real link of that speed would; "" lifts
// the limit. Both "hosts" share the machine's CPUs, so without a limit the
// veth pair moves data at memory speed and every test of a transfer is a
// test of CPU time.
func (h *Host) Shape(tb testing.TB, rate string) {
	tb.Helper()
	args := []string{"-n", h.NS, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "4mb", "latency", "20ms"}
	if rate == "" {
		args = []string{"-n", h.NS, "qdisc", "del", "dev", "eth0", "root"}
	}
	if out, err := exec.Command("tc", args...).CombinedOutput(); err != nil {
		tb.Fatalf("tc %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
}

func (l *Lab) remove() {
	for _, h := range l.Hosts {
		ip("netns", "del", h.NS)
	}
	ip("netns", "del", l.sw)
}

// Args returns the command line that runs name with args in h's network
// namespace only (mount, pid and user namespaces stay ours, unlike
// "ip netns exec", which also makes a mount namespace).
func (h *Host) Args(name string, args ...string) []string {
	return append([]string{"nsenter", "--net=/run/netns/" + h.NS, "--", name}, args...)
}

// Command is exec.Command for Args.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	a := h.Args(name, args...)
	return exec.Command(a[0], a[1:]...)
}
