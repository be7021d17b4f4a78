package loader

import (
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/nsthread"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// A container (image.Namespaces after the tree record: a PID namespace
// frozen whole with UTS, IPC, network or mount namespaces of its own,
// capture/container_linux.go) is restored into new namespaces of each
// kind it had. The UTS, IPC and network ones are made first, as soon as
// the record is read, by a thread of pthaw's that holds them
// (internal/nsthread): the host name is set and lo configured there, and
// the System V segments the members' File records bring are made there,
// before any stub exists. The root's stub, started in new PID and mount
// namespaces, joins them by setns (the fds are its 4, 5, 6 at start);
// every member, forked from it, inherits all. The mount table is then
// rebuilt by calls injected into that stub, in its new mount namespace, a
// copy of pthaw's: first every mount is made a slave (nothing done in the
// container propagates to this host), the host mounts the container had
// are checked to be there and those it did not have are detached; then
// its own mounts are made again in order (proc, sysfs and mqueue afresh,
// tmpfs filled by pthaw through /proc/STUB/root, bind mounts of host
// paths) and each gets its saved propagation. Files open in the container
// are reopened by the members themselves, in it. The holding thread ends
// when the tree starts or is aborted; the namespaces live on in the tree.

// container is what a restored container has besides its tree.
type container struct {
	img *image.Namespaces
	// th holds the new UTS, IPC and network namespaces until the tree
	// starts (nil when the container has none of them).
	th *nsthread.Thread
	// kinds are the namespaces th holds, in the order the stub joins them.
	kinds []string
	// late are the mounts (indexes) made only when the tree starts: the
	// container's proc and those above it.
	late []int
}

// newContainer makes the container's UTS, IPC and network namespaces and
// sets them up. The tree must be restored into a new PID namespace.
func (p *Process) newContainer(ns *image.Namespaces) (*container, error) {
	if !p.opts.PIDNamespace {
		return nil, errors.New("the snapshot is a container (a PID namespace frozen with namespaces of its own): it is restored only into a new PID namespace")
	}
	c := &container{img: ns}
	if ns.UTS != nil {
		c.kinds = append(c.kinds, "uts")
	}
	if ns.IPC != nil {
		c.kinds = append(c.kinds, "ipc")
	}
	if ns.Net != nil {
		c.kinds = append(c.kinds, "net")
	}
	if len(c.kinds) == 0 {
		return c, nil
	}
	var err error
	if c.th, err = nsthread.New(c.kinds...); err != nil {
		return nil, err
	}
	if u := ns.UTS; u != nil {
		err = c.th.Do(func() error {
			if err := unix.Sethostname([]byte(u.Hostname)); err != nil {
				return fmt.Errorf("uts namespace: hostname %q: %w", u.Hostname, err)
			}
			if err := unix.Setdomainname([]byte(u.Domainname)); err != nil {
				return fmt.Errorf("uts namespace: domainname %q: %w", u.Domainname, err)
			}
			return nil
		})
	}
	if err == nil && ns.Net != nil {
		err = c.setupNet()
	}
	if err != nil {
		c.close()
		return nil, err
	}
	p.notice("restored the container in new %s namespaces", strings.Join(append(slices.Clone(c.kinds), c.mountKind()...), ", "))
	return c, nil
}

func (c *container) mountKind() []string {
	if c.img.Mount != nil {
		return []string{"mount"}
	}
	return nil
}

// setupNet brings lo up with its saved addresses in the new network
// namespace.
func (c *container) setupNet() error {
	n := c.img.Net
	ns, err := netns.GetFromPath(c.th.NSPath("net"))
	if err != nil {
		return fmt.Errorf("net namespace: %w", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("net namespace: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("net namespace: lo: %w", err)
	}
	if n.LoUp {
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("net namespace: lo up: %w", err)
		}
	}
	for _, a := range n.Addrs {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			return fmt.Errorf("%w: net namespace: lo address %q", image.ErrCorrupt, a)
		}
		if addr.IP.IsLoopback() {
			addr.Scope = unix.RT_SCOPE_HOST // as ip(8) gives them
		}
		if err := h.AddrReplace(lo, addr); err != nil {
			return fmt.Errorf("net namespace: lo address %s: %w", a, err)
		}
	}
	return nil
}

// close ends the thread holding the namespaces (they live on in the
// processes that joined them). Safe to call more than once.
func (c *container) close() {
	if c != nil && c.th != nil {
		c.th.Close()
		c.th = nil
	}
}

// ctrOf returns the container p is restored in, or nil.
func (p *Process) ctrOf() *container {
	if p.tree != nil && len(p.tree.members) > 0 {
		return p.tree.members[0].ctr
	}
	return p.ctr
}

// containerIPC returns the thread holding the container's new IPC
// namespace, or nil when the restore makes none.
func (p *Process) containerIPC() *nsthread.Thread {
	if c := p.ctrOf(); c != nil && c.img.IPC != nil {
		return c.th
	}
	return nil
}

// stubFiles opens the namespaces the stub is to join, passed as its fds
// 4, 5, ... (closed by the caller once it has started).
func (c *container) stubFiles() ([]*os.File, error) {
	var out []*os.File
	for _, k := range c.kinds {
		f, err := os.Open(c.th.NSPath(k))
		if err != nil {
			for _, f := range out {
				f.Close()
			}
			return nil, fmt.Errorf("%s namespace: %w", k, err)
		}
		out = append(out, f)
	}
	return out, nil
}

// cloneFlags are the namespaces the stub is started in besides PID.
func (c *container) cloneFlags() uintptr {
	if c != nil && c.img.Mount != nil {
		return unix.CLONE_NEWNS
	}
	return 0
}

// enterContainer makes the stub, just started, join the container's
// namespaces (its fds 4...) and rebuilds the mount table in its new mount
// namespace. Runs on the tracer thread.
func (p *Process) enterContainer(c *container) error {
	for i, k := range c.kinds {
		fd := uintptr(4 + i)
		if _, err := p.call(unix.SYS_SETNS, fd, 0); err != nil {
			return fmt.Errorf("join the new %s namespace: %w", k, err)
		}
		if _, err := p.call(unix.SYS_CLOSE, fd); err != nil {
			return fmt.Errorf("join the new %s namespace: close: %w", k, err)
		}
	}
	if c.img.Mount != nil {
		return p.buildMounts(c.img.Mount)
	}
	return nil
}

// putStrings writes NUL-terminated strings one after another into the
// stub's scratch page and returns their addresses (0 for ""; a NULL
// pointer where a call takes one).
func (p *Process) putStrings(ss ...string) ([]uintptr, error) {
	var buf []byte
	out := make([]uintptr, len(ss))
	for i, s := range ss {
		if s == "" {
			continue
		}
		out[i] = uintptr(p.base+stubScratchOff) + uintptr(len(buf))
		buf = append(append(buf, s...), 0)
	}
	if len(buf) > pageSize {
		return nil, fmt.Errorf("mount arguments too long: %q", ss)
	}
	if len(buf) > 0 {
		if err := p.mem.Write(p.base+stubScratchOff, buf); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// mount injects mount(2) into the stub.
func (p *Process) mount(source, target, fstype string, flags uintptr, data string) error {
	a, err := p.putStrings(source, target, fstype, data)
	if err != nil {
		return err
	}
	_, err = p.call(unix.SYS_MOUNT, a[0], a[1], a[2], flags, a[3])
	return err
}

// perMount are the flags a mount (not its filesystem) has.
const perMount = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_NODIRATIME | unix.MS_RELATIME | unix.MS_STRICTATIME

// mountKey identifies a host mount: where, what, from where.
func mountKey(point, fstype, source, root string) string {
	return point + "\x00" + fstype + "\x00" + source + "\x00" + root
}

// buildMounts rebuilds the container's mount table in the stub's new
// mount namespace. Runs on the tracer thread.
func (p *Process) buildMounts(m *image.MountNamespace) error {
	// Nothing made here may reach the host's mounts.
	if err := p.mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("mount namespace: make / a slave: %w", err)
	}
	cur, err := procfs.Mountinfo(procfs.Path(p.pid, "mountinfo"))
	if err != nil {
		return fmt.Errorf("mount namespace: %w", err)
	}
	want := map[string]int{}
	for _, s := range m.Mounts {
		if s.Kind == image.MountHost {
			want[mountKey(s.Point, s.FSType, s.Source, s.Root)]++
		}
	}
	have := map[string]int{}
	var extra []string
	for _, c := range cur {
		k := mountKey(c.Point, c.FSType, c.Source, c.Root)
		if want[k] > have[k] {
			have[k]++
			continue
		}
		extra = append(extra, c.Point)
	}
	for _, s := range m.Mounts {
		k := mountKey(s.Point, s.FSType, s.Source, s.Root)
		if s.Kind != image.MountHost || have[k] > 0 {
			have[k]--
			continue
		}
		if s.FSType == "nsfs" {
			// A namespace file bound by ip netns: those come and go.
			p.notice("mount %s (a namespace file) of the container is not on this host: left out", s.Point)
			continue
		}
		return fmt.Errorf("mount %s (%s from %s, root %s) of the container is not on this host", s.Point, s.FSType, s.Source, s.Root)
	}
	// The host's mounts the container did not have, children first.
	for i := len(extra) - 1; i >= 0; i-- {
		a, err := p.putStrings(extra[i])
		if err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_UMOUNT2, a[0], unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("mount namespace: detach %s (not the container's): %w", extra[i], err)
		}
	}
	// The host's mounts get their propagation before the container's own
	// mounts may hide them; each of those gets its own once made.
	for i := range m.Mounts {
		if s := &m.Mounts[i]; s.Kind == image.MountHost {
			if err := p.propagate(s); err != nil && s.FSType != "nsfs" {
				return err
			}
		}
	}
	var procs []string
	for i := range m.Mounts {
		s := &m.Mounts[i]
		if s.Kind == image.MountHost {
			continue
		}
		if s.Kind == image.MountProc || slices.ContainsFunc(procs, func(d string) bool { return under(s.Point, d) }) {
			// While the tree is built its members open pthaw's files
			// through this host's /proc: the container's comes last.
			if s.Kind == image.MountProc {
				procs = append(procs, s.Point)
			}
			p.ctr.late = append(p.ctr.late, i)
			continue
		}
		if err := p.makeOwnMount(s); err != nil {
			return err
		}
	}
	return nil
}

// under reports whether path p is d or below it.
func under(p, d string) bool {
	rel, ok := strings.CutPrefix(p, d)
	return ok && (rel == "" || strings.HasPrefix(rel, "/") || d == "/")
}

// makeOwnMount makes one of the container's own mounts with its
// propagation. Runs on the tracer thread.
func (p *Process) makeOwnMount(s *image.Mount) error {
	if err := p.makeMount(s); err != nil {
		return fmt.Errorf("mount %s (%s): %w", s.Point, s.Kind, err)
	}
	return p.propagate(s)
}

// lateMounts makes the container's proc mounts, and those above them,
// once the tree is built, just before it starts: called on the root,
// whose stub is still mapped. Runs on the tracer thread.
func (p *Process) lateMounts() error {
	c := p.ctr
	if c == nil || c.img.Mount == nil {
		return nil
	}
	for _, i := range c.late {
		if err := p.makeOwnMount(&c.img.Mount.Mounts[i]); err != nil {
			return err
		}
	}
	c.late = nil
	return nil
}

// propagate gives the mount at s.Point its saved propagation: shared
// (a peer group of its own), private, or a slave, which it is already
// (buildMounts made every host mount one, and a bind mount of one is).
// Runs on the tracer thread.
func (p *Process) propagate(s *image.Mount) error {
	var prop uintptr
	switch {
	case s.Shared:
		prop = unix.MS_SHARED
	case !s.Slave:
		prop = unix.MS_PRIVATE
	default:
		return nil
	}
	if err := p.mount("", s.Point, "", prop, ""); err != nil {
		return fmt.Errorf("mount %s: propagation: %w", s.Point, err)
	}
	return nil
}

// makeMount makes one of the container's own mounts. Runs on the tracer
// thread.
func (p *Process) makeMount(s *image.Mount) error {
	flags := uintptr(s.Flags & perMount)
	switch s.Kind {
	case image.MountProc, image.MountSysfs, image.MountMqueue:
		return p.mount(s.Source, s.Point, s.FSType, flags, "")
	case image.MountTmpfs:
		if err := p.mount(s.Source, s.Point, "tmpfs", flags&^unix.MS_RDONLY, s.Options); err != nil {
			return err
		}
		if err := p.fillTmpfs(s); err != nil {
			return err
		}
		if flags&unix.MS_RDONLY != 0 {
			return p.mount("", s.Point, "", unix.MS_REMOUNT|unix.MS_BIND|flags, "")
		}
		return nil
	case image.MountBind:
		if err := p.mount(s.BindFrom, s.Point, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", s.BindFrom, err)
		}
		if flags&(unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC) != 0 {
			return p.mount("", s.Point, "", unix.MS_REMOUNT|unix.MS_BIND|flags, "")
		}
		return nil
	}
	return fmt.Errorf("%w: mount kind %d", image.ErrCorrupt, s.Kind)
}

// fillTmpfs writes a tmpfs's saved files into it, from pthaw, through
// the stub's root (/proc/STUB/root): every path is resolved inside the
// new tmpfs, never through a link or onto another mount.
func (p *Process) fillTmpfs(s *image.Mount) error {
	root, err := unix.Open(procfs.Path(p.pid, "root"), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(root)
	top, err := unix.Openat2(root, s.Point, &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		return err
	}
	defer unix.Close(top)
	beneath := func(rel string) (int, error) {
		return unix.Openat2(top, rel, &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_XDEV | unix.RESOLVE_NO_MAGICLINKS})
	}
	for _, f := range s.Files {
		dir, err := beneath(path.Dir(f.Path))
		if err != nil {
			return fmt.Errorf("%s: %w", f.Path, err)
		}
		err = writeTmpfsFile(dir, &f)
		unix.Close(dir)
		if err != nil {
			return fmt.Errorf("%s: %w", f.Path, err)
		}
	}
	// Directories' times last: their entries changed them.
	for i := len(s.Files) - 1; i >= 0; i-- {
		f := &s.Files[i]
		if f.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		dir, err := beneath(path.Dir(f.Path))
		if err != nil {
			return fmt.Errorf("%s: %w", f.Path, err)
		}
		err = unix.UtimesNanoAt(dir, path.Base(f.Path), fileTimes(f.Mtime), unix.AT_SYMLINK_NOFOLLOW)
		unix.Close(dir)
		if err != nil {
			return fmt.Errorf("%s: times: %w", f.Path, err)
		}
	}
	return nil
}

func fileTimes(mtime int64) []unix.Timespec {
	t := unix.NsecToTimespec(mtime)
	return []unix.Timespec{t, t}
}

// writeTmpfsFile makes f in the directory dir.
func writeTmpfsFile(dir int, f *image.MountFile) error {
	name := path.Base(f.Path)
	perm := f.Mode & 0o7777
	switch f.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if err := unix.Mkdirat(dir, name, 0o700); err != nil {
			return err
		}
	case unix.S_IFREG:
		fd, err := unix.Openat(dir, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		file := os.NewFile(uintptr(fd), name)
		_, err = file.Write(f.Data)
		if cerr := file.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	case unix.S_IFLNK:
		if err := unix.Symlinkat(f.Link, dir, name); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: file mode %#o", image.ErrCorrupt, f.Mode)
	}
	if err := unix.Fchownat(dir, name, int(f.Uid), int(f.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("owner %d:%d: %w", f.Uid, f.Gid, err)
	}
	if f.Mode&unix.S_IFMT != unix.S_IFLNK {
		// After the owner: chown clears set-id bits.
		if err := unix.Fchmodat(dir, name, perm, 0); err != nil {
			return fmt.Errorf("mode %#o: %w", perm, err)
		}
	}
	return unix.UtimesNanoAt(dir, name, fileTimes(f.Mtime), unix.AT_SYMLINK_NOFOLLOW)
}

// containerFile returns how a path of the container's is checked from
// pthaw: the host path it shows (through a bind mount or a host mount),
// or the saved tmpfs file that will be at it (nil and "" for a path of a
// mount with nothing to check against, such as proc).
func (p *Process) containerFile(name string) (string, *image.MountFile) {
	c := p.ctrOf()
	if c == nil || c.img.Mount == nil {
		return name, nil
	}
	ms := c.img.Mount.Mounts
	for i := len(ms) - 1; i >= 0; i-- {
		s := &ms[i]
		if !under(name, s.Point) {
			continue
		}
		rel := strings.TrimPrefix(strings.TrimPrefix(name, s.Point), "/")
		switch s.Kind {
		case image.MountHost:
			return name, nil
		case image.MountBind:
			return path.Join(s.BindFrom, rel), nil
		case image.MountTmpfs:
			for j := range s.Files {
				if s.Files[j].Path == rel {
					return "", &s.Files[j]
				}
			}
		}
		return "", nil
	}
	return name, nil
}
