package capture

import (
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// An epoll registration names its file by the fd number it was added
// under; the kernel keeps watching the file when that fd is closed while
// another fd (a dup) still holds it. kcmp(KCMP_EPOLL_TFD) tells which of
// the process's fds is the watched file.

// kcmpEpollTFD is KCMP_EPOLL_TFD.
const kcmpEpollTFD = 7

// findEpollTargets checks every registration of the epoll instances
// among fds: the file at its fd number, or else the fd that holds it now
// (EpollTarget.Via); a file no fd holds any more is refused.
func findEpollTargets(pid int, fds []image.FD) error {
	for i := range fds {
		ep := &fds[i]
		seen := map[int]int{} // registrations so far per fd number (toff)
		for j := range ep.Epoll {
			t := &ep.Epoll[j]
			toff := seen[t.Fd]
			seen[t.Fd]++
			if epollWatches(pid, ep.Fd, t.Fd, toff, t.Fd) {
				continue
			}
			found := false
			for _, other := range fds {
				if other.Fd != t.Fd && epollWatches(pid, ep.Fd, t.Fd, toff, other.Fd) {
					via := other.Fd
					t.Via, found = &via, true
					break
				}
			}
			if !found {
				return unsupported("fd %d (epoll) watches fd %d, which is closed or was replaced, and no fd holds its file", ep.Fd, t.Fd)
			}
		}
	}
	return nil
}

// epollWatches reports whether pid's fd is the file epoll instance epfd
// watches as its toff'th registration of fd number tfd.
func epollWatches(pid, epfd, tfd, toff, fd int) bool {
	slot := struct{ efd, tfd, toff uint32 }{uint32(epfd), uint32(tfd), uint32(toff)}
	r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid), uintptr(pid), kcmpEpollTFD, uintptr(fd), uintptr(unsafe.Pointer(&slot)), 0)
	return e == 0 && r == 0
}
