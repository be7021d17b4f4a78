package capture

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// getsockoptBytes reads a socket option into b and returns the length the
// kernel reported (for SO_GET_FILTER with an empty b: the number of
// instructions of the attached filter, 0 for none).
func getsockoptBytes(fd, level, name int, b []byte) (int, error) {
	n := uint32(len(b))
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(p), uintptr(unsafe.Pointer(&n)), 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// setsockoptBytes sets a socket option to b.
func setsockoptBytes(fd, level, name int, b []byte) error {
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0)
	if e != 0 {
		return e
	}
	return nil
}
