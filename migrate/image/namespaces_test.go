package image

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// decodeRecs encodes recs and decodes them back, returning what came out
// and the first error.
func decodeRecs(t *testing.T, recs ...any) ([]any, error) {
	t.Helper()
	var buf bytes.Buffer
	enc := NewEncoder(&buf)
	for _, r := range recs {
		if err := enc.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	enc.Close()
	dec := NewDecoder(&buf)
	var out []any
	for {
		rec, err := dec.Next()
		if err != nil {
			return out, err
		}
		out = append(out, rec)
		if _, ok := rec.(*End); ok {
			return out, nil
		}
	}
}

func containerNS() *Namespaces {
	return &Namespaces{
		UTS: &UTSNamespace{Hostname: "box", Domainname: "(none)"},
		IPC: &IPCNamespace{},
		Net: &NetNamespace{LoUp: true, Addrs: []string{"127.0.0.1/8"}},
		Mount: &MountNamespace{Mounts: []Mount{
			{Kind: MountHost, Point: "/", FSType: "ext4", Source: "/dev/vda", Root: "/"},
			{Kind: MountTmpfs, Point: "/mnt", FSType: "tmpfs", Source: "none", Root: "/", Options: "size=1m",
				Files: []MountFile{{Path: "d", Mode: 0o40755}, {Path: "d/x", Mode: 0o100644, Data: []byte("hi")}}},
		}},
	}
}

// TestNamespacesRecord: a container's namespaces record comes back as
// written after a tree whose root is pid 1; anywhere else, or with a path
// that leaves its tmpfs, it is corrupt.
func TestNamespacesRecord(t *testing.T) {
	tree := &Tree{Procs: []TreeProc{{Pid: 1, Threads: 1}}}
	out, err := decodeRecs(t, tree, containerNS())
	if len(out) < 2 || !reflect.DeepEqual(out[1], containerNS()) {
		t.Fatalf("got %#v (%v), want the tree and its namespaces", out, err)
	}
	bad := func(name string, recs ...any) {
		t.Helper()
		if _, err := decodeRecs(t, recs...); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: got %v, want a corrupt snapshot", name, err)
		}
	}
	bad("without a tree", containerNS())
	bad("twice", tree, containerNS(), containerNS())
	bad("root not pid 1", &Tree{Procs: []TreeProc{{Pid: 5, Threads: 1}}}, containerNS())
	for _, p := range []string{"../etc/passwd", "/etc/passwd", "d/../../x", "", "d//x"} {
		ns := containerNS()
		ns.Mount.Mounts[1].Files[1].Path = p
		bad("file "+p, tree, ns)
	}
	ns := containerNS()
	ns.Mount.Mounts[0].Point = "/mnt"
	bad("no root mount", tree, ns)
	ns = containerNS()
	ns.Mount.Mounts[0].Kind = MountTmpfs
	bad("tmpfs root", tree, ns)
	ns = containerNS()
	ns.Mount.Mounts[1].Kind = MountBind
	ns.Mount.Mounts[1].BindFrom = "rel"
	bad("relative bind source", tree, ns)
}
