package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

func sample(t testing.TB) []byte {
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	recs := []any{
		&Process{Pid: 42, Threads: 1, Comm: "x", Exe: "/bin/x", Rlimits: []Rlimit{{1, 2}}, Creds: Creds{Uid: [4]uint32{1000, 1000, 1000, 1000}}},
		&Thread{Tid: 42, Regs: make([]uint64, 27), XState: []byte{1, 2, 3}},
		&VMA{Start: 0x1000, End: 0x5000, Prot: 3, Kind: VMAAnon},
	}
	for _, r := range recs {
		if err := enc.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	page := bytes.Repeat([]byte{0xab}, 8192)
	if err := enc.WritePages(0x2000, page); err != nil {
		t.Fatal(err)
	}
	if err := enc.Write(&FD{Fd: 3, Kind: FDFile, Path: "/tmp/f", Desc: 3}); err != nil {
		t.Fatal(err)
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func decodeAll(data []byte) ([]any, error) {
	dec := NewDecoder(bytes.NewReader(data))
	var out []any
	buf := make([]byte, 3000)
	for {
		rec, err := dec.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		if p, ok := rec.(*Pages); ok {
			var data []byte
			for {
				n, err := dec.ReadData(buf)
				if err == io.EOF {
					break
				}
				if err != nil {
					return out, err
				}
				data = append(data, buf[:n]...)
			}
			if uint64(len(data)) != p.Len {
				return out, errors.New("short data")
			}
		}
		out = append(out, rec)
	}
}

func TestRoundTrip(t *testing.T) {
	recs, err := decodeAll(sample(t))
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, r := range recs {
		types = append(types, reflect.TypeOf(r).Elem().Name())
	}
	want := []string{"Process", "Thread", "VMA", "Pages", "FD", "End"}
	if !reflect.DeepEqual(types, want) {
		t.Fatalf("got records %v, want %v", types, want)
	}
	if p := recs[0].(*Process); p.Pid != 42 || p.Creds.Uid[0] != 1000 || p.Exe != "/bin/x" {
		t.Errorf("process record %+v", p)
	}
	if p := recs[3].(*Pages); p.Addr != 0x2000 || p.Len != 8192 {
		t.Errorf("pages record %+v", p)
	}
}

// TestEveryByteMatters: any single flipped bit or any truncation is an
// error, never a silently different snapshot.
func TestEveryByteMatters(t *testing.T) {
	good := sample(t)
	for i := range good {
		b := append([]byte(nil), good...)
		b[i] ^= 0x10
		if _, err := decodeAll(b); err == nil {
			t.Fatalf("bit flipped at %d of %d: decoded without error", i, len(good))
		}
	}
	for n := 0; n < len(good); n++ {
		if _, err := decodeAll(good[:n]); err == nil {
			t.Fatalf("truncated to %d of %d: decoded without error", n, len(good))
		}
	}
}

func frame(t Type, payload []byte) []byte {
	h := make([]byte, 5)
	h[0] = byte(t)
	binary.LittleEndian.PutUint32(h[1:], uint32(len(payload)))
	return append(h, payload...)
}

func TestUnknownRecords(t *testing.T) {
	// An unknown record first, then a valid process record; the encoder's
	// own checksum covers both.
	for _, tc := range []struct {
		typ  Type
		fail bool
	}{{Skippable | 0x7f, false}, {0x7f, true}} {
		var buf bytes.Buffer
		enc := NewEncoder(&buf)
		enc.write(frame(tc.typ, []byte{0xc0}))
		enc.Write(&Process{Pid: 1, Threads: 1})
		enc.Write(&Thread{Tid: 1})
		enc.Close()
		_, err := decodeAll(buf.Bytes())
		if tc.fail && !errors.Is(err, ErrCorrupt) {
			t.Errorf("type %#x: got %v, want a corrupt-snapshot error", tc.typ, err)
		}
		if !tc.fail && err != nil {
			t.Errorf("skippable type %#x: got %v, want it skipped", tc.typ, err)
		}
	}
}

func TestHugeLengthsAreRefused(t *testing.T) {
	for _, b := range [][]byte{
		{byte(TypeProcess), 0xff, 0xff, 0xff, 0x7f},
		{byte(TypePages), 0xff, 0xff, 0xff, 0xff},
		{byte(TypeEnd), 0xff, 0, 0, 0},
	} {
		if _, err := decodeAll(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%x: got %v, want a corrupt-snapshot error", b, err)
		}
	}
}

// FuzzDecoder: no input makes the decoder panic, hang or allocate without
// bound; CI runs it briefly (make test).
func FuzzDecoder(f *testing.F) {
	good := sample(f)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		decodeAll(data)
	})
}

// TestManySkippable: any number of skippable records is passed over in a
// loop (a crafted snapshot once overflowed the stack through recursion).
func TestManySkippable(t *testing.T) {
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	rec := frame(Skippable|0x01, nil)
	for i := 0; i < 1<<20; i++ {
		enc.write(rec)
	}
	enc.Write(&Process{Pid: 1, Threads: 1})
	enc.Write(&Thread{Tid: 1})
	enc.Close()
	recs, err := decodeAll(buf.Bytes())
	if err != nil || len(recs) != 3 {
		t.Fatalf("got %d records, %v; want the process, thread and end records", len(recs), err)
	}
}

// TestTreeRoundTrip: a tree record, a shared area's identity and a pipe's
// fields survive encoding.
func TestTreeRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	tree := &Tree{Procs: []TreeProc{{Pid: 10, PPid: 1, Pgid: 10, Sid: 10, Threads: 2}, {Pid: 11, PPid: 10, Pgid: 10, Sid: 10, Zombie: true, ExitStatus: 0x300}}}
	recs := []any{tree, &Process{Pid: 10, Threads: 2}, &Thread{Tid: 10}, &Thread{Tid: 12},
		&VMA{Start: 0x1000, End: 0x2000, Kind: VMASharedAnon, Shared: true, Shm: 77},
		&FD{Fd: 4, Desc: 4, Kind: FDPipe, Pipe: 99, PipeSize: 65536, PipeData: []byte("seq 1\n")}}
	for _, r := range recs {
		if err := enc.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := decodeAll(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(recs)+1 {
		t.Fatalf("got %d records, want %d", len(got), len(recs)+1)
	}
	for i, r := range recs {
		if !reflect.DeepEqual(got[i], r) {
			t.Errorf("record %d: got %+v, want %+v", i, got[i], r)
		}
	}
}

// TestOneVerdict: the decoder alone decides whether a snapshot is whole,
// so every reader — a restore's record loop (decodeAll here) and Describe
// (pthaw -debug) — refuses the same damaged snapshots for the same reason.
// Trailing bytes after the end record were once accepted by Describe.
func TestOneVerdict(t *testing.T) {
	good := sample(t)
	endAt := len(good) - 5 - 1 // the end record's header; its payload is at least 1 byte
	for endAt >= 0 && Type(good[endAt]) != TypeEnd {
		endAt--
	}
	cases := map[string][]byte{
		"one trailing byte":   append(append([]byte(nil), good...), 'x'),
		"trailing zero page":  append(append([]byte(nil), good...), make([]byte, 4096)...),
		"snapshot twice":      append(append([]byte(nil), good...), good...),
		"trailing end record": append(append([]byte(nil), good...), good[endAt:]...),
		"no end record":       good[:endAt],
		"last byte cut":       good[:len(good)-1],
	}
	for i := endAt + frameHeaderLen; i < len(good); i++ {
		b := append([]byte(nil), good...)
		b[i] ^= 0x01
		cases[fmt.Sprintf("end record byte %d flipped", i)] = b
	}
	for _, at := range []int{100, len(good) / 2, endAt - 1} {
		b := append([]byte(nil), good...)
		b[at] ^= 0x80 // page data or the last fd record: only the checksum sees it
		cases[fmt.Sprintf("byte %d flipped", at)] = b
	}
	for name, data := range cases {
		_, derr := decodeAll(data)
		rerr := Describe(io.Discard, NewDecoder(bytes.NewReader(data)), nil)
		if derr == nil || rerr == nil {
			t.Errorf("%s: records: %v; describe: %v; want both refused", name, derr, rerr)
			continue
		}
		if !errors.Is(derr, ErrCorrupt) || derr.Error() != rerr.Error() {
			t.Errorf("%s: records: %v; describe: %v; want the same corrupt-snapshot error", name, derr, rerr)
		}
	}
	if _, err := decodeAll(good); err != nil {
		t.Fatalf("the intact sample: %v", err)
	}
	if err := Describe(io.Discard, NewDecoder(bytes.NewReader(good)), nil); err != nil {
		t.Fatalf("describe the intact sample: %v", err)
	}
}

// TestStructureOneVerdict: the decoder applies the structural rules a
// restore needs (record order, bounds, areas, fds, a tree's members) to
// every record, so Describe (pthaw -debug) refuses what a restore refuses,
// with the same error; before, it described such snapshots.
func TestStructureOneVerdict(t *testing.T) {
	proc := func(pid, threads int) *Process { return &Process{Pid: pid, Threads: threads} }
	vma := func(start, end uint64) *VMA { return &VMA{Start: start, End: end, Kind: VMAAnon} }
	pages := pagesRec{0x2000, 4096}
	tree := &Tree{Procs: []TreeProc{{Pid: 10, PPid: 1, Threads: 1}, {Pid: 11, PPid: 10, Threads: 1}}}
	for _, tc := range []struct {
		name string
		recs []any
		want string
	}{
		{"no records", nil, "missing process or thread records"},
		{"thread first", []any{&Thread{Tid: 1}}, "unexpected thread record"},
		{"no thread", []any{proc(1, 1), vma(0x1000, 0x3000)}, "memory area before the thread records"},
		{"thread out of place", []any{proc(1, 2), &Thread{Tid: 2}}, "thread 2 out of place"},
		{"exited main thread recorded", []any{&Process{Pid: 1, Threads: 2, LeaderExited: true}, &Thread{Tid: 2}, &Thread{Tid: 1}}, "thread 1 out of place"},
		{"too many threads", []any{proc(1, 1), &Thread{Tid: 1}, &Thread{Tid: 2}}, "unexpected thread record"},
		{"areas overlap", []any{proc(1, 1), &Thread{Tid: 1}, vma(0x1000, 0x3000), vma(0x2000, 0x4000)}, "memory areas overlap"},
		{"area unaligned", []any{proc(1, 1), &Thread{Tid: 1}, vma(0x1001, 0x3000)}, "memory area 0x1001-0x3000"},
		{"area kind", []any{proc(1, 1), &Thread{Tid: 1}, &VMA{Start: 0x1000, End: 0x2000, Kind: 99}}, "unknown kind 99"},
		{"pages outside", []any{proc(1, 1), &Thread{Tid: 1}, vma(0x1000, 0x2000), pages}, "outside every memory area"},
		{"pages for the vdso", []any{proc(1, 1), &Thread{Tid: 1}, &VMA{Start: 0x2000, End: 0x3000, Kind: VMAVdso}, pages}, "pages for map 0x2000-0x3000"},
		{"area after pages", []any{proc(1, 1), &Thread{Tid: 1}, vma(0x1000, 0x3000), pages, vma(0x4000, 0x5000)}, "unexpected *image.VMA record"},
		{"fds out of order", []any{proc(1, 1), &Thread{Tid: 1}, &FD{Fd: 4, Kind: FDFile}, &FD{Fd: 3, Kind: FDFile}}, "fds out of order at 3"},
		{"fd kind", []any{proc(1, 1), &Thread{Tid: 1}, &FD{Fd: 4, Kind: 99}}, "fd 4 of unknown kind 99"},
		{"process out of bounds", []any{&Process{Pid: 1, Threads: 1, Auxv: make([]uint64, MaxAuxv+1)}, &Thread{Tid: 1}}, "process record out of bounds"},
		{"two processes", []any{proc(1, 1), &Thread{Tid: 1}, proc(2, 1), &Thread{Tid: 2}}, "unexpected *image.Process record"},
		{"tree: bad member", []any{&Tree{Procs: []TreeProc{{Pid: 10, PPid: 1, Threads: 1}, {Pid: 10, PPid: 10, Threads: 1}}}}, "tree member 1 (pid 10)"},
		{"tree: wrong member", []any{tree, proc(10, 1), &Thread{Tid: 10}, proc(12, 1), &Thread{Tid: 12}}, "process 12 where the tree has 11"},
		{"tree: member missing", []any{tree, proc(10, 1), &Thread{Tid: 10}}, "unexpected *image.End record after the tree"},
		{"tree: second tree", []any{tree, tree}, "unexpected *image.Tree record"},
	} {
		data := encodeRecs(t, tc.recs)
		_, derr := decodeAll(data)
		rerr := Describe(io.Discard, NewDecoder(bytes.NewReader(data)), nil)
		if derr == nil || !errors.Is(derr, ErrCorrupt) || !strings.Contains(derr.Error(), tc.want) {
			t.Errorf("%s: records: %v; want a corrupt-snapshot error saying %q", tc.name, derr, tc.want)
		}
		if rerr == nil || derr == nil || rerr.Error() != derr.Error() {
			t.Errorf("%s: describe: %v; records: %v; want the same error", tc.name, rerr, derr)
		}
	}
	// A valid tree: a zombie has no records.
	ok := []any{&Tree{Procs: []TreeProc{{Pid: 10, PPid: 1, Threads: 1}, {Pid: 11, PPid: 10, Zombie: true}, {Pid: 12, PPid: 10, Threads: 2}}},
		proc(10, 1), &Thread{Tid: 10}, vma(0x1000, 0x3000), pages, &FD{Fd: 0, Kind: FDInherit},
		proc(12, 2), &Thread{Tid: 12}, &Thread{Tid: 13}}
	if _, err := decodeAll(encodeRecs(t, ok)); err != nil {
		t.Errorf("a valid tree: %v", err)
	}
	// The registers' count, when the reader knows it.
	dec := NewDecoder(bytes.NewReader(encodeRecs(t, []any{proc(1, 1), &Thread{Tid: 1, Regs: make([]uint64, 3)}})))
	dec.CheckRegisters(27)
	if _, err := dec.Next(); err != nil {
		t.Fatal(err)
	}
	if _, err := dec.Next(); err == nil || !strings.Contains(err.Error(), "thread 1 has 3 registers") {
		t.Errorf("3 registers of 27: got %v", err)
	}
}

// pagesRec is a Pages record for encodeRecs: Len bytes of 0xab at Addr.
type pagesRec struct{ Addr, Len uint64 }

// encodeRecs encodes recs (metadata records and pagesRec) with an end
// record, whatever their order.
func encodeRecs(t *testing.T, recs []any) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	for _, r := range recs {
		var err error
		if p, ok := r.(pagesRec); ok {
			err = enc.WritePages(p.Addr, bytes.Repeat([]byte{0xab}, int(p.Len)))
		} else {
			err = enc.Write(r)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestDecoderSemanticRules: records that the loader refuses as corrupt
// (a soft limit above its hard one, a sigaction for SIGKILL, a siginfo of
// the wrong size, an fd naming an fd that is not there...) are refused by
// the decoder itself, so that pthaw -debug reaches the restore's verdict.
// pthaw -debug once described such a snapshot and exited 0.
func TestDecoderSemanticRules(t *testing.T) {
	proc := func(f func(p *Process)) *Process {
		p := &Process{Pid: 1, Threads: 1}
		f(p)
		return p
	}
	none := func(*Process) {}
	for name, tc := range map[string]struct {
		recs []any
		want string
	}{
		"rlimit soft above hard": {[]any{proc(func(p *Process) { p.Rlimits = []Rlimit{{Cur: 1, Max: 2}, {Cur: 100, Max: 50}} })}, "rlimit 1 soft 100 above hard 50"},
		"sigaction for SIGKILL":  {[]any{proc(func(p *Process) { p.Sigacts = []Sigact{{Sig: 9}} })}, "sigaction for signal 9"},
		"sigaction for 65":       {[]any{proc(func(p *Process) { p.Sigacts = []Sigact{{Sig: 65}} })}, "sigaction for signal 65"},
		"short siginfo":          {[]any{proc(func(p *Process) { p.Pending = []Siginfo{make(Siginfo, 12)} })}, "siginfo of 12 bytes"},
		"auxv over the page":     {[]any{proc(func(p *Process) { p.Auxv = make([]uint64, 500) })}, "out of bounds"},
		"eventfd counter":        {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDEventfd, EventCount: ^uint64(0)}}, "eventfd counter"},
		"shares a missing fd":    {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDFile}, &FD{Fd: 5, Desc: 4, Kind: FDFile}}, "fd 5 shares fd 4, which is not in the snapshot"},
		"epoll watches missing":  {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDEpoll, Epoll: []EpollTarget{{Fd: 7}}}}, "fd 3 (epoll) watches fd 7"},
		"unix its own peer":      {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDUnix, Unix: &UnixSocket{Type: 1, ID: 5, Peer: 5}}}, "fd 3: unix socket"},
		"unix stream messages":   {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDUnix, Unix: &UnixSocket{Type: 1, ID: 5, Peer: 6, Queue: [][]byte{{1}, {2}}}}}, "unix stream socket with 2 queue entries"},
		"unix listener relative": {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDUnix, Unix: &UnixSocket{Type: 1, ID: 5, Listen: true, Name: "a.sock"}}}, "fd 3: listening unix socket"},
		"seccomp program":        {[]any{proc(func(p *Process) { p.Seccomp = []SeccompFilter{{Prog: make([]byte, 12)}} })}, "seccomp filter 0: program of 12 bytes"},
		"timer signal":           {[]any{proc(func(p *Process) { p.Timers = []PosixTimer{{ID: 1, Signo: 65}} })}, "POSIX timer 1"},
		"timerfd without state":  {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDTimerfd}}, "fd 3: timerfd state"},
		"inotify wd order":       {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDInotify, Watches: []InotifyWatch{{Wd: 2, Path: "/a"}, {Wd: 1, Path: "/b"}}}}, "inotify watch 1"},
		"fd of a missing file":   {[]any{proc(none), &FD{Fd: 3, Desc: 3, Kind: FDFile, Object: 7}}, "fd 3: file object 0x7"},
		"file data beyond size":  {[]any{proc(none), &File{ID: 7, Kind: FileMemfd, Name: "m", Size: 2, Data: []byte("abc")}}, "file 0x7: data at 0+3"},
		"file data backwards":    {[]any{proc(none), &File{ID: 7, Kind: FileMemfd, Name: "m", Size: 9, Off: 4, Data: []byte("ab")}, &File{ID: 7, Off: 2, Data: []byte("x")}}, "file 0x7: data at 2+1"},
		"area of a missing file": {[]any{proc(none), &VMA{Start: 0x1000, End: 0x2000, Kind: VMAFile, Name: "/memfd:m (deleted)", Object: 9}}, "file object 0x9"},
		"file described twice":   {[]any{proc(none), &File{ID: 7, Kind: FileMemfd, Name: "m"}, &File{ID: 7, Kind: FileMemfd, Name: "m"}}, "file 0x7 described twice"},
	} {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			enc := NewEncoder(&buf)
			recs := append([]any{tc.recs[0], &Thread{Tid: 1}}, tc.recs[1:]...)
			for _, r := range recs {
				if err := enc.Write(r); err != nil {
					t.Fatal(err)
				}
			}
			if err := enc.Close(); err != nil {
				t.Fatal(err)
			}
			_, err := decodeAll(buf.Bytes())
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want a corrupt snapshot error saying %q", err, tc.want)
			}
		})
	}
}

