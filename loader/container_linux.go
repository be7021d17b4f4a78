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
	// hostProc: this host's /proc is bound on the container's until then
	// (a pivoted root has no other).
	hostProc bool
	// prefix is where the container's root is while its mounts are made
	// before the stub pivots into it ("" once it has, or without a pivot).
	prefix string
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

// inContainerNet runs fn in the container's new network namespace (on the
// thread holding it), or here when the restore makes none: a socket pthaw
// makes for the members must be in theirs.
func (p *Process) inContainerNet(fn func() error) error {
	if c := p.ctrOf(); c != nil && c.img.Net != nil && c.th != nil {
		return c.th.Do(fn)
	}
	return fn()
}

// containerPath returns how pthaw reaches path as the tree sees it: path
// itself, or in a container's own mount namespace /proc/self/fd/N/BASE,
// N a directory of pthaw's opened there (under the root member's root,
// never above it); done closes it.
func (p *Process) containerPath(name string) (string, func(), error) {
	c := p.ctrOf()
	if c == nil || c.img.Mount == nil || !strings.HasPrefix(name, "/") {
		return name, func() {}, nil
	}
	root, err := unix.Open(procfs.Path(p.pid, "root"), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, err
	}
	dir, err := unix.Openat2(root, path.Dir(name), &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
	unix.Close(root)
	if err != nil {
		return "", nil, err
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", dir, path.Base(name)), func() { unix.Close(dir) }, nil
}

// containerIPC returns the thread holding the container's new IPC
// namespace, or nil when the restore makes none.
func (p *Process) containerIPC() *nsthread.Thread {
	if c := p.ctrOf(); c != nil && c.img.IPC != nil {
		return c.th
	}
	return nil
}

// stubFiles opens the namespaces the stub is to join, passed as fds it
// starts with (closed by the caller once it has started).
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
// namespaces (its fds first, first+1...) and rebuilds the mount table in
// its new mount namespace. Runs on the tracer thread.
func (p *Process) enterContainer(c *container, first int) error {
	for i, k := range c.kinds {
		fd := uintptr(first + i)
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
	switch m.Mounts[0].Kind {
	case image.MountBind:
		return p.pivotMounts(m)
	case image.MountHost:
	default:
		return fmt.Errorf("%w: the container's root is a %v mount", image.ErrCorrupt, m.Mounts[0].Kind)
	}
	if err := p.hostMounts(m); err != nil {
		return err
	}
	for i := range m.Mounts {
		s := &m.Mounts[i]
		if s.Kind == image.MountHost {
			continue
		}
		if p.late(m, i) {
			continue
		}
		if err := p.makeMount(s, s.Point); err != nil {
			return err
		}
		if err := p.propagate(s); err != nil {
			return err
		}
	}
	return nil
}

// late reports whether mount i is made only when the tree starts (and
// notes it): the container's proc, and mounts above one. While the tree
// is built its members open pthaw's files through this host's /proc.
func (p *Process) late(m *image.MountNamespace, i int) bool {
	s := &m.Mounts[i]
	for _, j := range p.ctr.late {
		if d := &m.Mounts[j]; d.Kind == image.MountProc && under(s.Point, d.Point) {
			p.ctr.late = append(p.ctr.late, i)
			return true
		}
	}
	if s.Kind == image.MountProc {
		p.ctr.late = append(p.ctr.late, i)
		return true
	}
	return false
}

// hostMounts makes the copy of pthaw's mount table the container's host
// mounts: those it had must be here, those it did not have are detached,
// and each gets its saved propagation (before the container's own mounts
// may hide it). Runs on the tracer thread.
func (p *Process) hostMounts(m *image.MountNamespace) error {
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
	missing := map[int]bool{}
	for i, s := range m.Mounts {
		if s.Kind != image.MountHost {
			continue
		}
		k := mountKey(s.Point, s.FSType, s.Source, s.Root)
		if have[k] > 0 {
			have[k]--
			continue
		}
		if s.FSType == "nsfs" {
			// A namespace file bound by ip netns: those come and go.
			p.notice("mount %s (a namespace file) of the container is not on this host: left out", s.Point)
			missing[i] = true
			continue
		}
		return fmt.Errorf("mount %s (%s from %s, root %s) of the container is not on this host", s.Point, s.FSType, s.Source, s.Root)
	}
	// Children first.
	for i := len(extra) - 1; i >= 0; i-- {
		a, err := p.putStrings(extra[i])
		if err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_UMOUNT2, a[0], unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("mount namespace: detach %s (not the container's): %w", extra[i], err)
		}
	}
	for i := range m.Mounts {
		if s := &m.Mounts[i]; s.Kind == image.MountHost && !missing[i] {
			if err := p.propagate(s); err != nil {
				return err
			}
		}
	}
	return nil
}

// pivotMounts builds the table of a container whose root is a bind mount
// of a host directory (a runtime's container: pivot_root'ed into its
// rootfs). Its mounts are made under that directory, the host's /proc
// bound for the while on the container's (see late), then the stub
// pivots into it and lets the host's whole tree go. Runs on the tracer
// thread.
func (p *Process) pivotMounts(m *image.MountNamespace) error {
	root := &m.Mounts[0]
	newRoot := root.BindFrom
	if err := p.makeMount(root, newRoot); err != nil {
		return err
	}
	p.ctr.prefix = newRoot
	defer func() { p.ctr.prefix = "" }()
	for i := 1; i < len(m.Mounts); i++ {
		s := &m.Mounts[i]
		if s.Kind == image.MountHost {
			return fmt.Errorf("mount %s (%s from %s) of the container is inherited from its host under a changed root: not carried", s.Point, s.FSType, s.Source)
		}
		if p.late(m, i) {
			if s.Kind == image.MountProc && s.Point == "/proc" && !p.ctr.hostProc {
				if err := p.mount("/proc", path.Join(newRoot, "proc"), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
					return fmt.Errorf("bind this host's /proc for the build: %w", err)
				}
				p.ctr.hostProc = true
			}
			continue
		}
		if err := p.makeMount(s, path.Join(newRoot, s.Point)); err != nil {
			return err
		}
	}
	a, err := p.putStrings(newRoot, ".", "/")
	if err != nil {
		return err
	}
	if _, err := p.call(unix.SYS_CHDIR, a[0]); err != nil {
		return fmt.Errorf("chdir %s: %w", newRoot, err)
	}
	if _, err := p.call(unix.SYS_PIVOT_ROOT, a[1], a[1]); err != nil {
		return fmt.Errorf("pivot_root into %s: %w", newRoot, err)
	}
	if _, err := p.call(unix.SYS_UMOUNT2, a[1], unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the host's root: %w", err)
	}
	if _, err := p.call(unix.SYS_CHDIR, a[2]); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	p.ctr.prefix = ""
	late := map[int]bool{}
	for _, i := range p.ctr.late {
		late[i] = true
	}
	for i := range m.Mounts {
		if !late[i] {
			if err := p.propagate(&m.Mounts[i]); err != nil {
				return err
			}
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
	if err := p.makeMount(s, s.Point); err != nil {
		return err
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
	if c.hostProc {
		a, err := p.putStrings("/proc")
		if err != nil {
			return err
		}
		if _, err := p.call(unix.SYS_UMOUNT2, a[0], unix.MNT_DETACH); err != nil {
			return fmt.Errorf("detach this host's /proc: %w", err)
		}
		c.hostProc = false
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

// makeMount makes one of the container's own mounts, at target (its
// point, or where it is before the stub pivots into the container's
// root). Runs on the tracer thread.
func (p *Process) makeMount(s *image.Mount, target string) error {
	if err := p.makeMountAt(s, target); err != nil {
		return fmt.Errorf("mount %s (%s): %w", s.Point, s.Kind, err)
	}
	return nil
}

func (p *Process) makeMountAt(s *image.Mount, target string) error {
	flags := uintptr(s.Flags & perMount)
	switch s.Kind {
	case image.MountProc, image.MountSysfs, image.MountMqueue, image.MountCgroup2:
		return p.mount(s.Source, target, s.FSType, flags, "")
	case image.MountDevpts:
		// A new instance, never the host's.
		opts := "newinstance"
		if s.Options != "" {
			opts += "," + s.Options
		}
		return p.mount(s.Source, target, "devpts", flags, opts)
	case image.MountInner:
		// The container's path, under its root while the stub is not
		// in it yet.
		from := path.Join(p.ctr.prefix, s.BindFrom)
		if err := p.mount(from, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", s.BindFrom, err)
		}
		if flags&(unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC) != 0 {
			return p.mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|flags, "")
		}
		return nil
	case image.MountTmpfs:
		if err := p.mount(s.Source, target, "tmpfs", flags&^unix.MS_RDONLY, s.Options); err != nil {
			return err
		}
		if err := p.fillTmpfs(s, target); err != nil {
			return err
		}
		if flags&unix.MS_RDONLY != 0 {
			return p.mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|flags, "")
		}
		return nil
	case image.MountBind:
		if err := p.mount(s.BindFrom, target, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s: %w", s.BindFrom, err)
		}
		if flags&(unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC) != 0 {
			return p.mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|flags, "")
		}
		return nil
	}
	return fmt.Errorf("%w: mount kind %d", image.ErrCorrupt, s.Kind)
}

// fillTmpfs writes a tmpfs's saved files into it, from pthaw, through
// the stub's root (/proc/STUB/root): every path is resolved inside the
// new tmpfs (mounted at target), never through a link or onto another
// mount.
func (p *Process) fillTmpfs(s *image.Mount, target string) error {
	root, err := unix.Open(procfs.Path(p.pid, "root"), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(root)
	top, err := unix.Openat2(root, target, &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
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
		if f.HardLink != "" {
			err = linkTmpfsFile(dir, &f, beneath)
		} else {
			err = writeTmpfsFile(dir, &f)
		}
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

// statelessDevs are the character devices a container's tmpfs may hold
// (capture's list): null, zero, full, random, urandom, tty, ptmx.
var statelessDevs = map[[2]uint32]bool{{1, 3}: true, {1, 5}: true, {1, 7}: true, {1, 8}: true, {1, 9}: true, {5, 0}: true, {5, 2}: true}

// linkTmpfsFile makes f in the directory dir a hard link to the earlier
// file it names, its directory found with beneath.
func linkTmpfsFile(dir int, f *image.MountFile, beneath func(string) (int, error)) error {
	from, err := beneath(path.Dir(f.HardLink))
	if err != nil {
		return err
	}
	defer unix.Close(from)
	if err := unix.Linkat(from, path.Base(f.HardLink), dir, path.Base(f.Path), 0); err != nil {
		return fmt.Errorf("link to %s: %w", f.HardLink, err)
	}
	return nil
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
	case unix.S_IFCHR:
		if !statelessDevs[[2]uint32{unix.Major(f.Rdev), unix.Minor(f.Rdev)}] {
			return fmt.Errorf("%w: character device %d:%d", image.ErrCorrupt, unix.Major(f.Rdev), unix.Minor(f.Rdev))
		}
		if err := unix.Mknodat(dir, name, unix.S_IFCHR|0o600, int(f.Rdev)); err != nil {
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
