package stream

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"

	"golang.org/x/sys/unix"
)

// A snapshot file is written unnamed in its directory and then linked or
// renamed over its name (fileSink.name). A symlink given as the
// destination must not be what is replaced: it is followed as open(2)
// follows it, so that `-dest link` writes the file it points to, and
// `-dest /dev/stdout` (a symlink to /proc/self/fd/1) writes stdout rather
// than putting a regular file in place of /dev/stdout.

// ownFDLink matches a name of one of our own fds.
var ownFDLink = regexp.MustCompile(`^/(?:dev|proc/(?:self|thread-self|([0-9]+)))/fd/([0-9]+)$`)

func ownFD(path string) (int, bool) {
	m := ownFDLink.FindStringSubmatch(filepath.Clean(path))
	if m == nil || (m[1] != "" && m[1] != strconv.Itoa(os.Getpid())) {
		return 0, false
	}
	fd, err := strconv.Atoi(m[2])
	return fd, err == nil
}

// dest is where a sink named path writes: a path whose last component is
// not a symlink (a regular file is renamed over it), or one of our fds.
type dest struct {
	path string
	fd   int // ≥ 0: write this fd, as stdout
}

// destination resolves path's last component while it is a symlink. A
// link to one of our fds (/dev/stdout, /dev/fd/N, /proc/self/fd/N) gives
// that fd. Otherwise the kernel follows the links (O_PATH) and the file
// found is named by its path (which must lead back to it); a link to
// nothing is refused rather than replaced. As fs.protected_symlinks does
// (even where it is off), a symlink in a sticky world-writable directory
// is followed only if it is the caller's or the directory owner's: a
// symlink another user planted in /tmp is refused.
func destination(path string) (dest, error) {
	p := path
	for hops := 0; ; hops++ {
		if fd, ok := ownFD(p); ok {
			return dest{path: path, fd: fd}, nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFLNK {
			if hops == 0 {
				return dest{path: path, fd: -1}, nil
			}
			break
		}
		if hops == 40 {
			return dest{}, &os.PathError{Op: "open", Path: path, Err: unix.ELOOP}
		}
		if err := followable(p, &st); err != nil {
			return dest{}, err
		}
		l, err := os.Readlink(p)
		if err != nil {
			return dest{}, err
		}
		if !filepath.IsAbs(l) {
			l = filepath.Join(filepath.Dir(p), l)
		}
		p = l
	}
	o, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		if err == unix.ENOENT {
			return dest{}, fmt.Errorf("%s is a symlink to %s, which does not exist", path, p)
		}
		return dest{}, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(o)
	var st unix.Stat_t
	if err := unix.Fstat(o, &st); err != nil {
		return dest{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return dest{path: path, fd: -1}, nil // a FIFO or device: opened through the link
	}
	real, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", o))
	var rst unix.Stat_t
	if err != nil || !filepath.IsAbs(real) || unix.Lstat(real, &rst) != nil || rst.Dev != st.Dev || rst.Ino != st.Ino {
		return dest{}, fmt.Errorf("%s is a symlink to a file that has no name to write it under", path)
	}
	return dest{path: real, fd: -1}, nil
}

// followable applies fs.protected_symlinks' rule to the symlink p, whose
// lstat is st.
func followable(p string, st *unix.Stat_t) error {
	var dst unix.Stat_t
	if err := unix.Stat(filepath.Dir(p), &dst); err != nil {
		return &os.PathError{Op: "stat", Path: filepath.Dir(p), Err: err}
	}
	sticky := dst.Mode&unix.S_ISVTX != 0 && dst.Mode&0o002 != 0
	if !sticky || st.Uid == uint32(os.Geteuid()) || st.Uid == dst.Uid {
		return nil
	}
	return fmt.Errorf("%s is a symlink of uid %d in the sticky directory %s: not followed (as fs.protected_symlinks)", p, st.Uid, filepath.Dir(p))
}
