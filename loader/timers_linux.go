package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// POSIX timers are made again with their ids: since Linux 6.16
// prctl(PR_TIMER_CREATE_RESTORE_IDS) makes timer_create take the id it is
// given; before, ids were handed out in increasing order, so timers are
// made (and the unwanted ones deleted) until the next is the saved one,
// CRIU's older way. Each is armed with the time it had left less the time
// since it was read (the wall clock's); a timer that would have expired
// meanwhile fires at once after the restore (one signal, as the kernel
// would have sent, its further expirations in the overrun it reports
// then), a periodic one then keeps its interval.

// prTimerCreateRestoreIDs is PR_TIMER_CREATE_RESTORE_IDS (Linux 6.16).
const prTimerCreateRestoreIDs = 77

// sigevThreadID is SIGEV_THREAD_ID.
const sigevThreadID = 4

// timerLeft is the time to arm a timer with now: what it had left less
// the time since it was read; 1 ns if that passed (it fires at once).
func timerLeft(t *image.PosixTimer, now int64) int64 {
	if t.ValueNs == 0 {
		return 0
	}
	left := t.ValueNs - max(now-t.ReadAtUnixNs, 0)
	return max(left, 1)
}

// restoreTimers makes every POSIX timer in the process, through its main
// thread, armed; tasks map a SIGEV_THREAD_ID timer's thread. Runs on the
// tracer thread.
func (p *Process) restoreTimers(tasks []*task, scratch uintptr) error {
	timers := p.proc.Timers
	if len(timers) == 0 {
		return nil
	}
	restoreIDs := true
	if _, err := p.call(unix.SYS_PRCTL, prTimerCreateRestoreIDs, 1, 0, 0, 0); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("prctl(PR_TIMER_CREATE_RESTORE_IDS): %w", err)
		}
		restoreIDs = false
	}
	for _, t := range timers {
		ev := make([]byte, 64+4) // struct sigevent, then the timer id
		binary.LittleEndian.PutUint64(ev[0:], t.Value)
		binary.LittleEndian.PutUint32(ev[8:], uint32(t.Signo))
		binary.LittleEndian.PutUint32(ev[12:], uint32(t.Notify))
		if t.Notify&sigevThreadID != 0 {
			tid := 0
			for _, tk := range tasks {
				if tk.img.Tid == t.Tid {
					tid = p.localPid(tk.in.Tid, tk.img.Tid)
				}
			}
			if tid == 0 {
				return fmt.Errorf("%w: POSIX timer %d signals thread %d, not in the snapshot", image.ErrCorrupt, t.ID, t.Tid)
			}
			binary.LittleEndian.PutUint32(ev[16:], uint32(tid))
		}
		binary.LittleEndian.PutUint32(ev[64:], uint32(t.ID))
		if err := p.mem.Write(uint64(scratch), ev); err != nil {
			return err
		}
		if err := p.createTimer(t, scratch, restoreIDs); err != nil {
			return fmt.Errorf("POSIX timer %d (clock %d): %w", t.ID, t.Clock, err)
		}
		left := timerLeft(&t, time.Now().UnixNano())
		if left == 0 && t.IntervalNs == 0 {
			continue
		}
		its := make([]byte, 32)
		binary.LittleEndian.PutUint64(its[0:], uint64(t.IntervalNs/1e9))
		binary.LittleEndian.PutUint64(its[8:], uint64(t.IntervalNs%1e9))
		binary.LittleEndian.PutUint64(its[16:], uint64(left/1e9))
		binary.LittleEndian.PutUint64(its[24:], uint64(left%1e9))
		if err := p.mem.Write(uint64(scratch)+128, its); err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_TIMER_SETTIME, uintptr(t.ID), 0, scratch+128, 0); err != nil {
			return fmt.Errorf("POSIX timer %d: timer_settime: %w", t.ID, err)
		}
	}
	if restoreIDs {
		if _, err := p.call(unix.SYS_PRCTL, prTimerCreateRestoreIDs, 0, 0, 0, 0); err != nil {
			return fmt.Errorf("prctl(PR_TIMER_CREATE_RESTORE_IDS off): %w", err)
		}
	}
	return nil
}

// createTimer makes timer t from the sigevent and id at scratch, with its
// saved id. Runs on the tracer thread.
func (p *Process) createTimer(t image.PosixTimer, scratch uintptr, restoreIDs bool) error {
	idAddr := scratch + 64
	for tries := 0; ; tries++ {
		if _, err := p.call(unix.SYS_TIMER_CREATE, uintptr(t.Clock), scratch, idAddr); err != nil {
			return fmt.Errorf("timer_create: %w", err)
		}
		b := make([]byte, 4)
		if err := p.mem.Read(uint64(idAddr), b); err != nil {
			return err
		}
		got := int(int32(binary.LittleEndian.Uint32(b)))
		if got == t.ID {
			return nil
		}
		if restoreIDs || got > t.ID || tries > 1<<16 {
			return fmt.Errorf("timer_create: got id %d", got)
		}
		if _, err := p.call(unix.SYS_TIMER_DELETE, uintptr(got)); err != nil {
			return fmt.Errorf("timer_delete %d: %w", got, err)
		}
		binary.LittleEndian.PutUint32(b, uint32(t.ID))
		if err := p.mem.Write(uint64(idAddr), b); err != nil {
			return err
		}
	}
}
