package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// BenchmarkFreezeThaw1GiB freezes a process holding 1 GiB of random
// anonymous memory to /dev/shm and thaws it, next to this machine's
// memcpy and tmpfs-write bandwidth measured in the same run (the machine
// is shared and noisy: compare the ratios). Issue 13's baseline, `dd
// if=/dev/zero of=/dev/shm/x bs=1M count=1024`, runs just before each
// freeze, with the process's 1 GiB resident as during the freeze:
// freeze-s/dd-s (target ≤ 2) and thaw-s/dd-s are time ratios. Run with
// make bench.
func BenchmarkFreezeThaw1GiB(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	const mib = 1024
	size := float64(mib << 20)
	bin := fixture.Build(b, "bigheap")
	var freezeS, thawS, ddS, freezeRSS, thawRSS float64
	for i := 0; i < b.N; i++ {
		p := fixture.Start(b, bin, strconv.Itoa(mib), "9")
		hash := p.Lines.Expect(b, `^ready hash=([0-9a-f]+)$`, 120*time.Second)[1]
		snap := filepath.Join("/dev/shm", "pcluster-bench-"+strconv.Itoa(os.Getpid()))
		b.Cleanup(func() { os.Remove(snap) })
		ddS += ddSeconds(b, mib)

		fr, rss := timed(b, filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap)
		t0 := time.Now()
		if out, err := fr.CombinedOutput(); err != nil {
			b.Fatalf("pfreeze: %v: %s", err, out)
		}
		freezeS += time.Since(t0).Seconds()
		freezeRSS += rss()
		<-p.Exited()

		th, rss := timed(b, filepath.Join(binDir, "pthaw"), "-detach", "-src", snap)
		th.Stdout, _ = os.Create(os.DevNull)
		t0 = time.Now()
		if err := th.Run(); err != nil {
			b.Fatalf("pthaw: %v", err)
		}
		thawS += time.Since(t0).Seconds()
		thawRSS += rss()
		fixture.KillAtCleanup(b, p.Pid())
		if err := syscall.Kill(p.Pid(), syscall.SIGUSR1); err != nil {
			b.Fatal(err)
		}
		// The thawed process answers on pthaw's stdout, /dev/null here;
		// its liveness is what the benchmark checks.
		time.Sleep(100 * time.Millisecond)
		if !fixture.Alive(p.Pid()) {
			b.Fatalf("thawed process %d (hash %s) is not running", p.Pid(), hash)
		}
		os.Remove(snap)
	}
	// Baselines after the runs: a child forked while this process holds
	// their buffers would inherit that RSS as its own maximum.
	memcpy := memcpyBandwidth()
	tmpfs := tmpfsBandwidth(b)
	n := float64(b.N)
	b.ReportMetric(size/(freezeS/n)/1e6, "freeze-MB/s")
	b.ReportMetric(size/(thawS/n)/1e6, "thaw-MB/s")
	b.ReportMetric(freezeS/n*1000, "stopped-ms")
	b.ReportMetric(freezeRSS/n, "pfreeze-maxrss-MiB")
	b.ReportMetric(thawRSS/n, "pthaw-maxrss-MiB")
	b.ReportMetric(memcpy/1e6, "memcpy-MB/s")
	b.ReportMetric(tmpfs/1e6, "tmpfs-write-MB/s")
	b.ReportMetric(size/(freezeS/n)/tmpfs, "freeze/tmpfs")
	b.ReportMetric(size/(thawS/n)/memcpy, "thaw/memcpy")
	b.ReportMetric(ddS/n, "dd-s")
	b.ReportMetric(thawS/n, "thaw-s")
	b.ReportMetric(freezeS/ddS, "freeze-s/dd-s")
	b.ReportMetric(thawS/ddS, "thaw-s/dd-s")
}

// ddSeconds times `dd if=/dev/zero of=/dev/shm/... bs=1M count=mib`, the
// tmpfs write issue 13 measures pfreeze against, and removes its file.
func ddSeconds(b *testing.B, mib int) float64 {
	path := filepath.Join("/dev/shm", "pcluster-bench-dd-"+strconv.Itoa(os.Getpid()))
	defer os.Remove(path)
	cmd := exec.Command("dd", "if=/dev/zero", "of="+path, "bs=1M", "count="+strconv.Itoa(mib))
	t0 := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("dd: %v: %s", err, out)
	}
	return time.Since(t0).Seconds()
}

// timed returns a command running name under GNU time, and a function
// that returns the command's peak RSS in MiB once it has run. Our own
// rusage would not do: a child forked from this (large) test process
// inherits its high-water mark across exec; time forks from a small one.
func timed(b *testing.B, name string, args ...string) (*exec.Cmd, func() float64) {
	gnuTime, err := exec.LookPath("/usr/bin/time")
	if err != nil {
		b.Skip("GNU time (Debian package time) not installed")
	}
	out := filepath.Join(b.TempDir(), "rss")
	cmd := exec.Command(gnuTime, append([]string{"-f", "%M", "-o", out, name}, args...)...)
	return cmd, func() float64 {
		data, err := os.ReadFile(out)
		if err != nil {
			b.Fatal(err)
		}
		kb, err := strconv.ParseFloat(strings.TrimSpace(string(data)), 64)
		if err != nil {
			b.Fatalf("time output %q: %v", data, err)
		}
		return kb / 1024
	}
}

