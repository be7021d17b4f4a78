package capture

import (
	"fmt"
	"os"
	"unsafe"
)

// readPagemap fills entries with the pagemap words of the pages from addr.
func readPagemap(f *os.File, addr uint64, entries []uint64) error {
	if len(entries) == 0 {
		return nil
	}
	b := unsafe.Slice((*byte)(unsafe.Pointer(&entries[0])), len(entries)*8)
	if _, err := f.ReadAt(b, int64(addr/pageSize*8)); err != nil {
		return fmt.Errorf("pagemap %#x: %w", addr, err)
	}
	return nil
}
