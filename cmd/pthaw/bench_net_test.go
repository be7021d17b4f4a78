package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/internal/netlab"
)

// netBenchSubnet is the netlab subnet of BenchmarkNetworkMigration
// (198.18.20.0/24); no other test uses it.
const netBenchSubnet = 20

// tcpHelperEnv selects TestHelperTCP's role in a re-executed test binary:
// "sink ADDR" or "source ADDR BYTES".
const tcpHelperEnv = "PCLUSTER_BENCH_TCP_HELPER"

// netBenchMiB is the size of the migrated processes and of the raw TCP
// transfer.
const netBenchMiB = 1024

// pyHeap builds many small Python objects (dicts holding ints, a string,
// a list with a string and a float) until the interpreter's RSS reaches
// argv[1] MiB, then says ready and ticks.
const pyHeap = `import os, sys, time
target = int(sys.argv[1]) << 20
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
heap = []
i = 0
while rss() < target:
    for _ in range(50000):
        heap.append({"id": i, "name": "obj-%d" % i, "tags": ["t%d" % (i % 97), i * 1.5], "n": i * 7})
        i += 1
print("ready objects=%d" % i, flush=True)
n = 0
while True:
    time.sleep(0.2)
    n += 1
    print("tick %d objects=%d" % (n, len(heap)), flush=True)
`

// BenchmarkNetworkMigration (issue 3) moves a 1 GiB process with
// pfreeze -halt from test host A to pthaw on test host B over tcp, for
// each compression with and without aes-gcm, on two memory contents:
// random bytes (bigheap) and a CPython heap of many small objects. Raw TCP
// throughput between the same two hosts (1 GiB, one connection, between
// two re-executed test binaries) is measured before and after each
// content's runs. MB/s is the process's VmRSS before the freeze divided
// by the wall time of pfreeze (start to exit: capture, transfer, the
// receiver's build, the commit handshake). All of it runs over the bare
// veth pair, with A's link limited to 10 Gbit/s (sub-benchmarks
// "-10gbit") and to 1 Gbit/s ("-1gbit"). Results and how to read them:
// docs/benchmarks.md.
//
//	go test -run '^$' -bench BenchmarkNetworkMigration -benchtime 1x -timeout 20m ./cmd/pthaw
func BenchmarkNetworkMigration(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: ptrace, clone3(set_tid) and network namespaces (CI runs as root)")
	}
	if why := netlab.Available(); why != "" {
		b.Skip(why)
	}
	lab := netlab.New(b, 2, netBenchSubnet)
	ha, hb := lab.Hosts[0], lab.Hosts[1]
	dir, keyfile := keyDir(b)
	port := 25200

	contents := []struct {
		name  string
		start func(b *testing.B) (*fixture.Proc, func(th *thawed))
	}{
		{"random", func(b *testing.B) (*fixture.Proc, func(th *thawed)) {
			p := fixture.Start(b, "nsenter", ha.Args(fixture.Build(b, "bigheap"), strconv.Itoa(netBenchMiB), "7")[1:]...)
			hash := p.Lines.Expect(b, `^ready hash=([0-9a-f]+)$`, 120*time.Second)[1]
			return p, func(th *thawed) {
				// Once it runs (ticks) the restored process hashes
				// its memory again; a signal sent while pthaw still
				// traces it could be swallowed.
				th.out.Expect(b, `^tick \d+$`, 60*time.Second)
				syscall.Kill(th.restoredPid(b), syscall.SIGUSR1)
				th.out.Expect(b, `^check hash=`+hash+` ok$`, 60*time.Second)
			}
		}},
		{"python", func(b *testing.B) (*fixture.Proc, func(th *thawed)) {
			script := filepath.Join(b.TempDir(), "pyheap.py")
			if err := os.WriteFile(script, []byte(pyHeap), 0o644); err != nil {
				b.Fatal(err)
			}
			p := fixture.Start(b, "nsenter", ha.Args(fixture.Python(b), script, strconv.Itoa(netBenchMiB))[1:]...)
			objects := p.Lines.Expect(b, `^ready objects=(\d+)$`, 120*time.Second)[1]
			return p, func(th *thawed) {
				th.out.Expect(b, `^tick \d+ objects=`+objects+`$`, 60*time.Second)
			}
		}},
	}
	// Each content moves over the bare veth pair (memory speed, both ends
	// competing for the same 2 cores: a measure of CPU cost), and over the
	// same pair limited to 10 Gbit/s and to 1 Gbit/s, common data-centre
	// links; at 1 Gbit/s the network is the bottleneck, as between real
	// hosts with cores of their own (only none and the fast compressors
	// there: each run moves 1 GiB in 9 s).
	all := []string{"none", "auto", "gzip", "flate", "snappy", "zstd"}
	fast := []string{"none", "auto", "snappy", "zstd"}
	if c := os.Getenv("NETBENCH_COMPRESS"); c != "" {
		// Quick runs: NETBENCH_COMPRESS=none,snappy (none first).
		all, fast = strings.Split(c, ","), strings.Split(c, ",")
	}
	for _, link := range []struct {
		rate  string
		comps []string
	}{{"", all}, {"10gbit", all}, {"1gbit", fast}} {
		for _, c := range contents {
			name := c.name
			if link.rate != "" {
				name += "-" + link.rate
			}
			b.Run(name, func(b *testing.B) {
				if link.rate != "" {
					ha.Shape(b, link.rate)
					defer ha.Shape(b, "")
				}
				migrateAll(b, c.start, ha, hb, &port, dir, keyfile, link.comps)
			})
		}
	}
}

