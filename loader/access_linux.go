package loader

import (
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// forUser returns the real uid and gid pthaw acts for, and whether that is
// an ordinary user: a real uid other than root, whatever capabilities its
// file (setcap) or set-id bit gave it. Such a user may restore only a
// process with their own credentials, and the process must get nothing
// of what the binary was given: the capabilities only let pthaw build it
// (clone3 with set_tid, PR_SET_MM_MAP's executable link).
func forUser() (uid, gid int, ok bool) {
	uid = os.Getuid()
	return uid, os.Getgid(), uid != 0
}

// checkCreds refuses, before anything of the process is built, a saved
// process whose credentials are not the ordinary user's pthaw acts for
// (forUser): every uid (real, effective, saved, fs) must be the user's
// real uid, every gid the real gid, the supplementary groups among the
// user's, no capability in any set (the user's own, without the file
// capabilities, are taken to be none), and securebits and no_new_privs
// at least as strict as pthaw's own. Root restores any snapshot as its
// saved user.
func checkCreds(pr *image.Process) error {
	uid, gid, ok := forUser()
	if !ok {
		return nil
	}
	c := &pr.Creds
	who := fmt.Sprintf("process %d", pr.Pid)
	for _, u := range c.Uid {
		if int(u) != uid {
			return fmt.Errorf("%s was uid %s (real, effective, saved, fs): pthaw run by uid %d restores only processes wholly that user's",
				who, joinIDs(c.Uid[:]), uid)
		}
	}
	for _, g := range c.Gid {
		if int(g) != gid {
			return fmt.Errorf("%s was gid %s (real, effective, saved, fs): pthaw run by uid %d (gid %d) restores only processes wholly that user's",
				who, joinIDs(c.Gid[:]), uid, gid)
		}
	}
	mine, err := unix.Getgroups()
	if err != nil {
		return fmt.Errorf("%s: our supplementary groups: %w", who, err)
	}
	for _, g := range c.Groups {
		if !slices.Contains(mine, int(g)) {
			return fmt.Errorf("%s was in group %d, which uid %d running pthaw is not in", who, g, uid)
		}
	}
	for _, s := range []struct {
		name string
		set  uint64
	}{{"effective", c.CapEff}, {"permitted", c.CapPrm}, {"inheritable", c.CapInh}, {"ambient", c.CapAmb}} {
		if s.set != 0 {
			return fmt.Errorf("%s held %s capabilities %#x: pthaw run by uid %d restores only processes without any", who, s.name, s.set, uid)
		}
	}
	bits, err := unix.PrctlRetInt(unix.PR_GET_SECUREBITS, 0, 0, 0, 0)
	if err != nil {
		return fmt.Errorf("%s: our securebits: %w", who, err)
	}
	if uint32(bits)&^c.Securebits != 0 {
		return fmt.Errorf("%s had securebits %#x, without %#x that uid %d running pthaw has", who, c.Securebits, uint32(bits)&^c.Securebits, uid)
	}
	nnp, err := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
	if err != nil {
		return fmt.Errorf("%s: our no_new_privs: %w", who, err)
	}
	if nnp != 0 && !c.NoNewPrivs {
		return fmt.Errorf("%s did not have no_new_privs, which uid %d running pthaw has", who, uid)
	}
	return nil
}

func joinIDs(ids []uint32) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	return strings.Join(s, "/")
}

// dropStubCaps takes from a stub that stays behind (a PID namespace's
// init, a stand-in) the capabilities it got from an ordinary user's
// pthaw to build the process: all its sets are emptied, as the kernel
// empties them when an ordinary user executes a program without file
// capabilities. Root's stubs keep theirs. Runs on the tracer thread,
// with the stub stopped at in.
func dropStubCaps(in *ptrace.Injector, base uint64) error {
	if _, _, ok := forUser(); !ok {
		return nil
	}
	// capset: header {version 3, pid 0}, then two zeroed data structs.
	b := make([]byte, 8+24)
	binary.LittleEndian.PutUint32(b[0:], unix.LINUX_CAPABILITY_VERSION_3)
	scratch := base + stubScratchOff
	mem := ptrace.NewMem(in.Tid)
	defer mem.Close()
	if err := mem.Write(scratch, b); err != nil {
		return fmt.Errorf("drop capabilities: %w", err)
	}
	if _, err := in.Syscall(unix.SYS_CAPSET, uintptr(scratch), uintptr(scratch+8)); err != nil {
		return fmt.Errorf("drop capabilities: %w", err)
	}
	if _, err := in.Syscall(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	return nil
}

// aboveUser reports whether pthaw acts for an ordinary user (forUser) and
// want's hard limit of resource res is above the user's own, which the
// stub pid inherited from us: such a limit is not raised even when
// pthaw's file was given CAP_SYS_RESOURCE, since it would be a privilege
// the user does not hold.
func aboveUser(pid, res int, want unix.Rlimit) bool {
	if _, _, ok := forUser(); !ok {
		return false
	}
	var cur unix.Rlimit
	if err := unix.Prlimit(pid, res, nil, &cur); err != nil {
		return true
	}
	return want.Max > cur.Max
}
