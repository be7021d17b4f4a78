package node

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// waitExited blocks until pid, a child of this process, has exited,
// without waiting for it. A wait (wait4, waitid, os/exec's Wait) would
// also report, and consume, the ptrace stops of a child that this same
// process traces — the agent freezing its own workload for a migration —
// even asked only for exits; a pidfd becomes readable when the process
// exits and never for a stop. Without pidfds it returns at once and the
// caller's wait takes its chances.
func waitExited(pid int) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	// The runtime poller waits for readability; Read calls the func again
	// on each wake-up until it returns true.
	rc.Read(func(uintptr) bool {
		var fds = []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, _ := unix.Poll(fds, 0)
		return n > 0
	})
}

// waitChild waits for pid, a child of ours that is not an exec.Cmd (a
// restored workload), once it has exited: its status, reaped by wait4(pid)
// — never wait4(-1), which would reap other workloads.
func waitChild(pid int) (syscall.WaitStatus, error) {
	waitExited(pid)
	var ws syscall.WaitStatus
	for {
		_, err := syscall.Wait4(pid, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("wait for pid %d: %w", pid, err)
		}
		return ws, nil
	}
}

// KeepFDsFromWorkloads marks every descriptor above 2 this process holds
// close-on-exec. The daemon calls it first: os/exec passes on every
// descriptor that lacks O_CLOEXEC (one pclusterd inherited from whoever
// started it), and a workload holding such a pipe or socket could be
// neither supervised cleanly nor migrated (the engine moves fds 0-2 only
// as inherited streams).
func KeepFDsFromWorkloads() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
}
