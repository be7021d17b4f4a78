package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// Anonymous inodes besides eventfd and epoll: timerfd, signalfd and
// inotify, each made by the process itself (injected calls) and moved
// onto its number by openFile.

// tfdIocSetTicks is TFD_IOC_SET_TICKS, _IOW('T', 0, __u64): sets a
// timerfd's count of unread expirations (CONFIG_CHECKPOINT_RESTORE).
const tfdIocSetTicks = 0x40085400

// openAnon makes the anonymous inode f describes and returns its fd in
// the process. Runs on the tracer thread.
func (p *Process) openAnon(f *image.FD) (uintptr, error) {
	nonblock := uintptr(f.Flags & unix.O_NONBLOCK)
	scratch := p.base + stubScratchOff
	switch f.Kind {
	case image.FDSignalfd:
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, f.SigMask)
		if err := p.mem.Write(scratch, b); err != nil {
			return 0, err
		}
		fd, err := p.call(unix.SYS_SIGNALFD4, ^uintptr(0), uintptr(scratch), 8, nonblock|unix.SFD_CLOEXEC)
		if err != nil {
			return 0, fmt.Errorf("fd %d: signalfd mask %#x: %w", f.Fd, f.SigMask, err)
		}
		return fd, nil
	case image.FDTimerfd:
		return p.openTimerfd(f, nonblock, scratch)
	case image.FDInotify:
		return p.openInotify(f, nonblock, scratch)
	case image.FDFanotify:
		return p.openFanotify(f, nonblock)
	}
	return 0, fmt.Errorf("%w: fd %d of kind %d", image.ErrCorrupt, f.Fd, f.Kind)
}

// timerfdNow is the timerfd's state now: the expirations that fell since
// it was read added to its unread ones, and the time left to the next.
// The time since is measured by the wall clock (the snapshot may come
// from another host, whose monotonic clock is another).
func timerfdNow(t *image.Timerfd, now int64) (ticks uint64, value int64) {
	ticks, value = t.Ticks, t.ValueNs
	elapsed := max(now-t.ReadAtUnixNs, 0)
	if value == 0 {
		return ticks, 0 // disarmed
	}
	if elapsed < value {
		return ticks, value - elapsed
	}
	over := elapsed - value
	if t.IntervalNs == 0 {
		return ticks + 1, 0
	}
	return ticks + 1 + uint64(over/t.IntervalNs), t.IntervalNs - over%t.IntervalNs
}

// openTimerfd makes a timerfd armed as f's was. Runs on the tracer thread.
func (p *Process) openTimerfd(f *image.FD, nonblock uintptr, scratch uint64) (uintptr, error) {
	t := f.Timer
	fd, err := p.call(unix.SYS_TIMERFD_CREATE, uintptr(t.Clock), nonblock|unix.TFD_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("fd %d: timerfd_create clock %d: %w", f.Fd, t.Clock, err)
	}
	ticks, value := timerfdNow(t, time.Now().UnixNano())
	if value > 0 { // armed (a one-shot timer that fell meanwhile is not)
		flags := uintptr(0)
		if t.SetFlags&unix.TFD_TIMER_ABSTIME != 0 {
			// Absolute on the clock it was set on (a CANCEL_ON_SET timer
			// must be): now on that clock plus the time left.
			var ts unix.Timespec
			if err := unix.ClockGettime(baseClock(t.Clock), &ts); err != nil {
				return 0, fmt.Errorf("fd %d: clock %d: %w", f.Fd, t.Clock, err)
			}
			value += ts.Nano()
			flags = uintptr(t.SetFlags & (unix.TFD_TIMER_ABSTIME | unix.TFD_TIMER_CANCEL_ON_SET))
		}
		b := make([]byte, 32)
		binary.LittleEndian.PutUint64(b[0:], uint64(t.IntervalNs/1e9))
		binary.LittleEndian.PutUint64(b[8:], uint64(t.IntervalNs%1e9))
		binary.LittleEndian.PutUint64(b[16:], uint64(value/1e9))
		binary.LittleEndian.PutUint64(b[24:], uint64(value%1e9))
		if err := p.mem.Write(scratch, b); err != nil {
			return 0, err
		}
		if _, err := p.call(unix.SYS_TIMERFD_SETTIME, fd, flags, uintptr(scratch), 0); err != nil {
			return 0, fmt.Errorf("fd %d: timerfd_settime: %w", f.Fd, err)
		}
	}
	if ticks > 0 {
		// After settime, which zeroes the count.
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, ticks)
		if err := p.mem.Write(scratch, b); err != nil {
			return 0, err
		}
		if _, err := p.call(unix.SYS_IOCTL, fd, tfdIocSetTicks, uintptr(scratch)); err != nil {
			return 0, fmt.Errorf("fd %d: timerfd ticks %d: %w", f.Fd, ticks, err)
		}
	}
	return fd, nil
}

