package loader

import (
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

func uffdIoctl[T any](f *os.File, req uintptr, arg *T) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(unsafe.Pointer(arg)))
	if e != 0 {
		return e
	}
	return nil
}

// uffdCopy runs UFFDIO_COPY of src, which c describes except for Src.
func uffdCopy(f *os.File, c *uffdioCopyArg, src []byte) error {
	c.Src = uint64(uintptr(unsafe.Pointer(&src[0])))
	err := uffdIoctl(f, uffdioCopy, c)
	runtime.KeepAlive(src)
	return err
}
