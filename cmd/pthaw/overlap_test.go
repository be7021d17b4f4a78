package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/image"
)

// TestOverlappingPages restores a snapshot whose heap pages come twice:
// a part of a page and a page, then the whole run (the same bytes).
// pfreeze never writes such a snapshot, but the format allows it, and
// pthaw fills anonymous memory with UFFDIO_COPY, which refuses a page
// already there and unaligned ranges: the rest must still be written.
func TestOverlappingPages(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "16", "3")
	hash := p.Lines.Expect(t, `^ready hash=([0-9a-f]+)$`, 60*time.Second)[1]
	pid := p.Pid()
	good, err := os.ReadFile(haltToFile(t, p))
	if err != nil {
		t.Fatal(err)
	}
	hdr := bytes.IndexByte(good, '\n') + 1
	var out bytes.Buffer
	out.Write(good[:hdr])
	enc := image.NewEncoder(&out)
	dec := image.NewDecoder(bytes.NewReader(good[hdr:]))
	doubled := false
	for {
		rec, err := dec.Next()
		if err != nil {
			t.Fatal(err)
		}
		switch r := rec.(type) {
		case *image.Pages:
			data := make([]byte, r.Len)
			if _, err := dec.ReadData(data); err != nil && len(data) > 0 {
				t.Fatal(err)
			}
			if !doubled && len(data) >= 1<<20 {
				// Part of a page, then a page, then the whole run over
				// them: the run's copy stops at a page already there.
				doubled = true
				if err := enc.WritePages(r.Addr+12300, data[12300:12400]); err != nil {
					t.Fatal(err)
				}
				if err := enc.WritePages(r.Addr+4096, data[4096:8192]); err != nil {
					t.Fatal(err)
				}
			}
			if err := enc.WritePages(r.Addr, data); err != nil {
				t.Fatal(err)
			}
			continue
		case *image.End:
			if err := enc.Close(); err != nil {
				t.Fatal(err)
			}
		default:
			if err := enc.Write(rec); err != nil {
				t.Fatal(err)
			}
			continue
		}
		break
	}
	if !doubled {
		t.Fatal("no run of pages of 1 MiB or more in the snapshot")
	}
	snap := filepath.Join(t.TempDir(), "overlap")
	if err := os.WriteFile(snap, out.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	th := thaw(t, "-src", snap)
	th.out.Expect(t, `^tick \d+$`, waitFor)
	if got := th.restoredPid(t); got != pid {
		t.Errorf("restored pid %d, want %d", got, pid)
	}
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	th.out.Expect(t, fmt.Sprintf(`^check hash=%s ok$`, hash), 60*time.Second)
}