// migrateAll runs one content's migrations (each compression of comps,
// which starts with none, with and without aes-gcm) between ha and hb and
// reports them.
func migrateAll(b *testing.B, start func(b *testing.B) (*fixture.Proc, func(th *thawed)), ha, hb *netlab.Host, port *int, dir, keyfile string, comps []string) {
	encs := []string{"none", "aes-gcm"}
	raw := []float64{rawTCP(b, ha, hb, *port)}
	*port++
	mbps := map[string]float64{}
	wire := map[string]float64{}
	var rssSum float64
	cpu := map[string]string{} // wall and CPU times of each run
	for _, comp := range comps {
		for _, enc := range encs {
			var secs, moved, sent float64
			for i := 0; i < b.N; i++ {
				p, check := start(b)
				rss := fixture.VmRSS(b, p.Pid())
				thawArgs := []string{"-src", fmt.Sprintf("tcp:%s:%d", hb.Addr, *port), "-insecure"}
				frArgs := []string{"-pid", strconv.Itoa(p.Pid()), "-dest", fmt.Sprintf("tcp:%s:%d", hb.Addr, *port),
					"-compress", comp, "-halt"}
				*port++
				if enc != "none" {
					thawArgs[2] = "-keydir"
					thawArgs = append(thawArgs, dir)
					frArgs = append(frArgs, "-encrypt", enc+":"+keyfile)
				} else {
					frArgs = append(frArgs, "-insecure")
				}
				th := thawCmd(b, hb.Command(filepath.Join(binDir, "pthaw"), thawArgs...))
				th.listening(b)
				tx0 := txBytes(b, ha)
				fr := sendCmd(ha, frArgs...)
				busy0, total0 := fixture.MachineCPU(b)
				t0 := time.Now()
				out, err := fr.CombinedOutput()
				d := time.Since(t0)
				busy1, total1 := fixture.MachineCPU(b)
				cores := float64(runtime.NumCPU()) * (busy1 - busy0) / (total1 - total0)
				if err != nil {
					b.Fatalf("pfreeze %s: %v: %s; pthaw: %s", strings.Join(frArgs, " "), err, out, th.stderr.String())
				}
				tx := txBytes(b, ha) - tx0
				select {
				case <-p.Exited():
				case <-time.After(waitFor):
					b.Fatal("the original still runs after pfreeze -halt")
				}
				check(th)
				// pthaw's own CPU time, read while it still waits
				// for its child: its rusage at exit would include
				// the restored process's (bigheap's re-hash).
				thUser, thSys := fixture.CPUTimes(b, th.cmd.Process.Pid)
				// Free the memory before the next run.
				syscall.Kill(th.restoredPid(b), syscall.SIGKILL)
				select {
				case <-th.done:
				case <-time.After(waitFor):
					b.Fatal("pthaw still runs after its process was killed")
				}
				// CPU time of both ends shows which one limits
				// the pipeline (nsenter execs pfreeze: the
				// command's process is pfreeze's).
				fs := fr.ProcessState
				cpu[comp+"-"+short(enc)] += fmt.Sprintf(" %.2f s (pfreeze usr %.2f sys %.2f, pthaw usr %.2f sys %.2f; machine %.2f cores busy)",
					d.Seconds(), fs.UserTime().Seconds(), fs.SystemTime().Seconds(), thUser, thSys, cores)
				secs += d.Seconds()
				moved += float64(rss)
				sent += float64(tx)
				rssSum += float64(rss)
			}
			key := comp + "-" + short(enc)
			mbps[key] = moved / secs / 1e6
			wire[key] = sent / moved
		}
	}
	raw = append(raw, rawTCP(b, ha, hb, *port))
	*port++
	rawMean := (raw[0] + raw[1]) / 2

	// Benchmark logs are cut after 10 lines (without -v): one
	// line for the baseline, one per compression.
	b.Logf("raw tcp %d MiB: %.2f s before, %.2f s after", netBenchMiB, float64(netBenchMiB<<20)/raw[0]/1e6, float64(netBenchMiB<<20)/raw[1]/1e6)
	for _, comp := range comps {
		b.Logf("%-6s wire/rss %.3f; plain%s; aes-gcm%s", comp, wire[comp+"-plain"], cpu[comp+"-plain"], cpu[comp+"-aes"])
	}
	b.ReportMetric(rssSum/float64(b.N*len(comps)*len(encs))/(1<<20), "rss-MiB")
	b.ReportMetric(raw[0], "raw-before-MB/s")
	b.ReportMetric(raw[1], "raw-after-MB/s")
	for _, comp := range comps {
		for _, enc := range encs {
			key := comp + "-" + short(enc)
			b.ReportMetric(mbps[key], key+"-MB/s")
			b.ReportMetric(mbps[key]/rawMean, key+"/raw")
		}
		b.ReportMetric(mbps[comp+"-aes"]/mbps[comp+"-plain"], comp+":aes/plain")
		b.ReportMetric(wire[comp+"-plain"], comp+"-wire/rss")
	}
	for _, comp := range []string{"auto", "snappy", "zstd"} {
		for _, enc := range encs {
			e := short(enc)
			b.ReportMetric(mbps[comp+"-"+e]/mbps["none-"+e], e+":"+comp+"/none")
		}
	}
}

