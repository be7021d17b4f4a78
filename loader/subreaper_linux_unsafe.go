package loader

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// isSubreaper reports whether this process is a child subreaper.
func isSubreaper() bool {
	var v int32
	unix.Prctl(unix.PR_GET_CHILD_SUBREAPER, uintptr(unsafe.Pointer(&v)), 0, 0, 0)
	return v != 0
}
