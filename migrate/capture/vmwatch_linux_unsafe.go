package capture

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// openTracepointCounter opens a counter of tracepoint id for thread tid
// and the threads and processes it makes from now on (inherit), counting
// only what filter (the tracepoint's filter syntax; "": all) lets
// through. It is enabled before it is returned.
func openTracepointCounter(tid int, id uint64, filter string) (int, error) {
	attr := unix.PerfEventAttr{Type: unix.PERF_TYPE_TRACEPOINT, Size: uint32(unsafe.Sizeof(unix.PerfEventAttr{})),
		Config: id, Bits: unix.PerfBitDisabled | unix.PerfBitInherit}
	fd, err := unix.PerfEventOpen(&attr, tid, -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		return -1, err
	}
	if filter != "" {
		b := append([]byte(filter), 0)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.PERF_EVENT_IOC_SET_FILTER, uintptr(unsafe.Pointer(&b[0]))); e != 0 {
			unix.Close(fd)
			return -1, e
		}
	}
	if err := unix.IoctlSetInt(fd, unix.PERF_EVENT_IOC_ENABLE, 0); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
