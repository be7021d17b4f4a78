package capture

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// Pseudo-terminals whose master the frozen process (or tree) holds are
// carried: their index, the terminal's settings and window size, lock
// and packet mode, all read through pfreeze's duplicate of the master
// (for a pty master the kernel's terminal ioctls act on the slave's
// terminal). Bytes waiting in either direction cannot be read without
// taking them, so a pty with any is refused (the process, resumed, reads
// them); the slave's are seen through a duplicate of a slave fd the
// process holds (opening one of our own could change the pty's state
// when we close it).

// isPtmx reports whether rdev is /dev/ptmx (5, 2): a pty master.
func isPtmx(rdev uint64) bool { return unix.Major(rdev) == 5 && unix.Minor(rdev) == 2 }

// slaveIndex returns the index of the pty slave device rdev.
func slaveIndex(rdev uint64) (int, bool) {
	maj := unix.Major(rdev)
	if maj < 136 || maj > 143 {
		return 0, false
	}
	return int(maj-136)*256 + int(unix.Minor(rdev)), true
}

// pidfdThread is PIDFD_THREAD (O_EXCL): a pidfd for one thread.
const pidfdThread = unix.O_EXCL

// dupFd duplicates pid's fd into this process (pidfd_getfd): the same
// open file, for reading its state or holding it. pid may be a thread
// (a Frozen's reader, when the main thread has exited): its pidfd is then
// the thread's (PIDFD_THREAD), and the fd table the same.
func dupFd(pid, fd int) (int, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.EINVAL) {
		pidfd, err = unix.PidfdOpen(pid, pidfdThread)
	}
	if err != nil {
		return -1, fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return -1, fmt.Errorf("pidfd_getfd: %w", err)
	}
	return dup, nil
}

// innerPtys returns the indexes of the ptys whose master one of pids
// holds.
func innerPtys(pids []int) (map[int]bool, error) {
	ptys := map[int]bool{}
	for _, pid := range pids {
		infos, err := procfs.FDs(pid)
		if err != nil {
			return nil, fmt.Errorf("pid %d: fds: %w", pid, err)
		}
		for _, fi := range infos {
			var st syscall.Stat_t
			if err := syscall.Stat(fmt.Sprintf("/proc/%d/fd/%d", pid, fi.Fd), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFCHR || !isPtmx(st.Rdev) {
				continue
			}
			dup, err := dupFd(pid, fi.Fd)
			if err != nil {
				return nil, fmt.Errorf("pid %d: fd %d: %w", pid, fi.Fd, err)
			}
			n, err := unix.IoctlGetInt(dup, unix.TIOCGPTN)
			unix.Close(dup)
			if err != nil {
				return nil, fmt.Errorf("pid %d: fd %d (%s): TIOCGPTN: %w", pid, fi.Fd, fi.Link, err)
			}
			ptys[int(n)] = true
		}
	}
	return ptys, nil
}

// describePtyMaster records the pty master at pid's fd.
func describePtyMaster(pid, fd int, rec *image.FD) error {
	m, err := dupFd(pid, fd)
	if err != nil {
		return err
	}
	defer unix.Close(m)
	n, err := unix.IoctlGetInt(m, unix.TIOCGPTN)
	if err != nil {
		return fmt.Errorf("TIOCGPTN: %w", err)
	}
	t := &image.Pty{Index: n}
	if q, err := unix.IoctlGetInt(m, unix.TIOCINQ); err != nil || q > 0 {
		return fmt.Errorf("pty %d has %d bytes written by its slave side not yet read (%v): try again once the process has read them (it runs on)", n, q, err)
	}
	tio, err := unix.IoctlGetTermios(m, unix.TCGETS)
	if err != nil {
		return fmt.Errorf("pty %d: TCGETS: %w", n, err)
	}
	t.Termios = &image.Termios{Iflag: tio.Iflag, Oflag: tio.Oflag, Cflag: tio.Cflag, Lflag: tio.Lflag, Line: tio.Line,
		Cc: append([]byte(nil), tio.Cc[:]...), Ispeed: tio.Ispeed, Ospeed: tio.Ospeed}
	ws, err := unix.IoctlGetWinsize(m, unix.TIOCGWINSZ)
	if err != nil {
		return fmt.Errorf("pty %d: TIOCGWINSZ: %w", n, err)
	}
	t.Rows, t.Cols = ws.Row, ws.Col
	if v, err := unix.IoctlGetInt(m, unix.TIOCGPTLCK); err == nil {
		t.Locked = v != 0
	}
	if v, err := unix.IoctlGetInt(m, unix.TIOCGPKT); err == nil {
		t.Packet = v != 0
	}
	rec.Kind, rec.Pty = image.FDPtyMaster, t
	return nil
}

// describePtySlave records the slave side, index n, of a pty whose master
// is in the frozen set, at pid's fd.
func describePtySlave(pid, fd, n int, rdev uint64, rec *image.FD) error {
	s, err := dupFd(pid, fd)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	if q, err := unix.IoctlGetInt(s, unix.TIOCINQ); err != nil || q > 0 {
		return fmt.Errorf("pty %d has %d bytes written by its master side not yet read (%v): try again once the process has read them (it runs on)", n, q, err)
	}
	t := &image.Pty{Index: n}
	// /proc/PID/stat: tty_nr (field 7) and tpgid (field 8).
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return err
	}
	if i := strings.LastIndexByte(string(b), ')'); i > 0 {
		if f := strings.Fields(string(b[i+1:])); len(f) > 5 {
			ttyNr, _ := strconv.ParseUint(f[4], 10, 64)
			tpgid, _ := strconv.Atoi(f[5])
			// tty_nr encodes the device as the kernel's old_encode_dev
			// does for major < 256: minor's low byte, major, minor's rest.
			dev := unix.Mkdev(uint32(ttyNr>>8&0xfff), uint32(ttyNr&0xff|ttyNr>>12&0xfff00))
			if dev == rdev {
				t.Ctty, t.Tpgid = true, tpgid
			}
		}
	}
	rec.Kind, rec.Pty = image.FDPtySlave, t
	return nil
}
