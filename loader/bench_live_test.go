package loader_test

import (
	"context"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// BenchmarkLiveMigrate1GiB moves the dirtier fixture holding 1 GiB, its
// two writers dirtying 16 MiB/s, between two agents of this process over
// a unix socket (AES-GCM), once stop-and-copy and once live, in the same
// run. Each copy then checks every page against its ledger and reports
// the longest time it did not run (its own view of the stop). Targets
// (issue 13): live stop ≤ 100 ms, live total ≤ 2× stop-and-copy's.
// Run with make bench.
func BenchmarkLiveMigrate1GiB(b *testing.B) {
	needRoot(b)
	bin := fixture.Build(b, "dirtier")
	var sc, lv moveFigures
	for i := 0; i < b.N; i++ {
		sc.add(moveDirtier(b, bin, false))
		lv.add(moveDirtier(b, bin, true))
	}
	n := float64(b.N)
	b.ReportMetric(sc.stopMS/n, "stopcopy-stop-ms")
	b.ReportMetric(sc.totalS/n, "stopcopy-total-s")
	b.ReportMetric(lv.stopMS/n, "live-stop-ms")
	b.ReportMetric(lv.totalS/n, "live-total-s")
	b.ReportMetric(float64(lv.rounds)/n, "live-rounds")
	b.ReportMetric(lv.precopyMiB/n, "live-precopy-MiB")
	b.ReportMetric(lv.finalMiB/n, "live-final-MiB")
	b.ReportMetric(lv.totalS/sc.totalS, "live/stopcopy-total")
	b.ReportMetric(lv.stopMS/sc.stopMS, "live/stopcopy-stop")
}

type moveFigures struct {
	stopMS, totalS       float64
	rounds               int
	precopyMiB, finalMiB float64
}

func (f *moveFigures) add(g moveFigures) {
	f.stopMS += g.stopMS
	f.totalS += g.totalS
	f.rounds += g.rounds
	f.precopyMiB += g.precopyMiB
	f.finalMiB += g.finalMiB
}

// unixPair returns the two ends of a connected unix stream socket.
func unixPair(b testing.TB) (net.Conn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		conns[i] = c
	}
	return conns[0], conns[1]
}

// moveDirtier starts dirtier (1 GiB, 2 writers, 16 MiB/s), moves it and
// returns what the move cost; the copy must check out exactly.
func moveDirtier(b *testing.B, bin string, live bool) moveFigures {
	orig, pid := fixture.StartUnderShell(b, bin, "1024", "2", "16384")
	orig.Expect(b, `^ready$`, 120*time.Second)
	a := &agents{key: clusterKey(b), srcTr: ptrace.NewTracer(), dstTr: ptrace.NewTracer()}
	defer a.srcTr.Close()
	defer a.dstTr.Close()
	a.srcConn, a.dstConn = unixPair(b)
	pr, pw, err := os.Pipe()
	if err != nil {
		b.Fatal(err)
	}
	defer pr.Close()
	out := fixture.FollowReader(b, pr)
	var st capture.LiveStats
	sent := make(chan error, 1)
	t0 := time.Now()
	go func() {
		sink, err := stream.NewConnSink(context.Background(), a.srcConn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: 120 * time.Second})
		if err != nil {
			sent <- err
			return
		}
		sent <- capture.SendTo(context.Background(), a.srcTr, pid, sink, capture.SendOptions{Halt: true,
			Cipher: stream.CipherAESGCM, Key: &a.key, ReadyTimeout: 120 * time.Second,
			Live: live, LiveOptions: capture.LiveOptions{Stats: &st, Notice: func(s string) { b.Log(s) }}})
	}()
	p, rerr := a.receive(context.Background(), a.dstConn, pw)
	pw.Close()
	serr := <-sent
	total := time.Since(t0)
	if p != nil {
		defer reap(b, p)
	}
	if rerr != nil || serr != nil {
		b.Fatalf("target: %v; source: %v", rerr, serr)
	}
	if err := syscall.Kill(p.Pid(), syscall.SIGUSR1); err != nil {
		b.Fatal(err)
	}
	got, err := out.Match(`^check ok (?:member=\d+ )?pages=\d+ maxgap_us=(\d+)$|^check .*`, 120*time.Second)
	if err != nil {
		b.Fatalf("check after the move: %v", err)
	}
	if got[1] == "" {
		b.Fatalf("check after the move (live %v): %s", live, got[0])
	}
	gap, _ := strconv.ParseFloat(got[1], 64)
	return moveFigures{stopMS: gap / 1000, totalS: total.Seconds(), rounds: st.Rounds,
		precopyMiB: float64(st.PrecopyBytes) / (1 << 20), finalMiB: float64(st.FinalBytes) / (1 << 20)}
}
