package main

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/migrate/image"
)

// TestBadInput feeds pthaw damaged snapshots: every one must fail with one
// line on stderr and a non-zero exit, and leave no process behind.
func TestBadInput(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "countforever")
	p := fixture.Start(t, bin, "5")
	p.Lines.Expect(t, `^3$`, waitFor)
	good, err := os.ReadFile(haltToFile(t, p))
	if err != nil {
		t.Fatal(err)
	}
	hdr := bytes.IndexByte(good, '\n') + 1
	rng := rand.New(rand.NewSource(1))

	cases := map[string][]byte{
		"empty":         {},
		"random":        randBytes(rng, 4096),
		"newer version": bytes.Replace(good, []byte("PCLUSTER-SNAPSHOT 1"), []byte("PCLUSTER-SNAPSHOT 2"), 1),
		"header only":   good[:hdr],
		"bad header":    append([]byte("PCLUSTER-SNAPSHOT 1 compress=none encrypt=none bogus=1\n"), good[hdr:]...),
	}
	damage(cases, good, hdr, 0, rng)
	dir := t.TempDir()
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(name, " ", "_"))
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(filepath.Join(binDir, "pthaw"), "-src", path)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if err == nil {
				t.Fatalf("pthaw accepted a damaged snapshot")
			}
			msg := stderr.String()
			if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pthaw: ") {
				t.Errorf("stderr %q, want one line starting with \"pthaw: \"", msg)
			}
			if pids := processesOf(bin); len(pids) > 0 {
				t.Errorf("processes %v left behind", pids)
			}
		})
	}
}

// TestCorruptHeapRefused: a bit flipped in a heap large enough that the
// restore fills it on two threads, which checksum the pages they copy
// (the decoder joins their sums before the end check), is refused with
// the checksum named, and nothing is left behind: the check still
// decides before the process is built.
func TestCorruptHeapRefused(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "bigheap")
	p := fixture.Start(t, bin, "16", "9")
	p.Lines.Expect(t, `^ready hash=`, waitFor)
	good, err := os.ReadFile(haltToFile(t, p))
	if err != nil {
		t.Fatal(err)
	}
	for _, at := range []int{len(good) / 3, len(good) / 2, len(good) * 2 / 3} {
		b := append([]byte(nil), good...)
		b[at] ^= 0x04
		path := filepath.Join(t.TempDir(), "snap")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		// Files, not pipes: a process wrongly restored and detached
		// would hold a pipe open, and Run wait for it.
		out, err := os.CreateTemp(t.TempDir(), "out")
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(filepath.Join(binDir, "pthaw"), "-detach", "-src", path)
		cmd.Stdout, cmd.Stderr = out, out
		err = cmd.Run()
		out.Close()
		got, _ := os.ReadFile(out.Name())
		if err == nil {
			// Restored and detached: its PID is the last line.
			if f := strings.Fields(string(got)); len(f) > 0 {
				if pid, err := strconv.Atoi(f[len(f)-1]); err == nil {
					fixture.KillAtCleanup(t, pid)
				}
			}
			t.Fatalf("byte %d flipped: pthaw accepted the snapshot", at)
		}
		if msg := string(got); strings.Count(msg, "\n") != 1 || !strings.Contains(msg, "checksum mismatch") {
			t.Errorf("byte %d flipped: stderr %q, want one line naming the checksum mismatch", at, msg)
		}
		if pids := processesOf(bin); len(pids) > 0 {
			t.Errorf("byte %d flipped: processes %v left behind", at, pids)
		}
	}
}

