package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"reflect"
	"testing"
)

func sample(t testing.TB) []byte {
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	recs := []any{
		&Process{Pid: 42, Comm: "x", Exe: "/bin/x", Rlimits: []Rlimit{{1, 2}}, Creds: Creds{Uid: [4]uint32{1000, 1000, 1000, 1000}}},
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
		enc.Write(&Process{Pid: 1})
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
	enc.Write(&Process{Pid: 1})
	enc.Close()
	recs, err := decodeAll(buf.Bytes())
	if err != nil || len(recs) != 2 {
		t.Fatalf("got %d records, %v; want the process and end records", len(recs), err)
	}
}

// TestTreeRoundTrip: a tree record, a shared area's identity and a pipe's
// fields survive encoding.
func TestTreeRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	tree := &Tree{Procs: []TreeProc{{Pid: 10, PPid: 1, Pgid: 10, Sid: 10, Threads: 2}, {Pid: 11, PPid: 10, Pgid: 10, Sid: 10, Zombie: true, ExitStatus: 0x300}}}
	recs := []any{tree, &VMA{Start: 0x1000, End: 0x2000, Kind: VMASharedAnon, Shared: true, Shm: 77},
		&FD{Fd: 4, Kind: FDPipe, Pipe: 99, PipeSize: 65536, PipeData: []byte("seq 1\n")}}
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
	if len(got) != 4 {
		t.Fatalf("got %d records, want 4", len(got))
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
