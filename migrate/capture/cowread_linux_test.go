package capture

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// TestReadKeepsCowShared reads the 16 MiB that cowshare's parent shares
// copy-on-write with its child (as a live migration's pre-copy and every
// freeze read a process's memory) and checks that the pages are still
// shared afterwards: the child's Pss_Anon stays about half its
// Anonymous. process_vm_readv pins what it reads, which gives the target
// its own copy of each shared page; the reader takes such pages through
// /proc/PID/mem instead. The contents read are cowshare's (page i holds
// i+1, modulo 256, in every byte).
func TestReadKeepsCowShared(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: frame numbers in pagemap")
	}
	p := fixture.StartGroup(t, fixture.Build(t, "cowshare"))
	m := p.Lines.Expect(t, `^ready (\d+) (\d+)$`, waitFor)
	parent, _ := strconv.Atoi(m[1])
	child, _ := strconv.Atoi(m[2])
	area := anonArea(t, parent, 16<<20)
	rss0, pss0 := anonKB(t, child)
	if 4*2*pss0 > 5*rss0 {
		t.Fatalf("before the read: child Anonymous %d kB, Pss_Anon %d kB: not shared", rss0, pss0)
	}

	pagemap, err := os.Open(procfs.Path(parent, "pagemap"))
	if err != nil {
		t.Fatal(err)
	}
	defer pagemap.Close()
	mem := ptrace.NewMem(parent)
	defer mem.Close()
	pages := 0
	err = copyMemory(mem, func(addr uint64, data []byte) error {
		for off := 0; off < len(data); off += pageSize {
			i := (addr + uint64(off) - area.Start) / pageSize
			if want := byte(i + 1); data[off] != want || data[off+pageSize-1] != want {
				return fmt.Errorf("page %d read %#x, want %#x", i, data[off], want)
			}
			pages++
		}
		return nil
	}, func(r *reader) error { return r.readAll(pagemap, []image.VMA{area}) })
	if err != nil {
		t.Fatal(err)
	}
	// Every page but the all-zero ones (i+1 a multiple of 256), which
	// the reader leaves out.
	if want := 4096 - 4096/256; pages != want {
		t.Errorf("read %d pages of the area, want %d", pages, want)
	}
	rss, pss := anonKB(t, child)
	t.Logf("child Anonymous/Pss_Anon: %d/%d kB before the read, %d/%d kB after", rss0, pss0, rss, pss)
	if 4*2*pss > 5*rss {
		t.Errorf("after the read: child Anonymous %d kB, Pss_Anon %d kB, want still shared with the parent (Pss under 5/4 of Rss/2)", rss, pss)
	}
}

// anonArea returns pid's private anonymous area of size bytes.
func anonArea(t *testing.T, pid int, size uint64) image.VMA {
	t.Helper()
	f, err := os.Open(procfs.Path(pid, "maps"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		var start, end uint64
		if _, err := fmt.Sscanf(fs[0], "%x-%x", &start, &end); err == nil && end-start == size && len(fs) == 5 && fs[1] == "rw-p" {
			return image.VMA{Start: start, End: end, Kind: image.VMAAnon}
		}
	}
	t.Fatalf("pid %d has no private anonymous area of %d bytes", pid, size)
	return image.VMA{}
}

// anonKB returns pid's Anonymous and Pss_Anon from smaps_rollup, in kB.
func anonKB(t *testing.T, pid int) (rss, pss int) {
	t.Helper()
	b, err := os.ReadFile(procfs.Path(pid, "smaps_rollup"))
	if err != nil {
		t.Fatal(err)
	}
	field := func(key string) int {
		m := regexp.MustCompile(`(?m)^` + key + `:\s+(\d+) kB$`).FindSubmatch(b)
		if m == nil {
			t.Fatalf("no %s in the smaps_rollup of %d", key, pid)
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	return field("Anonymous"), field("Pss_Anon")
}