// memcpyBandwidth copies 256 MiB buffers a few times and returns bytes/s.
func memcpyBandwidth() float64 {
	src := make([]byte, 256<<20)
	dst := make([]byte, 256<<20)
	for i := range src {
		src[i] = byte(i)
	}
	copy(dst, src) // fault the pages in
	t0 := time.Now()
	for i := 0; i < 4; i++ {
		copy(dst, src)
	}
	return 4 * float64(len(src)) / time.Since(t0).Seconds()
}

// tmpfsBandwidth writes 1 GiB to /dev/shm in 1 MiB writes.
func tmpfsBandwidth(b *testing.B) float64 {
	path := filepath.Join("/dev/shm", "pcluster-bench-tmpfs-"+strconv.Itoa(os.Getpid()))
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer os.Remove(path)
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	t0 := time.Now()
	for i := 0; i < 1024; i++ {
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	return float64(1<<30) / time.Since(t0).Seconds()
}

// BenchmarkFreezeThawThreads compares a 16-thread process holding 256 MiB
// with a single-threaded one holding the same, in the same run (issue 4:
// within 20%). Each is frozen with -halt to /dev/shm and thawed.
func BenchmarkFreezeThawThreads(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	const mib = 256
	f1, t1, f16, t16 := freezeThawCompared(b, mib, "threadheap", "16")
	b.ReportMetric(f1, "single-freeze-MB/s")
	b.ReportMetric(t1, "single-thaw-MB/s")
	b.ReportMetric(f16, "16threads-freeze-MB/s")
	b.ReportMetric(t16, "16threads-thaw-MB/s")
	b.ReportMetric(f16/f1, "freeze-16threads/single")
	b.ReportMetric(t16/t1, "thaw-16threads/single")
}

// BenchmarkFreezeThawTree compares a tree of 10 processes holding 256 MiB
// in all with a single process holding the same, in the same run (issue
// 4: within 20%), frozen with -tree -halt to /dev/shm and thawed.
func BenchmarkFreezeThawTree(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	f1, t1, f10, t10 := freezeThawCompared(b, 256, "treeheap", "10")
	b.ReportMetric(f1, "single-freeze-MB/s")
	b.ReportMetric(t1, "single-thaw-MB/s")
	b.ReportMetric(f10, "10procs-freeze-MB/s")
	b.ReportMetric(t10, "10procs-thaw-MB/s")
	b.ReportMetric(f10/f1, "freeze-10procs/single")
	b.ReportMetric(t10/t1, "thaw-10procs/single")
}

// freezeThawCompared measures freeze and thaw MB/s of bigheap holding mib
// MiB and of prog (threadheap or treeheap) with n threads or processes
// holding the same, b.N times each.
func freezeThawCompared(b *testing.B, mib int, prog, n string) (f1, t1, fn, tn float64) {
	run := func(prog string, args ...string) (freeze, thaw float64) {
		tree := prog == "treeheap"
		for i := 0; i < b.N; i++ {
			var p *fixture.Proc
			if tree {
				p = fixture.StartGroup(b, fixture.Build(b, prog), args...)
			} else {
				p = fixture.Start(b, fixture.Build(b, prog), args...)
			}
			p.Lines.Expect(b, `^ready`, 60*time.Second)
			snap := filepath.Join("/dev/shm", "pcluster-bench-"+strconv.Itoa(os.Getpid()))
			b.Cleanup(func() { os.Remove(snap) })
			fargs := []string{"-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap}
			if tree {
				fargs = append(fargs, "-tree")
			}
			t0 := time.Now()
			if out, err := exec.Command(filepath.Join(binDir, "pfreeze"), fargs...).CombinedOutput(); err != nil {
				b.Fatalf("pfreeze %s: %v: %s", prog, err, out)
			}
			freeze += time.Since(t0).Seconds()
			<-p.Exited()
			// -new-pid: the killed original's children are orphans that this
			// sandbox's init never reaps, so their PIDs stay taken and the
			// default would spend its 2 s wait for them on every run.
			th := exec.Command(filepath.Join(binDir, "pthaw"), "-detach", "-new-pid", "-src", snap)
			outPath := filepath.Join(b.TempDir(), "stdout")
			th.Stdout, _ = os.Create(outPath)
			// A file, not a pipe: the detached process keeps pthaw's stderr.
			errPath := filepath.Join(b.TempDir(), "stderr")
			errF, _ := os.Create(errPath)
			th.Stderr = errF
			t0 = time.Now()
			err := th.Run()
			took := time.Since(t0)
			errF.Close()
			msg, _ := os.ReadFile(errPath)
			if err != nil {
				b.Fatalf("pthaw %s: %v: %s", prog, err, msg)
			}
			thaw += took.Seconds()
			if len(msg) > 0 {
				b.Logf("pthaw %s (%v): %s", prog, took, strings.TrimSpace(string(msg)))
			}
			restored, _ := strconv.Atoi(strings.TrimSpace(firstLine(b, th)))
			if restored <= 0 {
				b.Fatalf("pthaw %s printed no pid", prog)
			}
			b.Cleanup(func() { syscall.Kill(-restored, syscall.SIGKILL); syscall.Kill(restored, syscall.SIGKILL) })
			os.Remove(snap)
		}
		size := float64(mib<<20) * float64(b.N)
		return size / freeze / 1e6, size / thaw / 1e6
	}
	f1, t1 = run("bigheap", strconv.Itoa(mib), "3")
	fn, tn = run(prog, n, strconv.Itoa(mib), "3")
	return f1, t1, fn, tn
}

// firstLine returns the first line cmd wrote to the file it had as stdout.
func firstLine(b *testing.B, cmd *exec.Cmd) string {
	f, ok := cmd.Stdout.(*os.File)
	if !ok {
		return ""
	}
	data, err := os.ReadFile(f.Name())
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	return line
}