func short(enc string) string {
	if enc == "none" {
		return "plain"
	}
	return "aes"
}

// txBytes returns the bytes host h has sent on eth0 (IP and TCP headers
// included).
func txBytes(tb testing.TB, h *netlab.Host) int64 {
	tb.Helper()
	out, err := exec.Command("ip", "-n", h.NS, "-s", "-j", "link", "show", "dev", "eth0").Output()
	if err != nil {
		tb.Fatalf("ip -n %s -s link: %v", h.NS, err)
	}
	var links []struct {
		Stats64 struct {
			Tx struct {
				Bytes int64 `json:"bytes"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		tb.Fatalf("ip -n %s -s -j link: %v: %s", h.NS, err, out)
	}
	return links[0].Stats64.Tx.Bytes
}

// rawTCP sends netBenchMiB MiB over one TCP connection from host a to
// host b, between two re-executed test binaries (TestHelperTCP), and
// returns MB/s as the sender measured it: from before the dial until the
// receiver has acknowledged the last byte.
func rawTCP(b *testing.B, ha, hb *netlab.Host, port int) float64 {
	b.Helper()
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	addr := net.JoinHostPort(hb.Addr, strconv.Itoa(port))
	helper := func(h *netlab.Host, role string) *fixture.Proc {
		return fixture.Start(b, "nsenter", h.Args("env", tcpHelperEnv+"="+role, exe, "-test.run=^TestHelperTCP$", "-test.count=1")[1:]...)
	}
	sink := helper(hb, "sink "+addr)
	sink.Lines.Expect(b, `^tcp-helper: listening$`, 60*time.Second)
	size := int64(netBenchMiB) << 20
	src := helper(ha, fmt.Sprintf("source %s %d", addr, size))
	secs, err := strconv.ParseFloat(src.Lines.Expect(b, `^tcp-helper: sent \d+ bytes in ([0-9.]+) s$`, 120*time.Second)[1], 64)
	if err != nil {
		b.Fatal(err)
	}
	sink.Lines.Expect(b, fmt.Sprintf(`^tcp-helper: received %d bytes$`, size), waitFor)
	for _, p := range []*fixture.Proc{src, sink} {
		if code, err := p.Wait(60 * time.Second); err != nil || code != 0 {
			b.Fatalf("tcp helper: exit %d, %v: %q", code, err, p.Lines.Last())
		}
	}
	return float64(size) / secs / 1e6
}

// TestHelperTCP is the raw TCP sink or source of BenchmarkNetworkMigration,
// run in a re-executed test binary; it skips unless tcpHelperEnv is set.
func TestHelperTCP(t *testing.T) {
	role := strings.Fields(os.Getenv(tcpHelperEnv))
	if len(role) == 0 {
		t.Skip("helper process of BenchmarkNetworkMigration (runs only when " + tcpHelperEnv + " is set)")
	}
	buf := make([]byte, 1<<20) // pfreeze's largest frame
	switch {
	case len(role) == 2 && role[0] == "sink":
		ln, err := net.Listen("tcp", role[1])
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println("tcp-helper: listening")
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		ln.Close()
		defer c.Close()
		var n int64
		for {
			k, err := c.Read(buf)
			n += int64(k)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if err := binary.Write(c, binary.BigEndian, n); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("tcp-helper: received %d bytes\n", n)
	case len(role) == 3 && role[0] == "source":
		size, err := strconv.ParseInt(role[2], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		rand.Read(buf)
		t0 := time.Now()
		c, err := net.Dial("tcp", role[1])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for left := size; left > 0; left -= int64(len(buf)) {
			if _, err := c.Write(buf[:min(left, int64(len(buf)))]); err != nil {
				t.Fatal(err)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		var got int64
		if err := binary.Read(c, binary.BigEndian, &got); err != nil {
			t.Fatal(err)
		}
		d := time.Since(t0)
		if got != size {
			t.Fatalf("receiver got %d bytes, want %d", got, size)
		}
		fmt.Printf("tcp-helper: sent %d bytes in %.6f s\n", size, d.Seconds())
	default:
		t.Fatalf("%s=%q: want \"sink ADDR\" or \"source ADDR BYTES\"", tcpHelperEnv, os.Getenv(tcpHelperEnv))
	}
}
