package capture

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// POSIX timers (timer_create) are listed by /proc/PID/timers; their time
// left and overrun only the process can report (timer_gettime and
// timer_getoverrun, injected).

// sigev_notify values.
const (
	sigevSignal   = 0
	sigevNone     = 1
	sigevThread   = 2 // signals the process, as SIGEV_SIGNAL (glibc's SIGEV_THREAD is made of SIGEV_THREAD_ID)
	sigevThreadID = 4
)

// listTimers parses /proc/PID/timers:
//
//	ID: 0
//	signal: 14/0000000000000000
//	notify: signal/pid.1234
//	ClockID: 1
func listTimers(pid int) ([]image.PosixTimer, error) {
	b, err := os.ReadFile(procfs.Path(pid, "timers"))
	if err != nil {
		return nil, fmt.Errorf("timers: %w", err)
	}
	var out []image.PosixTimer
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		bad := func(err error) error { return fmt.Errorf("timers: line %q: %w", line, err) }
		if k == "ID" {
			id, err := strconv.Atoi(v)
			if err != nil {
				return nil, bad(err)
			}
			out = append(out, image.PosixTimer{ID: id})
			continue
		}
		if len(out) == 0 {
			return nil, bad(fmt.Errorf("before any ID"))
		}
		t := &out[len(out)-1]
		switch k {
		case "signal":
			sig, val, _ := strings.Cut(v, "/")
			if t.Signo, err = strconv.Atoi(sig); err != nil {
				return nil, bad(err)
			}
			if t.Value, err = strconv.ParseUint(val, 16, 64); err != nil {
				return nil, bad(err)
			}
		case "notify":
			how, who, _ := strings.Cut(v, "/")
			switch how {
			case "signal":
				t.Notify = sigevSignal
			case "none":
				t.Notify = sigevNone
			case "thread":
				t.Notify = sigevThread
			default:
				return nil, unsupported("POSIX timer %d: notify %s", t.ID, v)
			}
			kind, n, _ := strings.Cut(who, ".")
			if kind == "tid" {
				t.Notify |= sigevThreadID
				if t.Tid, err = strconv.Atoi(n); err != nil {
					return nil, bad(err)
				}
			}
		case "ClockID":
			if t.Clock, err = strconv.Atoi(v); err != nil {
				return nil, bad(err)
			}
		}
	}
	return out, nil
}

// injectTimerQueries reads each timer's time left and overrun through
// th, the main thread. Runs on the tracer thread.
func (f *Frozen) injectTimerQueries(th *thread, timers []image.PosixTimer) error {
	s := uintptr(th.scratchAddr)
	for i := range timers {
		t := &timers[i]
		_, b, err := f.call(th, 32, unix.SYS_TIMER_GETTIME, uintptr(t.ID), s)
		if err != nil {
			return fmt.Errorf("timer_gettime %d: %w", t.ID, err)
		}
		t.ReadAtUnixNs = time.Now().UnixNano()
		t.IntervalNs = int64(le64(b[0:]))*1e9 + int64(le64(b[8:]))
		t.ValueNs = int64(le64(b[16:]))*1e9 + int64(le64(b[24:]))
		o, _, err := f.call(th, 0, unix.SYS_TIMER_GETOVERRUN, uintptr(t.ID))
		if err != nil {
			return fmt.Errorf("timer_getoverrun %d: %w", t.ID, err)
		}
		t.Overrun = int(o)
	}
	return nil
}

// timerThreads turns the thread a SIGEV_THREAD_ID timer signals from our
// TID into the recorded one (tids[i] is recorded as out[i].Tid).
func timerThreads(timers []image.PosixTimer, tids []int, out []*image.Thread) error {
	for i := range timers {
		t := &timers[i]
		if t.Notify&sigevThreadID == 0 {
			continue
		}
		found := false
		for j, tid := range tids {
			if tid == t.Tid {
				t.Tid, found = out[j].Tid, true
				break
			}
		}
		if !found {
			return unsupported("POSIX timer %d signals thread %d, which is not the process's", t.ID, t.Tid)
		}
	}
	return nil
}
