package loader

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// notifRecv receives one trapped call from a seccomp listener.
func notifRecv(fd int) (seccompNotif, error) {
	var n seccompNotif
	err := notifIoctl(fd, unix.SECCOMP_IOCTL_NOTIF_RECV, unsafe.Pointer(&n))
	return n, err
}

// notifSend answers a trapped call.
func notifSend(fd int, r *seccompResp) error {
	return notifIoctl(fd, unix.SECCOMP_IOCTL_NOTIF_SEND, unsafe.Pointer(r))
}

func notifIoctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}