// TestTreeRightsFrom: a fd queued in a tree member's unix socket may be
// another member's (RightsFrom); it must then be among that member's
// fds, whichever member comes first, and outside a tree it is corrupt.
func TestTreeRightsFrom(t *testing.T) {
	sock := func(from int) *FD {
		return &FD{Fd: 3, Desc: 3, Kind: FDUnix, Unix: &UnixSocket{Type: 1, ID: 5, Peer: 6, Queue: [][]byte{[]byte("m")}, Rights: [][]int{{4}}, RightsFrom: [][]int{{from}}}}
	}
	tree := &Tree{Procs: []TreeProc{{Pid: 10, PPid: 1, Pgid: 10, Sid: 10, Threads: 1}, {Pid: 11, PPid: 10, Pgid: 10, Sid: 10, Threads: 1}}}
	for name, tc := range map[string]struct {
		recs []any
		want string // "" when whole
	}{
		"held by a later member": {[]any{tree, &Process{Pid: 10, Threads: 1}, &Thread{Tid: 10}, sock(11),
			&Process{Pid: 11, Threads: 1}, &Thread{Tid: 11}, &FD{Fd: 4, Desc: 4, Kind: FDFile}}, ""},
		"not held by the member": {[]any{tree, &Process{Pid: 10, Threads: 1}, &Thread{Tid: 10}, sock(11),
			&Process{Pid: 11, Threads: 1}, &Thread{Tid: 11}, &FD{Fd: 5, Desc: 5, Kind: FDFile}}, "carries fd 4 of pid 11, which is not in the snapshot"},
		"not a member": {[]any{tree, &Process{Pid: 10, Threads: 1}, &Thread{Tid: 10}, sock(12),
			&Process{Pid: 11, Threads: 1}, &Thread{Tid: 11}, &FD{Fd: 4, Desc: 4, Kind: FDFile}}, "carries fd 4 of pid 12"},
		"outside a tree": {[]any{&Process{Pid: 10, Threads: 1}, &Thread{Tid: 10}, sock(11), &FD{Fd: 4, Desc: 4, Kind: FDFile}}, "outside a tree"},
	} {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			enc := NewEncoder(&buf)
			for _, r := range tc.recs {
				if err := enc.Write(r); err != nil {
					t.Fatal(err)
				}
			}
			if err := enc.Close(); err != nil {
				t.Fatal(err)
			}
			_, err := decodeAll(buf.Bytes())
			if tc.want == "" && err != nil {
				t.Errorf("got %v, want a whole snapshot", err)
			}
			if tc.want != "" && (!errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("got %v, want a corrupt snapshot error saying %q", err, tc.want)
			}
		})
	}
}

