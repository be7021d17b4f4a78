package capture

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// anyPage reports whether [start, end) of the process whose pagemap f is
// holds a page (present or swapped out): PAGEMAP_SCAN stopped at the
// first one (max_pages 1), so that a full area costs no walk of it.
func anyPage(f *os.File, start, end uint64) (bool, error) {
	var vec [1]pageRegion
	arg := pmScanArg{Size: uint64(unsafe.Sizeof(pmScanArg{})), Start: start, End: end,
		Vec: uint64(uintptr(unsafe.Pointer(&vec[0]))), VecLen: 1, MaxPages: 1,
		CategoryAnyof: pageIsPresent | pageIsSwapped, ReturnMask: pageIsPresent | pageIsSwapped}
	n, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), pagemapScanIoctl, uintptr(unsafe.Pointer(&arg)))
	if errno != 0 {
		return false, errno
	}
	return n > 0, nil
}
