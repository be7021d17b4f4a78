package capture

import (
	"reflect"
	"testing"

	"github.com/pcluster/pcluster/migrate/image"
)

// TestSplitSeccomp: the filters every thread's chain starts with are the
// process's, shared; the rest each thread's own.
func TestSplitSeccomp(t *testing.T) {
	f := func(b byte, flags uint64) image.SeccompFilter {
		return image.SeccompFilter{Prog: []byte{b, 0, 0, 0, 0, 0, 0, 0}, Flags: flags}
	}
	a, b, c, d := f(1, 0), f(2, 2), f(3, 0), f(4, 0)
	for _, tc := range []struct {
		name   string
		chains [][]image.SeccompFilter
		shared []image.SeccompFilter
		own    [][]image.SeccompFilter
	}{
		{"one thread", [][]image.SeccompFilter{{a, b}}, []image.SeccompFilter{a, b}, [][]image.SeccompFilter{nil}},
		{"shared and own", [][]image.SeccompFilter{{a, b}, {a, b, c}}, []image.SeccompFilter{a, b}, [][]image.SeccompFilter{nil, {c}}},
		{"differ at once", [][]image.SeccompFilter{{c}, {d}}, []image.SeccompFilter{}, [][]image.SeccompFilter{{c}, {d}}},
		{"same program, other flags", [][]image.SeccompFilter{{a, b}, {a, f(2, 0)}}, []image.SeccompFilter{a}, [][]image.SeccompFilter{{b}, {f(2, 0)}}},
		{"a thread without", [][]image.SeccompFilter{{a}, nil}, []image.SeccompFilter{}, [][]image.SeccompFilter{{a}, nil}},
	} {
		p := &image.Process{}
		ths := make([]*image.Thread, len(tc.chains))
		for i := range ths {
			ths[i] = &image.Thread{}
		}
		splitSeccomp(p, ths, tc.chains)
		if len(p.Seccomp) != len(tc.shared) || (len(tc.shared) > 0 && !reflect.DeepEqual(p.Seccomp, tc.shared)) {
			t.Errorf("%s: shared %v, want %v", tc.name, p.Seccomp, tc.shared)
		}
		for i, th := range ths {
			if !reflect.DeepEqual(th.Seccomp, tc.own[i]) {
				t.Errorf("%s: thread %d has %v, want %v", tc.name, i, th.Seccomp, tc.own[i])
			}
		}
	}
}

// TestReturnsUserNotif finds a constant SECCOMP_RET_USER_NOTIF return.
func TestReturnsUserNotif(t *testing.T) {
	ret := func(k uint32) []byte {
		return []byte{0x06, 0, 0, 0, byte(k), byte(k >> 8), byte(k >> 16), byte(k >> 24)}
	}
	ld := []byte{0x20, 0, 0, 0, 0xc0, 0xff, 0xc0, 0x7f} // a load whose k looks like one
	if returnsUserNotif(append(ld, ret(0x7fff0000)...)) {
		t.Error("ALLOW-only program reported as USER_NOTIF")
	}
	if !returnsUserNotif(append(ret(0x7fff0000), ret(0x7fc00000)...)) {
		t.Error("USER_NOTIF return not found")
	}
}
