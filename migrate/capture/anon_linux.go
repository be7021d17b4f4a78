package capture

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// Anonymous inodes carried besides eventfd and epoll: timerfd, signalfd
// and inotify, each described from its /proc/PID/fdinfo.

// anonKinds maps the /proc/PID/fd link of an anonymous inode to its kind.
var anonKinds = map[string]image.FDKind{
	"anon_inode:[timerfd]":  image.FDTimerfd,
	"anon_inode:[signalfd]": image.FDSignalfd,
	"anon_inode:inotify":    image.FDInotify,
	"anon_inode:[fanotify]": image.FDFanotify,
}

// describeAnon fills fd, of an anonymous inode of kind held by pid, from
// fi.
func describeAnon(pid int, fd *image.FD, kind image.FDKind, fi procfs.FDInfo) error {
	fd.Kind = kind
	switch kind {
	case image.FDTimerfd:
		lines, err := forwardedTimerfd(pid, fi.Fd)
		if err != nil {
			return fmt.Errorf("timerfd: %w", err)
		}
		t, err := parseTimerfd(lines)
		if err != nil {
			return err
		}
		fd.Timer = t
	case image.FDSignalfd:
		for _, line := range fi.Extra {
			if k, v, ok := strings.Cut(line, ":"); ok && k == "sigmask" {
				fd.SigMask = procfs.Hex(strings.TrimSpace(v))
				return nil
			}
		}
		return fmt.Errorf("signalfd: no sigmask in fdinfo")
	case image.FDFanotify:
		fa, err := parseFanotify(fi.Extra)
		if err != nil {
			return err
		}
		fd.Fanotify = fa
	case image.FDInotify:
		for _, line := range fi.Extra {
			if !strings.HasPrefix(line, "inotify ") {
				continue
			}
			w, err := parseWatch(line)
			if err != nil {
				return err
			}
			fd.Watches = append(fd.Watches, w)
		}
		// Watch descriptors are re-made in increasing order.
		for i := 1; i < len(fd.Watches); i++ {
			for j := i; j > 0 && fd.Watches[j].Wd < fd.Watches[j-1].Wd; j-- {
				fd.Watches[j], fd.Watches[j-1] = fd.Watches[j-1], fd.Watches[j]
			}
		}
	}
	return nil
}

