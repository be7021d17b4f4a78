package node

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/pcluster/pcluster/scheduler"
)

// SampleLoad reads the host's load average and memory use from /proc.
func SampleLoad() (scheduler.Load, error) {
	l := scheduler.Load{NumCPU: runtime.NumCPU()}
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l, fmt.Errorf("sample load: %w", err)
	}
	if f := strings.Fields(string(b)); len(f) > 0 {
		l.CPULoad1, _ = strconv.ParseFloat(f[0], 64)
	}
	fh, err := os.Open("/proc/meminfo")
	if err != nil {
		return l, fmt.Errorf("sample load: %w", err)
	}
	defer fh.Close()
	var total, avail uint64
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "MemTotal:":
			total = v << 10
		case "MemAvailable:":
			avail = v << 10
		}
	}
	l.MemFree = avail
	if total > avail {
		l.MemUsed = total - avail
	}
	return l, nil
}

// startTicks returns field 22 of /proc/PID/stat, the process start time in
// clock ticks since boot; with the PID it names one process for good.
func startTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(f))
	}
	// f[0] is field 3 (state); field 22 is f[19].
	return strconv.ParseUint(f[19], 10, 64)
}

// procStateOf returns field 3 of /proc/PID/stat (R, S, t, Z, ...), or 'X'
// when the process is gone.
func procStateOf(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 'X'
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 'X'
	}
	return b[i+2]
}
