package loader

import (
	"bytes"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// TestUffdFillSplit fills an area of this test process through a
// userfaultfd, as pthaw fills a restored process's heap: a fill large
// enough to be shared between two threads places every byte, and one
// that meets a page already present reports only what lies before that
// page (the caller writes the rest the usual way), whichever thread's
// piece held it. The CRC-32C it computes on the way (the stream's
// checksum, left to the filler) is that of all the data, placed or not.
func TestUffdFillSplit(t *testing.T) {
	const size = 4*uffdSplit + 3*pageSize // not a multiple of uffdPiece
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	for _, tc := range []struct {
		name    string
		present int // offset of a page touched before the fill, or -1
		want    int
	}{
		{"all missing", -1, size},
		{"a page present in the first piece", 5 * pageSize, 5 * pageSize},
		{"a page present in the last piece", size - 2*pageSize, size - 2*pageSize},
		{"a page present in a middle piece", 9*uffdPiece + pageSize, 9*uffdPiece + pageSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			area, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Munmap(area)
			if tc.present >= 0 {
				area[tc.present] = 1
			}
			fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|uffdUserModeOnly, 0, 0)
			if errno != 0 {
				t.Skipf("userfaultfd: %v", errno)
			}
			f := os.NewFile(fd, "userfaultfd")
			api := uffdioAPIArg{API: uffdAPI}
			if err := uffdIoctl(f, uffdioAPI, &api); err != nil {
				f.Close()
				t.Fatalf("UFFDIO_API: %v", err)
			}
			addr := uint64(uintptr(unsafe.Pointer(&area[0])))
			reg := uffdioRegisterArg{Range: uffdioRange{addr, size}, Mode: uffdRegisterMissing}
			if err := uffdIoctl(f, uffdioRegister, &reg); err != nil {
				f.Close()
				t.Fatalf("UFFDIO_REGISTER: %v", err)
			}
			got, crc := uffdFill(f, addr, data, true)
			// Unregister before reading: a missing page of a registered
			// area would wait for a fault handler there is none of.
			f.Close()
			if got != tc.want {
				t.Fatalf("placed %d bytes, want %d", got, tc.want)
			}
			if want := image.CRC(data); crc != want {
				t.Fatalf("crc %08x, want %08x", crc, want)
			}
			if !bytes.Equal(area[:got], data[:got]) {
				t.Fatal("the placed bytes differ from the data")
			}
		})
	}
}