// openInotify makes an inotify instance with f's watches, each added by
// its path with its mask under its saved descriptor: descriptors are
// handed out in increasing order, so a watch is added and removed again
// until the next one is the saved one (as CRIU does). The events queued
// meanwhile (IN_IGNORED of those removed) are read away; events that were
// queued when the process was frozen are not carried. Runs on the tracer
// thread.
func (p *Process) openInotify(f *image.FD, nonblock uintptr, scratch uint64) (uintptr, error) {
	fd, err := p.call(unix.SYS_INOTIFY_INIT1, unix.IN_NONBLOCK|unix.IN_CLOEXEC)
	if err != nil {
		return 0, fmt.Errorf("fd %d: inotify_init1: %w", f.Fd, err)
	}
	for _, w := range f.Watches {
		name := w.Path
		if w.Object != 0 {
			// A deleted file: its copy, through pthaw's fd of it.
			if name = p.objectPath(w.Object); name == "" {
				return 0, fmt.Errorf("%w: fd %d: inotify watch %d: file object %#x not in the snapshot", image.ErrCorrupt, f.Fd, w.Wd, w.Object)
			}
		}
		path, err := p.putString(name)
		if err != nil {
			return 0, err
		}
		for {
			wd, err := p.call(unix.SYS_INOTIFY_ADD_WATCH, fd, path, uintptr(w.Mask))
			if err != nil {
				return 0, fmt.Errorf("fd %d: inotify watch %d of %s (mask %#x): %w", f.Fd, w.Wd, w.Path, w.Mask, err)
			}
			if int(int32(wd)) == w.Wd {
				break
			}
			if int(int32(wd)) > w.Wd {
				return 0, fmt.Errorf("fd %d: inotify watch %d of %s: got descriptor %d (the same inode watched twice?)", f.Fd, w.Wd, w.Path, wd)
			}
			if _, err := p.call(unix.SYS_INOTIFY_RM_WATCH, fd, wd); err != nil {
				return 0, fmt.Errorf("fd %d: inotify: remove watch %d: %w", f.Fd, wd, err)
			}
		}
	}
	for {
		if _, err := p.call(unix.SYS_READ, fd, uintptr(scratch), pageSize); err != nil {
			if errors.Is(err, unix.EAGAIN) {
				break
			}
			return 0, fmt.Errorf("fd %d: inotify: read queued events: %w", f.Fd, err)
		}
	}
	if nonblock == 0 {
		if _, err := p.call(unix.SYS_FCNTL, fd, unix.F_SETFL, 0); err != nil {
			return 0, fmt.Errorf("fd %d: inotify flags: %w", f.Fd, err)
		}
	}
	return fd, nil
}

// baseClock is the clock an _ALARM clock counts on.
func baseClock(c int) int32 {
	switch c {
	case unix.CLOCK_REALTIME_ALARM:
		return unix.CLOCK_REALTIME
	case unix.CLOCK_BOOTTIME_ALARM:
		return unix.CLOCK_BOOTTIME
	}
	return int32(c)
}

// openFanotify makes a fanotify group with f's flags and marks: an inode
// mark on the inode's path, a mount or filesystem mark on a path of it;
// the ignore mask as its own mark, as fanotify_mark takes it. Events
// queued when frozen are not carried. Runs on the tracer thread.
func (p *Process) openFanotify(f *image.FD, nonblock uintptr) (uintptr, error) {
	fa := f.Fanotify
	flags := uintptr(fa.Flags&^(unix.FAN_CLOEXEC|unix.FAN_NONBLOCK)) | unix.FAN_CLOEXEC
	if nonblock != 0 {
		flags |= unix.FAN_NONBLOCK
	}
	fd, err := p.call(unix.SYS_FANOTIFY_INIT, flags, uintptr(fa.EventFlags))
	if err != nil {
		return 0, fmt.Errorf("fd %d: fanotify_init flags %#x: %w", f.Fd, fa.Flags, err)
	}
	for _, m := range fa.Marks {
		path, err := p.putString(m.Path)
		if err != nil {
			return 0, err
		}
		kind := uintptr([]int{0, unix.FAN_MARK_MOUNT, unix.FAN_MARK_FILESYSTEM}[m.Kind])
		keep := uintptr(m.Flags & unix.FAN_MARK_EVICTABLE)
		add := func(extra uintptr, mask uint64) error {
			_, err := p.call(unix.SYS_FANOTIFY_MARK, fd, unix.FAN_MARK_ADD|kind|keep|extra, uintptr(mask), atFdcwd, path)
			if err != nil {
				return fmt.Errorf("fd %d: fanotify mark of %s (mask %#x): %w", f.Fd, m.Path, mask, err)
			}
			return nil
		}
		if m.Mask != 0 {
			if err := add(0, m.Mask); err != nil {
				return 0, err
			}
		}
		if m.Ignored != 0 {
			ignore := uintptr(unix.FAN_MARK_IGNORED_MASK)
			if m.Flags&unix.FAN_MARK_IGNORE != 0 {
				ignore = unix.FAN_MARK_IGNORE
			}
			if err := add(ignore|uintptr(m.Flags&unix.FAN_MARK_IGNORED_SURV_MODIFY), m.Ignored); err != nil {
				return 0, err
			}
		}
	}
	return fd, nil
}

// atFdcwd is AT_FDCWD as a system call argument.
var atFdcwd = func() uintptr { v := int64(unix.AT_FDCWD); return uintptr(v) }()
