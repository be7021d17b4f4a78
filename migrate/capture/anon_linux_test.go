package capture

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// TestPeriodicTimerfdExpiredUnread: a periodic timerfd that expired and
// was not read since is re-armed by the kernel only when read, so its
// fdinfo alone says one tick and no time left (as a disarmed one would).
// The description counts every interval that passed and the time to the
// next expiry, so the copy ticks on (pthaw would otherwise restore it
// disarmed).
func TestPeriodicTimerfdExpiredUnread(t *testing.T) {
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	it := unix.ItimerSpec{Interval: unix.NsecToTimespec(int64(50 * time.Millisecond)), Value: unix.NsecToTimespec(int64(50 * time.Millisecond))}
	if err := unix.TimerfdSettime(fd, 0, &it, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	var rec image.FD
	fi := procfs.FDInfo{Fd: fd, Link: "anon_inode:[timerfd]"}
	if err := describeAnon(os.Getpid(), &rec, image.FDTimerfd, fi); err != nil {
		t.Fatal(err)
	}
	tm := rec.Timer
	if tm.Ticks < 5 || tm.ValueNs <= 0 || tm.ValueNs > int64(50*time.Millisecond) || tm.IntervalNs != int64(50*time.Millisecond) {
		t.Fatalf("timer after 300 ms of 50 ms intervals, unread: ticks %d, next in %d ns, interval %d ns; want ≥ 5 ticks, next within the interval",
			tm.Ticks, tm.ValueNs, tm.IntervalNs)
	}
}
