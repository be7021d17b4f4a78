package capture

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
)

// forUser returns the real uid and gid pfreeze acts for, and whether that
// is an ordinary user: a real uid other than root, whatever capabilities
// its file (setcap) or set-id bit gave it. Such a caller may touch only
// the processes that user could trace without any capability; what the
// binary was given only lets it read what tracing alone does not
// (/proc/PID/map_files needs CAP_CHECKPOINT_RESTORE).
func forUser() (uid, gid int, ok bool) {
	uid = os.Getuid()
	return uid, os.Getgid(), uid != 0
}

// mayTrace refuses thread tid of process pid unless the ordinary user
// pfreeze acts for (forUser) may trace it by the kernel's own rule for a
// caller without CAP_SYS_PTRACE (kernel/ptrace.c __ptrace_may_access with
// PTRACE_MODE_ATTACH_REALCREDS, and commoncap's cap_ptrace_access_check):
// its real, effective, saved (and fs) uids are all the user's real uid,
// its gids all the user's real gid, it is dumpable, and it holds no
// capability in its permitted set (the user's own, without the file
// capabilities, are taken to be none). Root (a real uid of 0) may trace
// anything and is not checked. It must be called before the thread is
// seized, so that nothing the user may not trace is even interrupted, and
// again once it is stopped, when its credentials can no longer change (an
// exec of a set-id program in between).
func mayTrace(pid, tid int) error {
	uid, gid, ok := forUser()
	if !ok {
		return nil
	}
	who := fmt.Sprintf("pid %d", pid)
	if tid != pid {
		who = fmt.Sprintf("thread %d of pid %d", tid, pid)
	}
	st, err := procfs.ThreadStatus(pid, tid)
	if err != nil {
		return fmt.Errorf("%s: credentials: %w", who, err)
	}
	if !allIDs(st["Uid"], uid) {
		return fmt.Errorf("%s runs as uid %s (real, effective, saved, fs): pfreeze run by uid %d freezes only processes wholly that user's",
			who, strings.Join(strings.Fields(st["Uid"]), "/"), uid)
	}
	if !allIDs(st["Gid"], gid) {
		return fmt.Errorf("%s runs as gid %s (real, effective, saved, fs): pfreeze run by uid %d (gid %d) freezes only processes wholly that user's",
			who, strings.Join(strings.Fields(st["Gid"]), "/"), uid, gid)
	}
	if prm := procfs.Hex(st["CapPrm"]); prm != 0 || st["CapPrm"] == "" {
		return fmt.Errorf("%s holds capabilities %#x: pfreeze run by uid %d freezes only processes without any", who, prm, uid)
	}
	// A process that is not dumpable (it ran a set-id or file-capability
	// program, or said PR_SET_DUMPABLE 0) has its /proc files owned by
	// root rather than by its effective uid (fs/proc/base.c
	// task_dump_owner): that is how another process can tell.
	var fi syscall.Stat_t
	path := procfs.Path(pid, fmt.Sprintf("task/%d/stat", tid))
	if err := syscall.Stat(path, &fi); err != nil {
		return fmt.Errorf("%s: %s: %w", who, path, err)
	}
	if int(fi.Uid) != uid {
		return fmt.Errorf("%s is not dumpable (it ran a set-id or file-capability program, or said PR_SET_DUMPABLE 0): pfreeze run by uid %d may not trace it", who, uid)
	}
	return nil
}

// allIDs reports whether the four ids of a /proc status Uid or Gid line
// (real, effective, saved, fs) are all id.
func allIDs(line string, id int) bool {
	f := strings.Fields(line)
	if len(f) != 4 {
		return false
	}
	want := fmt.Sprint(id)
	for _, s := range f {
		if s != want {
			return false
		}
	}
	return true
}

// mayTraceStopped checks again, once every thread is stopped, that the
// user may trace each of them (mayTrace).
func (f *Frozen) mayTraceStopped() error {
	for _, t := range f.threads {
		if err := mayTrace(f.Pid, t.tid); err != nil {
			return err
		}
	}
	return nil
}

// explainMapFilesErr says what following a /proc/PID/map_files link
// needs when the kernel refused it (fs/proc/base.c
// proc_map_files_get_link: CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, even
// for one's own process).
func explainMapFilesErr(err error) error {
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%w (reading /proc/PID/map_files needs CAP_CHECKPOINT_RESTORE)", err)
	}
	return err
}