// TestSummedPages checks that pages checksummed by a PageSum (pfreeze
// sums them on its reader goroutine) give the very bytes WritePages
// gives, that the stream decodes, and that a PageSum that missed a run
// makes the end record's checksum wrong.
func TestSummedPages(t *testing.T) {
	runs := []struct {
		addr uint64
		data []byte
	}{
		{0x2000, bytes.Repeat([]byte{0xab}, 8192)},
		{0x5000, bytes.Repeat([]byte{0xcd}, 4096)},
	}
	head := func(enc *Encoder) {
		for _, r := range []any{
			&Process{Pid: 42, Threads: 1, Comm: "x", Exe: "/bin/x"},
			&Thread{Tid: 42, Regs: make([]uint64, 27)},
			&VMA{Start: 0x1000, End: 0x8000, Prot: 3, Kind: VMAAnon},
		} {
			if err := enc.Write(r); err != nil {
				t.Fatal(err)
			}
		}
	}
	tail := func(enc *Encoder) {
		if err := enc.Write(&FD{Fd: 3, Kind: FDFile, Path: "/tmp/f", Desc: 3}); err != nil {
			t.Fatal(err)
		}
		if err := enc.Close(); err != nil {
			t.Fatal(err)
		}
	}
	var plain bytes.Buffer
	enc := NewEncoder(&plain)
	head(enc)
	for _, r := range runs {
		if err := enc.WritePages(r.addr, r.data); err != nil {
			t.Fatal(err)
		}
	}
	tail(enc)
	want := plain.Bytes()

	// Another record while the sum is handed out is refused.
	enc = NewEncoder(io.Discard)
	head(enc)
	enc.BeginPages()
	if err := enc.Write(&FD{Fd: 3, Kind: FDFile, Path: "/tmp/f", Desc: 3}); err == nil {
		t.Fatal("a record written between BeginPages and EndPages: got no error")
	}

	summed := func(skipOne bool) []byte {
		var buf bytes.Buffer
		enc := NewEncoder(&buf)
		head(enc)
		sum := enc.BeginPages()
		for i, r := range runs {
			if !(skipOne && i == 1) {
				sum.Add(r.addr, r.data)
			}
			if err := enc.WriteSummedPages(r.addr, r.data); err != nil {
				t.Fatal(err)
			}
		}
		enc.EndPages(sum)
		tail(enc)
		return buf.Bytes()
	}
	if got := summed(false); !bytes.Equal(got, want) {
		t.Fatalf("summed pages: got %d bytes, want the %d bytes WritePages gives (equal: false)", len(got), len(want))
	}
	if _, err := decodeAll(want); err != nil {
		t.Fatalf("decode: %v", err)
	}
	if _, err := decodeAll(summed(true)); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("a run left out of the sum: got %v, want a checksum mismatch", err)
	}
}

