package image

import (
	"fmt"
	"io"
	"path"
	"strings"
)

// Namespaces follows the Tree record of a container: a tree frozen whole
// with its PID namespace (its root that namespace's init) that also has
// UTS, IPC, network or mount namespaces of its own, which no process
// outside it shares. Each set field is a namespace of the container's,
// made new by the restore; a nil one was the freezer's own, and the
// restored tree gets the restorer's.
type Namespaces struct {
	UTS   *UTSNamespace   `msgpack:"uts,omitempty"`
	IPC   *IPCNamespace   `msgpack:"ipc,omitempty"`
	Net   *NetNamespace   `msgpack:"net,omitempty"`
	Mount *MountNamespace `msgpack:"mnt,omitempty"`
}

// UTSNamespace holds the container's host and domain names.
type UTSNamespace struct {
	Hostname   string `msgpack:"hostname"`
	Domainname string `msgpack:"domainname"`
}

// IPCNamespace is a System V IPC namespace of the container's own. Its
// shared memory segments are the members' File records (FileSysV), made
// again in the new namespace; semaphores, message queues and POSIX
// message queues are refused at the freeze.
type IPCNamespace struct{}

// NetNamespace is a network namespace of the container's own, holding
// only the loopback interface (any other is refused at the freeze).
type NetNamespace struct {
	LoUp  bool     `msgpack:"lo_up"`
	Addrs []string `msgpack:"addrs,omitempty"` // lo's addresses, CIDR ("127.0.0.1/8")
}

// MountKind says how a mount of the container is made again.
type MountKind uint8

const (
	// MountHost was inherited from the freezer's mount namespace (same
	// mount point, filesystem, source and root): the restorer's must have
	// it too.
	MountHost MountKind = 1
	// MountProc is a procfs mounted by the container (of its own PID
	// namespace): mounted afresh.
	MountProc MountKind = 2
	// MountTmpfs is a tmpfs mounted by the container: mounted afresh
	// with its options and filled with its saved Files.
	MountTmpfs MountKind = 3
	// MountBind is a bind mount the container made of a host directory
	// or file (BindFrom, in the freezer's mount namespace).
	MountBind MountKind = 4
	// MountSysfs and MountMqueue are mounted afresh (of the new network
	// and IPC namespaces).
	MountSysfs  MountKind = 5
	MountMqueue MountKind = 6
	// MountInner is a bind mount of a path of another of the
	// container's own mounts (BindFrom, as the container sees it): a
	// runtime's read-only /proc/sys, a /dev/null masking a /proc file.
	MountInner MountKind = 7
	// MountDevpts is a devpts instance of the container's own, mounted
	// anew with its options; MountCgroup2 a cgroup2 mount, mounted anew
	// (of the restorer's cgroup namespace: cgroups are not carried).
	MountDevpts  MountKind = 8
	MountCgroup2 MountKind = 9
)

func (k MountKind) String() string {
	switch k {
	case MountHost:
		return "host"
	case MountProc:
		return "proc"
	case MountTmpfs:
		return "tmpfs"
	case MountBind:
		return "bind"
	case MountSysfs:
		return "sysfs"
	case MountMqueue:
		return "mqueue"
	case MountInner:
		return "bind within"
	case MountDevpts:
		return "devpts"
	case MountCgroup2:
		return "cgroup2"
	}
	return "unknown"
}

// MountNamespace is the container's mount table, in the order of its
// /proc/PID/mountinfo (every mount after the one it is mounted on).
type MountNamespace struct {
	Mounts []Mount `msgpack:"mounts"`
}

// Mount is one line of the container's mountinfo and how it is made.
type Mount struct {
	Kind    MountKind `msgpack:"kind"`
	Point   string    `msgpack:"point"`             // mount point, as the container sees it
	FSType  string    `msgpack:"fstype"`            // filesystem type
	Source  string    `msgpack:"source"`            // mount source (mountinfo field 10)
	Root    string    `msgpack:"root"`              // the mount's root within its filesystem
	Flags   uint64    `msgpack:"flags"`             // MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_*ATIME
	Options string    `msgpack:"options,omitempty"` // filesystem options of a tmpfs or devpts (size=, mode=...)
	// Propagation: shared (its own peer group) or a slave of the host's
	// peer group it was copied from; neither is private.
	Shared bool `msgpack:"shared,omitempty"`
	Slave  bool `msgpack:"slave,omitempty"`
	// BindFrom is a bind mount's source: a path on the freezer's host
	// (MountBind), or the container's (MountInner).
	BindFrom string `msgpack:"bind_from,omitempty"`
	// Files are a tmpfs's contents, every directory before its entries.
	Files []MountFile `msgpack:"files,omitempty"`
}

