package loader_test

import (
	"os"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// BenchmarkIncremental1GiB checkpoints a process holding 1 GiB of
// distinct pages to tmpfs (AES-GCM): a full snapshot, then, after it has
// rewritten 16 MiB of pages spread over the area, an incremental one
// against the first (its parent read first, while the process runs).
// Reported: both sizes and times (the incremental's reading of its parent
// apart) and the ratio incremental/full bytes. Target (issue 13): ≤ 5%.
// Run with make bench.
func BenchmarkIncremental1GiB(b *testing.B) {
	needRoot(b)
	bin := fixture.Build(b, "pagewriter")
	dir, err := os.MkdirTemp("/dev/shm", "pcluster-bench-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	tr := ptrace.NewTracer()
	defer tr.Close()
	key := clusterKey(b)
	var fullMiB, incMiB, fullS, readS, incS float64
	for i := 0; i < b.N; i++ {
		p := fixture.Start(b, bin, "1024")
		p.Expect(b, `^ready$`, 2*waitFor)
		t0 := time.Now()
		full, fullSize := checkpoint(b, tr, p.Pid(), dir, "full.pf", "", "none", key)
		t1 := time.Now()
		parent, err := capture.OpenParent(full, []stream.Key{key})
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if err := p.WriteLine("write 16"); err != nil {
			b.Fatal(err)
		}
		p.Expect(b, `^wrote 16$`, waitFor)
		t3 := time.Now()
		_, incSize := checkpointAgainst(b, tr, p.Pid(), dir, "inc.pf", parent, "none", key)
		t4 := time.Now()
		p.Kill()
		p.Wait(waitFor)
		fullMiB += float64(fullSize) / (1 << 20)
		incMiB += float64(incSize) / (1 << 20)
		fullS += t1.Sub(t0).Seconds()
		readS += t2.Sub(t1).Seconds()
		incS += t4.Sub(t3).Seconds()
		os.Remove(full)
		os.Remove(dir + "/inc.pf")
	}
	n := float64(b.N)
	b.ReportMetric(fullMiB/n, "full-MiB")
	b.ReportMetric(incMiB/n, "incr-MiB")
	b.ReportMetric(fullS/n, "full-s")
	b.ReportMetric(readS/n, "incr-read-parent-s")
	b.ReportMetric(incS/n, "incr-s")
	b.ReportMetric(incMiB/fullMiB, "incr/full-bytes")
}