// TestPrecopyTreeRecord: a tree's announcement comes back as written,
// ahead of its members' areas; one naming no process, or after the
// snapshot proper has begun, is corrupt.
func TestPrecopyTreeRecord(t *testing.T) {
	encode := func(recs ...any) []byte {
		var buf bytes.Buffer
		enc := NewEncoder(&buf)
		for _, r := range recs {
			if err := enc.Write(r); err != nil {
				t.Fatal(err)
			}
		}
		if err := enc.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	ann := &PrecopyTree{Procs: []PrecopyProc{{Pid: 1, Pgid: 1, Sid: 1}, {Pid: 2, PPid: 1, Pgid: 1, Sid: 1}}, Avoid: [][2]uint64{{0x1000, 0x3000}}}
	recs := []any{ann, &PrecopyMember{Pid: 2}, &PrecopyArea{Start: 0x10000, End: 0x20000}}
	got, err := decodeAll(encode(append(recs, &Process{Pid: 1, Threads: 1}, &Thread{Tid: 1})...))
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range recs {
		if !reflect.DeepEqual(got[i], r) {
			t.Errorf("record %d: got %+v, want %+v", i, got[i], r)
		}
	}
	for name, recs := range map[string][]any{
		"no process":     {&PrecopyTree{}},
		"pid 0":          {&PrecopyTree{Procs: []PrecopyProc{{Pid: 0}}}},
		"after the tree": {&Tree{Procs: []TreeProc{{Pid: 1, Threads: 1}}}, ann},
	} {
		if _, err := decodeAll(encode(recs...)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: got %v, want a corrupt snapshot error", name, err)
		}
	}
	if TypePrecopyTree&Skippable == 0 {
		t.Errorf("the precopy tree record is not skippable: a reader that does not know it must be able to ignore it")
	}
}