// damage adds to cases 12 truncations of snapshot good (after its header,
// of hdr bytes; the first cuts only the last byte) and 12 copies with one
// bit flipped at or after byte from (the first in the last byte).
func damage(cases map[string][]byte, good []byte, hdr, from int, rng *rand.Rand) {
	for i := 0; i < 12; i++ {
		n := hdr + rng.Intn(len(good)-hdr)
		if i == 0 {
			n = len(good) - 1
		}
		cases[fmt.Sprintf("truncated at %d", n)] = good[:n]
	}
	for i := 0; i < 12; i++ {
		at := from + rng.Intn(len(good)-from)
		if i == 0 {
			at = len(good) - 1
		}
		b := append([]byte(nil), good...)
		b[at] ^= 1 << rng.Intn(8)
		cases[fmt.Sprintf("bit flipped at %d", at)] = b
	}
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// processesOf lists live processes running exe (built for this test run:
// its path is ours alone), or a pcluster stub started under this test
// binary. Stubs of other packages' tests, which go test runs at the same
// time, or of another run of these are not ours.
func processesOf(exe string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !fixture.Alive(pid) {
			continue
		}
		link, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if link == exe || strings.HasPrefix(string(comm), "pcluster-stub") && descendsFromUs(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// descendsFromUs reports whether this test binary is an ancestor of pid. A
// stub dies with its pthaw (PR_SET_PDEATHSIG), so ours always has one.
func descendsFromUs(pid int) bool {
	me := os.Getpid()
	for range 64 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		if len(f) < 2 {
			return false
		}
		ppid, _ := strconv.Atoi(f[1])
		if ppid == me {
			return true
		}
		if ppid <= 1 {
			return false
		}
		pid = ppid
	}
	return false
}

// TestRefuseTree: a process pfreeze cannot carry yet (one with children)
// is refused with one line, and keeps running.
func TestRefuseTree(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "forkserver"))
	p.Lines.Expect(t, `^workers \d+ \d+$`, waitFor)
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", filepath.Join(t.TempDir(), "snap"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatal("pfreeze accepted a process with children")
	}
	msg := stderr.String()
	if !strings.HasPrefix(msg, fmt.Sprintf("pfreeze: freeze %d: child processes ", p.Pid())) || strings.Count(msg, "\n") != 1 ||
		!strings.Contains(msg, "-tree") {
		t.Errorf("stderr %q, want one line naming the child processes and -tree", msg)
	}
	p.Lines.Expect(t, `^fork tick \d+ `, waitFor)
}

// TestRefuseSharedTables: two processes sharing an fd table and a cwd
// (clone without CLONE_THREAD) are refused with one line naming both, and
// keep running.
func TestRefuseSharedTables(t *testing.T) {
	needRoot(t)
	p := fixture.StartGroup(t, fixture.Build(t, "clonefiles"))
	child := atoi(t, p.Lines.Expect(t, `^child (\d+)$`, waitFor)[1])
	cmd := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-tree", "-halt", "-dest", filepath.Join(t.TempDir(), "snap"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatal("pfreeze accepted processes sharing an fd table")
	}
	msg := stderr.String()
	want := fmt.Sprintf("pid %d: shares its fd table (CLONE_FILES), cwd and umask (CLONE_FS) with its parent %d", child, p.Pid())
	if !strings.Contains(msg, want) || strings.Count(msg, "\n") != 1 {
		t.Errorf("stderr %q, want one line with %q", msg, want)
	}
	p.Lines.Expect(t, `^tick \d+$`, waitFor)
}

// TestDebugDescribesSnapshot: the description pfreeze -debug prints of a
// process and the one pthaw -debug prints of its snapshot agree on the
// contents of every static memory area.
func TestDebugDescribesSnapshot(t *testing.T) {
	needRoot(t)
	p := fixture.Start(t, fixture.Build(t, "bigheap"), "16", "3")
	p.Lines.Expect(t, `^ready hash=`, waitFor)
	live, err := exec.Command(filepath.Join(binDir, "pfreeze"), "-pid", strconv.Itoa(p.Pid()), "-debug").Output()
	if err != nil {
		t.Fatalf("pfreeze -debug: %v", err)
	}
	snap := filepath.Join(t.TempDir(), "snap")
	freeze(t, "-pid", strconv.Itoa(p.Pid()), "-dest", snap)
	file, err := exec.Command(filepath.Join(binDir, "pthaw"), "-debug", "-src", snap).Output()
	if err != nil {
		t.Fatalf("pthaw -debug: %v", err)
	}
	// The read-only and the PROT_NONE areas bigheap filled never change:
	// same lines (addresses, saved bytes, hash) in both descriptions.
	static := func(desc []byte) []string {
		var out []string
		for _, line := range strings.Split(string(desc), "\n") {
			f := strings.Fields(line)
			if len(f) >= 8 && f[3] == "anon" && (f[2] == "r--p" || f[2] == "---p") && f[len(f)-3] != "0" {
				out = append(out, line)
			}
		}
		return out
	}
	a, b := static(live), static(file)
	if len(a) < 2 || strings.Join(a, "\n") != strings.Join(b, "\n") {
		t.Errorf("pfreeze -debug static areas:\n%s\npthaw -debug:\n%s", strings.Join(a, "\n"), strings.Join(b, "\n"))
	}
	for _, want := range []string{"Registers", "rip", "Memory:", "Files:", "fd 1: inherit"} {
		if !bytes.Contains(file, []byte(want)) && !bytes.Contains(file, []byte(strings.ToLower(want))) {
			t.Errorf("pthaw -debug output lacks %q", want)
		}
	}
}

