package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// checkPrivateDir refuses a data directory that anyone but this process's
// user (and root) could change, before anything is written there: the
// raft log and snapshots decide what runs here and as whom, and the agent
// (as root) creates and appends workload logs under it by name. A
// directory that is 0700 but owned by another user, or that sits in a
// directory another user may rename entries of, lets that user plant a
// raft log of their own or swap workloads/ID for a directory holding a
// symlink stdout.log -> /etc/..., which root then writes to.
//
// The rule, as sshd's StrictModes: every component of the path, and of
// every symlink target on the way, is owned by root or our effective uid;
// every directory on the way is writable by nobody else unless it is
// sticky (as /tmp is: others may not rename what they do not own); and
// the data directory itself is a directory of ours with no access for
// group or others.
func checkPrivateDir(path string) error {
	euid := os.Geteuid()
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	// Walk the components as the kernel resolves them, following each
	// symlink by hand so that its own inode and every directory of its
	// target are checked too.
	todo := strings.Split(strings.TrimPrefix(abs, "/"), "/")
	cur := "/"
	if err := checkDirEntry(cur, euid, true); err != nil {
		return err
	}
	for links := 0; len(todo) > 0; {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = filepath.Dir(cur)
			continue
		}
		next := filepath.Join(cur, c)
		fi, err := os.Lstat(next)
		if err != nil {
			return err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			if err := checkOwner(next, fi, euid); err != nil {
				return err
			}
			if links++; links > 40 {
				return fmt.Errorf("%s: %w", abs, syscall.ELOOP)
			}
			target, err := os.Readlink(next)
			if err != nil {
				return err
			}
			if filepath.IsAbs(target) {
				cur = "/"
			}
			todo = append(strings.Split(target, "/"), todo...)
			continue
		}
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", next)
		}
		if err := checkDirEntry(next, euid, len(todo) > 0); err != nil {
			return err
		}
		cur = next
	}
	fi, err := os.Stat(cur)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", cur)
	}
	if int(st.Uid) != euid {
		return fmt.Errorf("owned by uid %d, not by pclusterd's uid %d: that user could plant a raft log or redirect workload logs; use a directory of pclusterd's own",
			st.Uid, euid)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("mode %04o lets other users read the raft state and workload logs; chmod 700 it", fi.Mode().Perm())
	}
	return nil
}

// checkDirEntry checks a directory on the way to the data directory:
// owned by root or euid, and (when it is an ancestor) not writable by
// others unless sticky.
func checkDirEntry(path string, euid int, ancestor bool) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if err := checkOwner(path, fi, euid); err != nil {
		return err
	}
	if ancestor && fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0 {
		return fmt.Errorf("%s: mode %04o lets other users rename what it holds; the data directory must not be inside it",
			path, fi.Mode().Perm())
	}
	return nil
}

func checkOwner(path string, fi os.FileInfo, euid int) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", path)
	}
	if st.Uid != 0 && int(st.Uid) != euid {
		return fmt.Errorf("%s is owned by uid %d, neither root nor pclusterd's uid %d: that user could replace the data directory",
			path, st.Uid, euid)
	}
	return nil
}