// MountFile is a directory, regular file, symbolic link or stateless
// character device (null, zero, full, random, urandom, tty: Rdev) in a
// tmpfs.
type MountFile struct {
	Rdev  uint64 `msgpack:"rdev,omitempty"`
	Path  string `msgpack:"path"` // relative to the mount point, clean, not ".."
	Mode  uint32 `msgpack:"mode"` // st_mode: type and permissions
	Uid   uint32 `msgpack:"uid"`
	Gid   uint32 `msgpack:"gid"`
	Mtime int64  `msgpack:"mtime"` // nanoseconds
	Link  string `msgpack:"link,omitempty"`
	Data  []byte `msgpack:"data,omitempty"`
	// HardLink names an earlier regular file of the same tmpfs this one
	// is a hard link to (its other fields repeat that file's).
	HardLink string `msgpack:"hardlink,omitempty"`
}

// MaxNamespacesLen bounds a Namespaces record, the contents of the
// container's tmpfs mounts included.
const MaxNamespacesLen = 64 << 20

// CheckNamespaces checks the bounds and paths of a Namespaces record: a
// restore writes a tmpfs's files by these paths.
func CheckNamespaces(n *Namespaces) error {
	if n.UTS != nil && (len(n.UTS.Hostname) > 64 || len(n.UTS.Domainname) > 64) {
		return corruptf("uts namespace: name longer than 64 bytes")
	}
	if n.Mount == nil {
		return nil
	}
	if len(n.Mount.Mounts) == 0 || n.Mount.Mounts[0].Point != "/" {
		return corruptf("mount namespace without its root")
	}
	if k := n.Mount.Mounts[0].Kind; k != MountHost && k != MountBind {
		return corruptf("mount namespace: its root is a %v mount", k)
	}
	for _, m := range n.Mount.Mounts {
		if !path.IsAbs(m.Point) || path.Clean(m.Point) != m.Point || m.Kind < MountHost || m.Kind > MountCgroup2 {
			return corruptf("mount %q (%v)", m.Point, m.Kind)
		}
		if (m.Kind == MountBind || m.Kind == MountInner) && (!path.IsAbs(m.BindFrom) || path.Clean(m.BindFrom) != m.BindFrom) {
			return corruptf("mount %q: bind source %q", m.Point, m.BindFrom)
		}
		if len(m.Files) > 0 && m.Kind != MountTmpfs {
			return corruptf("mount %q: files in a %v mount", m.Point, m.Kind)
		}
		seen := map[string]bool{}
		for _, f := range m.Files {
			if !relPath(f.Path) || (f.HardLink != "" && !seen[f.HardLink]) {
				return corruptf("mount %q: file %q", m.Point, f.Path)
			}
			seen[f.Path] = true
		}
	}
	return nil
}

// relPath reports whether p is a clean relative path that stays below
// where it starts.
func relPath(p string) bool {
	return p != "" && !path.IsAbs(p) && path.Clean(p) == p && p != ".." && !strings.HasPrefix(p, "../")
}

// describeNamespaces writes a container's namespaces for -debug.
func describeNamespaces(w io.Writer, n *Namespaces) {
	fmt.Fprintln(w, "Container namespaces:")
	if n.UTS != nil {
		fmt.Fprintf(w, "  uts: hostname %q domainname %q\n", n.UTS.Hostname, n.UTS.Domainname)
	}
	if n.IPC != nil {
		fmt.Fprintln(w, "  ipc: own (System V shared memory with the members' files)")
	}
	if n.Net != nil {
		fmt.Fprintf(w, "  net: lo up %v, addresses %v\n", n.Net.LoUp, n.Net.Addrs)
	}
	if n.Mount != nil {
		fmt.Fprintf(w, "  mnt: %d mounts\n", len(n.Mount.Mounts))
		for _, m := range n.Mount.Mounts {
			fmt.Fprintf(w, "    %s %s %s (%v) root %s flags %#x", m.Point, m.FSType, m.Source, m.Kind, m.Root, m.Flags)
			if m.Options != "" {
				fmt.Fprintf(w, " options %s", m.Options)
			}
			switch {
			case m.Shared && m.Slave:
				fmt.Fprint(w, " shared slave")
			case m.Shared:
				fmt.Fprint(w, " shared")
			case m.Slave:
				fmt.Fprint(w, " slave")
			default:
				fmt.Fprint(w, " private")
			}
			if m.BindFrom != "" {
				fmt.Fprintf(w, " from %s", m.BindFrom)
			}
			size := 0
			for _, f := range m.Files {
				size += len(f.Data)
			}
			if len(m.Files) > 0 {
				fmt.Fprintf(w, ", %d files, %d bytes", len(m.Files), size)
			}
			fmt.Fprintln(w)
		}
	}
}
