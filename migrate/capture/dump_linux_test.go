package capture

import (
	"reflect"
	"testing"
)

// TestDropZeros: the reader goroutine splits each read run at its
// all-zero pages (anonymous areas only) and says where each kept span
// lies in the chunk's buffer.
func TestDropZeros(t *testing.T) {
	// Pages: data, zero, zero, data, data, zero; then a file run of a
	// data page and a zero page.
	buf := make([]byte, 8*pageSize)
	for _, p := range []int{0, 3, 4, 6} {
		buf[p*pageSize+pageSize/2] = byte(p + 1)
	}
	anon := run{addr: 0x10000, len: 6 * pageSize, anon: true}
	file := run{addr: 0x40000, len: 2 * pageSize}
	got := dropZeros(nil, anon, buf, 0)
	got = dropZeros(got, file, buf, 6*pageSize)
	want := []run{
		{addr: 0x10000, len: pageSize, off: 0},
		{addr: 0x10000 + 3*pageSize, len: 2 * pageSize, off: 3 * pageSize},
		{addr: 0x40000, len: 2 * pageSize, off: 6 * pageSize},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got runs %+v, want %+v", got, want)
	}
	if got := dropZeros(nil, run{addr: 0x10000, len: 2 * pageSize, anon: true}, make([]byte, 2*pageSize), 0); len(got) != 0 {
		t.Fatalf("all-zero anonymous run: got runs %+v, want none", got)
	}
}
