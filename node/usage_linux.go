package node

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pcluster/pcluster/scheduler"
)

// What each workload uses, for the balancer (scheduler/balance.go): the
// host's load average and free memory say nothing about which process
// makes a host busy, and hosts that are namespaces of one machine all see
// the same /proc/loadavg. The agent measures each workload on its own:
// CPU time from its cgroup's cpu.stat (usage_usec, which counts every
// process of the workload's tree, the ones that exited included) and
// memory from memory.current when the memory controller is on, else the
// resident set of the processes in the cgroup. Without cgroups it adds up
// the process tree under the process it watches (the workload's PID
// namespace init): /proc/PID/stat utime+stime+cutime+cstime and statm of
// each, found by /proc/PID/task/TID/children.

// usageSample is one reading of a workload's CPU time.
type usageSample struct {
	attempt int
	cpu     time.Duration // CPU time used so far
	at      time.Time
}

// clockTick is the unit of /proc/PID/stat's utime and stime (USER_HZ,
// 100 on every Linux architecture pcluster runs on).
const clockTick = 10 * time.Millisecond

var pageSize = uint64(os.Getpagesize())

// Usage returns what each workload this agent watches uses: CPU in
// milli-cores over the time since the previous call, memory in bytes. A
// workload appears from its second sample on (the first sets the
// baseline). Safe from any goroutine; calls are serialized.
func (a *Agent) Usage() map[string]scheduler.Use {
	a.mu.Lock()
	type target struct {
		id           string
		attempt, pid int
	}
	var ts []target
	for _, p := range a.procs {
		if !p.stopping && p.pid > 0 {
			ts = append(ts, target{p.id, p.attempt, p.pid})
		}
	}
	a.mu.Unlock()

	a.usageMu.Lock()
	defer a.usageMu.Unlock()
	now := time.Now()
	out := map[string]scheduler.Use{}
	next := make(map[string]usageSample, len(ts))
	for _, t := range ts {
		cpu, rss, err := a.measure(t.id, t.attempt, t.pid)
		if err != nil {
			a.log.Debug("workload use", "workload", t.id, "err", err)
			continue
		}
		cur := usageSample{attempt: t.attempt, cpu: cpu, at: now}
		next[t.id] = cur
		prev, ok := a.usage[t.id]
		if !ok || prev.attempt != t.attempt || cur.cpu < prev.cpu || !now.After(prev.at) {
			continue
		}
		milli := float64(cur.cpu-prev.cpu) / float64(now.Sub(prev.at)) * 1000
		out[t.id] = scheduler.Use{CPU: uint32(min(max(milli, 0), 1<<31) + 0.5), RSS: rss}
	}
	a.usage = next
	return out
}

// measure reads a workload's CPU time and memory.
func (a *Agent) measure(id string, attempt, pid int) (time.Duration, uint64, error) {
	if a.cg != nil {
		dir := a.cg.dir(id, attempt)
		if a.cg.holds(id, attempt, pid) {
			cpu, err := cgroupCPU(dir)
			if err != nil {
				return 0, 0, err
			}
			if b, err := os.ReadFile(filepath.Join(dir, "memory.current")); err == nil {
				if v, err := strconv.ParseUint(string(bytes.TrimSpace(b)), 10, 64); err == nil {
					return cpu, v, nil
				}
			}
			var rss uint64
			for _, p := range procsOf(dir) {
				r, _ := procRSS(p)
				rss += r
			}
			return cpu, rss, nil
		}
	}
	return treeUse(pid)
}

// treeUse adds up the CPU time and resident set of pid and its
// descendants (a workload's PID namespace: its init and the command).
// Each process counts its own time and that of its children it reaped
// (cutime, cstime), so the sum only grows as the tree's processes end.
func treeUse(root int) (time.Duration, uint64, error) {
	var cpu time.Duration
	var rss uint64
	todo := []int{root}
	for n := 0; len(todo) > 0 && n < 4096; n++ {
		pid := todo[0]
		todo = todo[1:]
		c, err := procCPU(pid)
		if err != nil {
			if pid == root {
				return 0, 0, err
			}
			continue // ended meanwhile: its parent reaps its time
		}
		cpu += c
		r, _ := procRSS(pid)
		rss += r
		todo = append(todo, procChildren(pid)...)
	}
	return cpu, rss, nil
}

// procChildren lists a process's children, from every thread's
// /proc/PID/task/TID/children.
func procChildren(pid int) []int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// cgroupCPU returns usage_usec from a cgroup's cpu.stat.
func cgroupCPU(dir string) (time.Duration, error) {
	f, err := os.Open(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", filepath.Base(dir), err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "usage_usec "); ok {
			us, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("cgroup %s: cpu.stat: %w", filepath.Base(dir), err)
			}
			return time.Duration(us) * time.Microsecond, nil
		}
	}
	return 0, fmt.Errorf("cgroup %s: cpu.stat has no usage_usec", filepath.Base(dir))
}

// procCPU returns a process's user + system time and that of its reaped
// children (fields 14 to 17 of /proc/PID/stat).
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	// f[0] is field 3; utime, stime, cutime, cstime are fields 14 to 17
	// (f[11] to f[14]).
	var ticks uint64
	for _, v := range f[11:15] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc/%d/stat: times %q: %w", pid, f[11:15], err)
		}
		ticks += uint64(max(n, 0))
	}
	return time.Duration(ticks) * clockTick, nil
}

// procRSS returns a process's resident set (/proc/PID/statm, field 2).
func procRSS(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("parse /proc/%d/statm", pid)
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse /proc/%d/statm: %w", pid, err)
	}
	return pages * pageSize, nil
}
