package loader

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/procfs"
)

// setCreds gives the process its saved credentials. Only what differs from
// the stub's (ours) is changed, so that restoring one's own process needs
// no privilege beyond ptrace. Order matters: the bounding set and groups
// need CAP_SETPCAP/CAP_SETGID, so they go first; keep-caps carries the
// permitted set across setresuid so capset can then set the saved sets.
// Runs on the tracer thread.
func (p *Process) setCreds(tk *task, scratch uintptr) error {
	c := p.credsOf(tk)
	st, err := procfs.ThreadStatus(p.pid, tk.in.Tid)
	if err != nil {
		return err
	}
	bnd := procfs.Hex(st["CapBnd"])
	for capn := 0; capn < 64; capn++ {
		bit := uint64(1) << capn
		if bnd&bit != 0 && c.CapBnd&bit == 0 {
			if _, err := tk.call(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(capn)); err != nil {
				return fmt.Errorf("drop capability %d from the bounding set: %w", capn, err)
			}
		}
	}
	if len(c.Groups) > maxGroups {
		return fmt.Errorf("%d supplementary groups, more than NGROUPS_MAX", len(c.Groups))
	}
	if !sameGroups(st["Groups"], c.Groups) {
		b := make([]byte, 4*len(c.Groups))
		for i, g := range c.Groups {
			binary.LittleEndian.PutUint32(b[4*i:], g)
		}
		if len(b) > 0 {
			if err := p.mem.Write(uint64(scratch), b); err != nil {
				return err
			}
		}
		if _, err := tk.call(unix.SYS_SETGROUPS, uintptr(len(c.Groups)), scratch); err != nil {
			return fmt.Errorf("setgroups %v: %w", c.Groups, err)
		}
	}
	if st["Gid"] != fmt.Sprintf("%d\t%d\t%d\t%d", c.Gid[0], c.Gid[1], c.Gid[2], c.Gid[3]) {
		if _, err := tk.call(unix.SYS_SETRESGID, uintptr(c.Gid[0]), uintptr(c.Gid[1]), uintptr(c.Gid[2])); err != nil {
			return fmt.Errorf("setresgid %v: %w", c.Gid[:3], err)
		}
		if _, err := tk.call(unix.SYS_SETFSGID, uintptr(c.Gid[3])); err != nil {
			return fmt.Errorf("setfsgid %d: %w", c.Gid[3], err)
		}
	}
	const keepCaps, keepCapsLocked = 1 << 4, 1 << 5
	if st["Uid"] != fmt.Sprintf("%d\t%d\t%d\t%d", c.Uid[0], c.Uid[1], c.Uid[2], c.Uid[3]) {
		if _, err := tk.call(unix.SYS_PRCTL, unix.PR_SET_SECUREBITS, uintptr(c.Securebits&^keepCapsLocked|keepCaps)); err != nil {
			return fmt.Errorf("securebits: %w", err)
		}
		if _, err := tk.call(unix.SYS_SETRESUID, uintptr(c.Uid[0]), uintptr(c.Uid[1]), uintptr(c.Uid[2])); err != nil {
			return fmt.Errorf("setresuid %v: %w", c.Uid[:3], err)
		}
		if _, err := tk.call(unix.SYS_SETFSUID, uintptr(c.Uid[3])); err != nil {
			return fmt.Errorf("setfsuid %d: %w", c.Uid[3], err)
		}
	} else if c.Securebits != 0 {
		if _, err := tk.call(unix.SYS_PRCTL, unix.PR_SET_SECUREBITS, uintptr(c.Securebits)); err != nil {
			return fmt.Errorf("securebits %#x: %w", c.Securebits, err)
		}
	}
	// capset: header {version 3, pid 0}, then two data structs (low and
	// high 32 bits) of {effective, permitted, inheritable}.
	b := make([]byte, 8+24)
	binary.LittleEndian.PutUint32(b[0:], unix.LINUX_CAPABILITY_VERSION_3)
	for i, sh := range []uint{0, 32} {
		d := b[8+12*i:]
		binary.LittleEndian.PutUint32(d[0:], uint32(c.CapEff>>sh))
		binary.LittleEndian.PutUint32(d[4:], uint32(c.CapPrm>>sh))
		binary.LittleEndian.PutUint32(d[8:], uint32(c.CapInh>>sh))
	}
	if err := p.mem.Write(uint64(scratch), b); err != nil {
		return err
	}
	if _, err := tk.call(unix.SYS_CAPSET, scratch, scratch+8); err != nil {
		return fmt.Errorf("capset eff %#x prm %#x inh %#x: %w", c.CapEff, c.CapPrm, c.CapInh, err)
	}
	if _, err := tk.call(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	for capn := 0; capn < 64; capn++ {
		if c.CapAmb&(1<<capn) != 0 {
			if _, err := tk.call(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(capn), 0, 0); err != nil {
				return fmt.Errorf("raise ambient capability %d: %w", capn, err)
			}
		}
	}
	if c.Securebits&keepCaps == 0 {
		if _, err := tk.call(unix.SYS_PRCTL, unix.PR_SET_KEEPCAPS, 0); err != nil {
			return fmt.Errorf("keepcaps: %w", err)
		}
	}
	return nil
}

func sameGroups(status string, groups []uint32) bool {
	have := strings.Fields(status)
	if len(have) != len(groups) {
		return false
	}
	for i, g := range groups {
		if have[i] != strconv.FormatUint(uint64(g), 10) {
			return false
		}
	}
	return true
}
