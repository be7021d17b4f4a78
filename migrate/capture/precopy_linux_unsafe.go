package capture

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// struct pm_scan_arg and struct page_region (<linux/fs.h>).
type pmScanArg struct {
	Size, Flags, Start, End, WalkEnd, Vec, VecLen, MaxPages   uint64
	CategoryInverted, CategoryMask, CategoryAnyof, ReturnMask uint64
}

type pageRegion struct{ Start, End, Categories uint64 }

// pagemapScan runs PAGEMAP_SCAN over [start, end) of the process whose
// pagemap f is, filling vec; it returns the regions found and where the
// walk stopped (short of end when vec filled up).
func pagemapScan(f *os.File, start, end, flags, mask, anyof, ret uint64, vec []pageRegion) ([]pageRegion, uint64, error) {
	arg := pmScanArg{Size: uint64(unsafe.Sizeof(pmScanArg{})), Flags: flags, Start: start, End: end,
		Vec: uint64(uintptr(unsafe.Pointer(&vec[0]))), VecLen: uint64(len(vec)),
		CategoryMask: mask, CategoryAnyof: anyof, ReturnMask: ret}
	n, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), pagemapScanIoctl, uintptr(unsafe.Pointer(&arg)))
	if errno != 0 {
		return nil, 0, errno
	}
	return vec[:n], arg.WalkEnd, nil
}

// uffdIoctl runs a userfaultfd ioctl whose argument is *arg.
func uffdIoctl[T any](f *os.File, req uintptr, arg *T) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(arg)))
	if errno != 0 {
		return errno
	}
	return nil
}
