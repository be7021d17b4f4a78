package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/seccompbpf"
)

// Virtual PIDs (pthaw -virtpid): when the saved PID is taken, the process
// runs under a new one, and a seccomp filter hands getpid, gettid, kill,
// tkill and tgkill to pthaw (SECCOMP_RET_USER_NOTIF), which answers with
// the saved ids and translates them in signals the process sends itself.
// Every other call, and signals to anyone else, go on untouched.

// filterRule sends the calls to action.
type filterRule = seccompbpf.Rule

// virtFilter returns the classic BPF program of rules.
var virtFilter = seccompbpf.Program

// listenerFlags make a filter's listener, and make a call pthaw has
// received uninterruptible but by a fatal signal (WAIT_KILLABLE_RECV):
// pthaw answers kill(getpid(), sig) by sending sig, which would otherwise
// interrupt the very call it answers (EINTR; a restart with SA_RESTART
// would send it twice). Pending until the call returns, the signal is
// delivered then, as the kernel's own kill to self does.
const listenerFlags = unix.SECCOMP_FILTER_FLAG_NEW_LISTENER | unix.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV

// installVirtPID loads the filter into the main thread (threads made
// after inherit it) and takes its listener. Runs on the tracer thread.
func (p *Process) installVirtPID(scratch uintptr) error {
	fd, err := p.loadFilter(scratch, seccompbpf.VirtPID(), listenerFlags)
	if err != nil {
		return fmt.Errorf("virtual pid: install seccomp filter: %w", err)
	}
	return p.takeListener(fd)
}

// takeListener moves the listener fd of the filter just loaded from the
// process to us (p.listener). Runs on the tracer thread.
func (p *Process) takeListener(fd uintptr) error {
	pidfd, err := unix.PidfdOpen(p.pid, 0)
	if err != nil {
		return fmt.Errorf("virtual pid: pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	mine, err := unix.PidfdGetfd(pidfd, int(fd), 0)
	if err != nil {
		return fmt.Errorf("virtual pid: take listener: %w", err)
	}
	p.listener = os.NewFile(uintptr(mine), "seccomp-listener")
	if _, err := p.call(unix.SYS_CLOSE, fd); err != nil {
		return fmt.Errorf("virtual pid: close listener in the process: %w", err)
	}
	return nil
}

// loadFilter makes the process load the BPF program prog, passed
// through scratch, with seccomp(SECCOMP_SET_MODE_FILTER, flags). Runs on
// the tracer thread.
func (p *Process) loadFilter(scratch uintptr, prog []byte, flags uintptr) (uintptr, error) {
	fprog := make([]byte, 16) // struct sock_fprog: u16 len, pad, u64 filter
	binary.LittleEndian.PutUint16(fprog, uint16(len(prog)/8))
	binary.LittleEndian.PutUint64(fprog[8:], uint64(scratch)+16)
	if err := p.mem.Write(uint64(scratch), append(fprog, prog...)); err != nil {
		return 0, err
	}
	r, err := p.call(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, scratch)
	if errors.Is(err, unix.EACCES) {
		// The process keeps its saved no_new_privs: it is not set to
		// make the filter loadable.
		err = fmt.Errorf("%w (without no_new_privs, which the process did not have, loading a filter needs CAP_SYS_ADMIN)", err)
	}
	return r, err
}

// seccompNotif and seccompResp are struct seccomp_notif and
// struct seccomp_notif_resp.
type seccompNotif struct {
	ID    uint64
	Pid   uint32
	Flags uint32
	Nr    int32
	Arch  uint32
	IP    uint64
	Args  [6]uint64
}

type seccompResp struct {
	ID    uint64
	Val   int64
	Error int32
	Flags uint32
}

// Supervise answers the trapped calls until the process has gone (the
// listener reports hang-up) or stop is closed. It does nothing unless the
// process was restored with virtual PIDs.
func (p *Process) Supervise(stop <-chan struct{}) {
	if p.tree != nil {
		p.superviseTree(stop)
		return
	}
	if p.listener == nil {
		return
	}
	defer p.listener.Close()
	fd := int(p.listener.Fd())
	real, saved := p.pid, p.proc.Pid
	tids := map[int]int{} // saved → ours
	for ours, s := range p.virtTids {
		tids[s] = ours
	}
	var once sync.Once
	for {
		select {
		case <-stop:
			return
		default:
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(pfd, 200); err != nil || n == 0 {
			continue
		}
		if pfd[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0 && pfd[0].Revents&unix.POLLIN == 0 {
			return
		}
		n, err := notifRecv(fd)
		if err != nil {
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINTR) {
				continue // the caller was killed meanwhile
			}
			once.Do(func() { p.notice("virtual pid: %v", err) })
			return
		}
		resp := seccompResp{ID: n.ID}
		self := func(pid int) bool { return pid == saved || pid == real }
		tid := func(t int) int {
			if ours, ok := tids[t]; ok {
				return ours
			}
			return t
		}
		err = nil
		switch n.Nr {
		case unix.SYS_GETPID:
			// A child it forked shares the filter, and has its own PID.
			if _, ok := p.virtTids[int(n.Pid)]; ok || readTgid(int(n.Pid)) == real {
				resp.Val = int64(saved)
			} else {
				resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
			}
		case unix.SYS_GETTID:
			resp.Val = int64(int(n.Pid))
			if s, ok := p.virtTids[int(n.Pid)]; ok {
				resp.Val = int64(s)
			}
		case unix.SYS_KILL:
			if pid := int(int32(n.Args[0])); self(pid) {
				err = unix.Kill(real, unix.Signal(n.Args[1]))
			} else {
				resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
			}
		case unix.SYS_TGKILL:
			if tgid := int(int32(n.Args[0])); self(tgid) {
				err = unix.Tgkill(real, tid(int(int32(n.Args[1]))), unix.Signal(n.Args[2]))
			} else {
				resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
			}
		case unix.SYS_TKILL:
			if t := int(int32(n.Args[0])); t == saved || tids[t] != 0 {
				err = unix.Tgkill(real, tid(t), unix.Signal(n.Args[1]))
			} else {
				resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
			}
		default:
			resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
		}
		if errno, ok := err.(unix.Errno); ok {
			resp.Error = -int32(errno)
		}
		notifSend(fd, &resp)
	}
}