// forwardedTimerfd returns the fdinfo lines of pid's timerfd fd once
// timerfd_gettime has brought it up to date. A periodic timer that
// expired is re-armed only when it is read (or asked for its time): until
// then its fdinfo says it_value (0, 0) with one tick, whatever the number
// of intervals that passed, exactly as a disarmed timer with an interval
// would. timerfd_gettime on a duplicate (the same open file) counts the
// intervals into its ticks and re-arms it, what the process's own read
// would find.
func forwardedTimerfd(pid, fd int) ([]string, error) {
	dup, err := dupFd(pid, fd)
	if err != nil {
		return nil, fmt.Errorf("fd %d: %w", fd, err)
	}
	defer unix.Close(dup)
	var cur unix.ItimerSpec
	if err := unix.TimerfdGettime(dup, &cur); err != nil {
		return nil, fmt.Errorf("timerfd_gettime fd %d: %w", fd, err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", dup))
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n"), nil
}

// parseTimerfd reads a timerfd's fdinfo lines:
//
//	clockid: 1
//	ticks: 0
//	settime flags: 00
//	it_value: (0, 49406829)
//	it_interval: (1, 0)
func parseTimerfd(lines []string) (*image.Timerfd, error) {
	t := &image.Timerfd{ReadAtUnixNs: time.Now().UnixNano()}
	seen := 0
	for _, line := range lines {
		k, v, _ := strings.Cut(line, ":")
		v = strings.TrimSpace(v)
		var err error
		switch k {
		case "clockid":
			t.Clock, err = strconv.Atoi(v)
		case "ticks":
			t.Ticks, err = strconv.ParseUint(v, 10, 64)
		case "settime flags":
			var f int64
			f, err = strconv.ParseInt(v, 8, 32)
			t.SetFlags = int(f)
		case "it_value", "it_interval":
			var sec, nsec int64
			if _, err = fmt.Sscanf(v, "(%d, %d)", &sec, &nsec); err == nil {
				if k == "it_value" {
					t.ValueNs = sec*1e9 + nsec
				} else {
					t.IntervalNs = sec*1e9 + nsec
				}
			}
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("timerfd: fdinfo line %q: %w", line, err)
		}
		seen++
	}
	if seen != 5 {
		return nil, fmt.Errorf("timerfd: fdinfo has %d of its 5 fields", seen)
	}
	return t, nil
}

// parseWatch reads one watch of an inotify fdinfo and finds the path of
// the inode it watches through its file handle:
//
//	inotify wd:1 ino:2 sdev:800001 mask:fce ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:0200000000000000
func parseWatch(line string) (image.InotifyWatch, error) {
	var w image.InotifyWatch
	kv := map[string]string{}
	for _, f := range strings.Fields(line)[1:] {
		k, v, _ := strings.Cut(f, ":")
		kv[k] = v
	}
	wd, err1 := strconv.Atoi(kv["wd"])
	mask, err2 := strconv.ParseUint(kv["mask"], 16, 32)
	sdev, err3 := strconv.ParseUint(kv["sdev"], 16, 64)
	typ, err4 := strconv.ParseInt(kv["fhandle-type"], 16, 32)
	handle, err5 := hex.DecodeString(kv["f_handle"])
	for _, err := range []error{err1, err2, err3, err4, err5} {
		if err != nil {
			return w, fmt.Errorf("inotify: fdinfo line %q: %w", line, err)
		}
	}
	w.Wd, w.Mask = wd, uint32(mask)
	path, err := handlePath(uint32(sdev>>20), uint32(sdev&0xfffff), int32(typ), handle)
	var gone *deletedError
	if errors.As(err, &gone) {
		// A deleted file: watched again on the copy of it, which an fd
		// or area of the process must hold (checked with the file
		// records). Its ID is the one fileObject gives it.
		ino, ierr := strconv.ParseUint(kv["ino"], 16, 64)
		if ierr != nil {
			return w, fmt.Errorf("inotify: fdinfo line %q: %w", line, ierr)
		}
		h := fnv.New64a()
		fmt.Fprintf(h, "%d:%d", unix.Mkdev(uint32(sdev>>20), uint32(sdev&0xfffff)), ino)
		w.Path, w.Object = strings.TrimSuffix(gone.path, " (deleted)"), h.Sum64()|1
		return w, nil
	}
	if err != nil {
		return w, unsupported("inotify watch %d (inode %s): %v", wd, kv["ino"], err)
	}
	w.Path = path
	return w, nil
}

// parseFanotify reads a fanotify group's fdinfo lines:
//
//	fanotify flags:3 event-flags:8000
//	fanotify ino:263 sdev:fe00000 mflags:40 mask:0 ignored_mask:2 fhandle-bytes:8 fhandle-type:1 f_handle:6302000000000000
//	fanotify mnt_id:1b mflags:0 mask:8 ignored_mask:0
//	fanotify sdev:fe00000 mflags:0 mask:8 ignored_mask:0
func parseFanotify(lines []string) (*image.Fanotify, error) {
	var fa *image.Fanotify
	for _, line := range lines {
		if !strings.HasPrefix(line, "fanotify ") {
			continue
		}
		kv := map[string]string{}
		for _, f := range strings.Fields(line)[1:] {
			k, v, _ := strings.Cut(f, ":")
			kv[k] = v
		}
		hex := func(k string) uint64 {
			n, err := strconv.ParseUint(kv[k], 16, 64)
			if err != nil && kv[k] != "" {
				return 1 << 63 // malformed: refused below
			}
			return n
		}
		if _, ok := kv["event-flags"]; ok {
			fa = &image.Fanotify{Flags: uint32(hex("flags")), EventFlags: uint32(hex("event-flags"))}
			continue
		}
		if fa == nil {
			return nil, fmt.Errorf("fanotify: mark before the group's flags: %q", line)
		}
		m := image.FanotifyMark{Flags: uint32(hex("mflags")), Mask: hex("mask"), Ignored: hex("ignored_mask")}
		if m.Mask|m.Ignored|uint64(m.Flags) >= 1<<63 {
			return nil, fmt.Errorf("fanotify: fdinfo line %q", line)
		}
		sdev := hex("sdev")
		var err error
		switch {
		case kv["ino"] != "":
			m.Kind = image.FanMarkInode
			typ, err1 := strconv.ParseInt(kv["fhandle-type"], 16, 32)
			handle, err2 := hexBytes(kv["f_handle"])
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("fanotify: fdinfo line %q", line)
			}
			if m.Path, err = handlePath(uint32(sdev>>20), uint32(sdev&0xfffff), int32(typ), handle); err != nil {
				return nil, unsupported("fanotify mark of inode %s: %v", kv["ino"], err)
			}
		case kv["mnt_id"] != "":
			m.Kind = image.FanMarkMount
			if m.Path, err = mountByID(hex("mnt_id")); err != nil {
				return nil, unsupported("fanotify mark of mount %s: %v", kv["mnt_id"], err)
			}
		default:
			m.Kind = image.FanMarkFilesystem
			if m.Path, err = mountOf(uint32(sdev>>20), uint32(sdev&0xfffff)); err != nil {
				return nil, unsupported("fanotify mark of filesystem %s: %v", kv["sdev"], err)
			}
		}
		fa.Marks = append(fa.Marks, m)
	}
	if fa == nil {
		return nil, fmt.Errorf("fanotify: no flags in fdinfo")
	}
	return fa, nil
}

// hexBytes decodes a hex string.
func hexBytes(s string) ([]byte, error) { return hex.DecodeString(s) }

// mountByID returns the mount point of the mount with id (mountinfo's
// first field), as our mount namespace sees it.
func mountByID(id uint64) (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	want := strconv.FormatUint(id, 10)
	for _, line := range strings.Split(string(b), "\n") {
		if fs := strings.Fields(line); len(fs) > 4 && fs[0] == want {
			return procfs.UnescapeMount(fs[4]), nil
		}
	}
	return "", fmt.Errorf("no mount %d", id)
}

// handlePath returns the path of the inode a file handle names on the
// filesystem of device major:minor, opening it through one of its mounts
// (open_by_handle_at, which needs CAP_DAC_READ_SEARCH).
func handlePath(major, minor uint32, typ int32, handle []byte) (string, error) {
	mnt, err := mountOf(major, minor)
	if err != nil {
		return "", err
	}
	mfd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0) // not O_PATH: open_by_handle_at refuses it
	if err != nil {
		return "", fmt.Errorf("open mount %s: %w", mnt, err)
	}
	defer unix.Close(mfd)
	fd, err := unix.OpenByHandleAt(mfd, unix.NewFileHandle(typ, handle), unix.O_PATH|unix.O_CLOEXEC)
	if err != nil {
		return "", fmt.Errorf("open by handle on %s: %w", mnt, err)
	}
	defer unix.Close(fd)
	path, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", err
	}
	if strings.HasSuffix(path, " (deleted)") {
		return "", &deletedError{path}
	}
	if !strings.HasPrefix(path, "/") {
		return "", fmt.Errorf("watched file %s has no path", path)
	}
	return path, nil
}

// deletedError says that a watched file was deleted: it has no path.
type deletedError struct{ path string }

func (e *deletedError) Error() string { return fmt.Sprintf("watched file %s has no path", e.path) }

// mountOf returns a mount point of device major:minor, from our mountinfo.
func mountOf(major, minor uint32) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	want := fmt.Sprintf("%d:%d", major, minor)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 4 && fs[2] == want {
			return procfs.UnescapeMount(fs[4]), nil
		}
	}
	return "", fmt.Errorf("no mount of device %s", want)
}