// TestDebugSameVerdict: pthaw -debug and a restore read a snapshot through
// the same decoder and refuse the same damaged snapshots with the same
// reason (-debug once accepted bytes after the end record).
func TestDebugSameVerdict(t *testing.T) {
	needRoot(t)
	bin := fixture.Build(t, "countforever")
	p := fixture.Start(t, bin, "5")
	p.Lines.Expect(t, `^3$`, waitFor)
	good, err := os.ReadFile(haltToFile(t, p))
	if err != nil {
		t.Fatal(err)
	}
	hdr := bytes.IndexByte(good, '\n') + 1
	cases := map[string][]byte{
		"trailing byte":      append(append([]byte(nil), good...), 'x'),
		"trailing zeros":     append(append([]byte(nil), good...), make([]byte, 4096)...),
		"snapshot twice":     append(append([]byte(nil), good...), good[hdr:]...),
		"last byte cut":      good[:len(good)-1],
		"checksum flipped":   flipAt(good, len(good)-2),
		"length flipped":     flipAt(good, len(good)-1),
		"bad header":         append([]byte("PCLUSTER-SNAPSHOT 1 compress=none encrypt=none bogus=1\n"), good[hdr:]...),
		"newer version":      bytes.Replace(good, []byte("PCLUSTER-SNAPSHOT 1"), []byte("PCLUSTER-SNAPSHOT 2"), 1),
		"header only":        good[:hdr],
		"plain header, gzip": bytes.Replace(good, []byte("compress=none"), []byte("compress=gzip"), 1),
	}
	// Well-formed bytes with a valid checksum, but records a restore
	// refuses: -debug once described them.
	fds := 0
	cases["fds out of order"] = reencode(t, good, hdr, func(rec any) []any {
		if f, ok := rec.(*image.FD); ok {
			if fds++; fds == 2 {
				f.Fd = 0
			}
		}
		return []any{rec}
	})
	cases["areas overlap"] = reencode(t, good, hdr, func(rec any) []any {
		if v, ok := rec.(*image.VMA); ok {
			return []any{v, v}
		}
		return []any{rec}
	})
	cases["fd of unknown kind"] = reencode(t, good, hdr, func(rec any) []any {
		if f, ok := rec.(*image.FD); ok {
			f.Kind = 99
		}
		return []any{rec}
	})
	cases["short registers"] = reencode(t, good, hdr, func(rec any) []any {
		if th, ok := rec.(*image.Thread); ok {
			th.Regs = th.Regs[:5]
		}
		return []any{rec}
	})
	cases["threads after an area"] = reencode(t, good, hdr, func(rec any) []any {
		if _, ok := rec.(*image.Thread); ok {
			return nil // held, and written after the first area
		}
		return []any{rec}
	})
	dir := t.TempDir()
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(name, " ", "_"))
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			var reasons [2]string
			for i, args := range [][]string{{"-src", path}, {"-debug", "-src", path}} {
				cmd := exec.Command(filepath.Join(binDir, "pthaw"), args...)
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				if err := cmd.Run(); err == nil {
					t.Fatalf("pthaw %s accepted a damaged snapshot", strings.Join(args, " "))
				}
				msg := stderr.String()
				if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pthaw: ") {
					t.Fatalf("pthaw %s: stderr %q, want one line starting with \"pthaw: \"", strings.Join(args, " "), msg)
				}
				// A restore says "thaw: " before the reason.
				reasons[i] = strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(msg), "pthaw: "), "thaw: ")
			}
			if reasons[0] != reasons[1] {
				t.Errorf("restore: %q; -debug: %q; want the same reason", reasons[0], reasons[1])
			}
			if pids := processesOf(bin); len(pids) > 0 {
				t.Errorf("processes %v left behind", pids)
			}
		})
	}
}

func flipAt(b []byte, at int) []byte {
	b = append([]byte(nil), b...)
	b[at] ^= 1
	return b
}

// reencode decodes snapshot good (header of hdr bytes), passes each
// metadata record through edit and encodes what it returns (nil: hold the
// record and write it after the next memory area), with a new, valid
// checksum: a snapshot only the structural rules can refuse.
func reencode(t *testing.T, good []byte, hdr int, edit func(rec any) []any) []byte {
	t.Helper()
	var out bytes.Buffer
	out.Write(good[:hdr])
	enc := image.NewEncoder(&out)
	dec := image.NewDecoder(bytes.NewReader(good[hdr:]))
	var held []any // records edit moved after the next area
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
			if err := enc.WritePages(r.Addr, data); err != nil {
				t.Fatal(err)
			}
			continue
		case *image.End:
			if err := enc.Close(); err != nil {
				t.Fatal(err)
			}
			return out.Bytes()
		}
		recs := edit(rec)
		if recs == nil {
			held = append(held, rec)
			continue
		}
		if _, ok := rec.(*image.VMA); ok && len(held) > 0 {
			recs = append(recs, held...)
			held = nil
		}
		for _, r := range recs {
			if err := enc.Write(r); err != nil {
				t.Fatal(err)
			}
		}
	}
}
