package capture

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/nsthread"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// Containers. A PID namespace frozen whole (pidns_linux.go) may also have
// UTS, IPC, network and mount namespaces of its own: the shape of a
// container. Each of these that differs from pfreeze's is carried when it
// is the container's alone — every member in it, no process outside the
// tree in it — and described in an image.Namespaces record after the
// tree record; the restore makes it new. One that is pfreeze's own is
// not carried (the restored tree gets the restorer's, as a process
// outside a container does). A member in a namespace of another kind than
// its init's, or an outsider in the container's, is refused by name.
//
// What each carries (CRIU's uts_ns.c, ipc_ns.c, net.c and mount.c do the
// same things their own way):
//   - uts: the host and domain names;
//   - ipc: the System V shared memory segments the members attach (their
//     File records, read in the namespace); semaphores, message queues,
//     segments nobody attaches and POSIX message queues are refused;
//   - net: lo, up or down, with its addresses; any other interface is
//     refused. Sockets are the members' fds, re-created in the new one;
//   - mnt: the mount table of /proc/PID/mountinfo: mounts inherited from
//     pfreeze's namespace by reference; proc, sysfs and mqueue mounted
//     anew; tmpfs with its options and its contents; bind mounts of host
//     paths; each with its flags and propagation. Anything else is
//     refused.

// containerKinds are the namespaces a container carries besides PID.
var containerKinds = []string{"uts", "ipc", "net", "mnt"}

// maxTmpfsBytes bounds the contents of a container's tmpfs mounts (they
// travel in one record).
const maxTmpfsBytes = 48 << 20

// nsLink reads pid's namespace link of kind (through a live thread when
// its main one has exited).
func nsLink(pid int, kind string) (string, error) {
	return os.Readlink(procfs.Path(live(pid), "ns/"+kind))
}

// live returns the thread through which pid's /proc is read: pid, or a
// live thread of it when its main thread has exited (procfs.Reader).
func live(pid int) int {
	if rd := procfs.Reader(pid); rd > 0 {
		return rd
	}
	return pid
}

// containerNS returns the namespaces (kind -> link) of the init root of a
// frozen PID namespace that are not pfreeze's own.
func containerNS(root int) (map[string]string, error) {
	own := map[string]string{}
	for _, kind := range containerKinds {
		mine, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			return nil, fmt.Errorf("%s namespace: %w", kind, err)
		}
		theirs, err := nsLink(root, kind)
		if err != nil {
			return nil, fmt.Errorf("%s namespace: %w", kind, err)
		}
		if theirs != mine {
			own[kind] = theirs
		}
	}
	return own, nil
}

// checkMemberNS refuses a member of a frozen PID namespace that is not in
// its init's namespaces.
func (t *FrozenTree) checkMemberNS(pid int) error {
	if pid == t.Pid {
		return nil
	}
	for _, kind := range containerKinds {
		root, err1 := nsLink(t.Pid, kind)
		theirs, err2 := nsLink(pid, kind)
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("%s namespace: %w", kind, err)
		}
		if root != theirs {
			return unsupported("in another %s namespace than its container's init %d (a nested namespace is not carried)", kind, t.Pid)
		}
	}
	return nil
}

// checkOutsiders refuses a container whose namespaces a process outside
// the tree (in) shares: moving them would take them from it.
func (t *FrozenTree) checkOutsiders(in map[int]bool) error {
	if len(t.ctrNS) == 0 {
		return nil
	}
	launcher := t.launcher()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || in[pid] || pid == launcher {
			continue
		}
		for _, kind := range containerKinds {
			ns := t.ctrNS[kind]
			if ns == "" {
				continue
			}
			if theirs, err := nsLink(pid, kind); err == nil && theirs == ns {
				return unsupported("pid %d, outside the tree, shares the %s namespace of %d (%s): a namespace is carried only whole", pid, kind, t.Pid, ns)
			}
		}
	}
	return nil
}

// launcher returns the root's parent when it only waits for the root, its
// one child: a launcher such as unshare --fork, which made the namespaces
// and stays in them, running nothing there but the wait. It is left out of
// the outsiders (0 when there is none).
func (t *FrozenTree) launcher() int {
	st, err := procfs.Status(t.Pid)
	if err != nil {
		return 0
	}
	ppid, _ := strconv.Atoi(st["PPid"])
	if ppid <= 1 {
		return 0
	}
	wchan, err := os.ReadFile(procfs.Path(ppid, "wchan"))
	if err != nil || string(wchan) != "do_wait" {
		return 0
	}
	pst, err := procfs.Status(ppid)
	if err != nil || pst["Threads"] != "1" {
		return 0
	}
	if kids, err := procfs.Children(ppid); err != nil || len(kids) != 1 || kids[0] != t.Pid {
		return 0
	}
	return ppid
}

// namespaces describes the container's own namespaces, or returns nil
// when it has none but PID.
func (t *FrozenTree) namespaces() (*image.Namespaces, error) {
	if len(t.ctrNS) == 0 {
		return nil, nil
	}
	n := &image.Namespaces{}
	var err error
	rd := live(t.Pid)
	if t.ctrNS["uts"] != "" {
		if n.UTS, err = readUTS(rd); err != nil {
			return nil, fmt.Errorf("uts namespace: %w", err)
		}
	}
	if t.ctrNS["ipc"] != "" {
		if err := checkIPC(rd); err != nil {
			return nil, fmt.Errorf("ipc namespace: %w", err)
		}
		n.IPC = &image.IPCNamespace{}
	}
	if t.ctrNS["net"] != "" {
		if n.Net, err = readNet(rd); err != nil {
			return nil, fmt.Errorf("net namespace: %w", err)
		}
	}
	if t.ctrNS["mnt"] != "" {
		if n.Mount, err = readMounts(rd); err != nil {
			return nil, fmt.Errorf("mount namespace: %w", err)
		}
	}
	return n, nil
}

func readUTS(pid int) (*image.UTSNamespace, error) {
	th, err := nsthread.Enter(pid, "uts")
	if err != nil {
		return nil, err
	}
	defer th.Close()
	var u unix.Utsname
	if err := th.Do(func() error { return unix.Uname(&u) }); err != nil {
		return nil, err
	}
	return &image.UTSNamespace{Hostname: unix.ByteSliceToString(u.Nodename[:]), Domainname: unix.ByteSliceToString(u.Domainname[:])}, nil
}

// checkIPC refuses the System V objects and POSIX message queues of pid's
// IPC namespace that the snapshot does not carry: every semaphore set and
// message queue, and the shared memory segments no member attaches (a
// segment attached by a member travels as its File record).
func checkIPC(pid int) error {
	th, err := nsthread.Enter(pid, "ipc")
	if err != nil {
		return err
	}
	defer th.Close()
	return th.Do(func() error {
		for _, o := range []struct{ file, what string }{{"sem", "semaphore set"}, {"msg", "message queue"}, {"shm", "shared memory segment"}} {
			b, err := os.ReadFile("/proc/sysvipc/" + o.file)
			if err != nil {
				return err
			}
			for _, line := range strings.Split(string(b), "\n")[1:] {
				// key id ...; shm's nattch is field 7.
				f := strings.Fields(line)
				if len(f) < 2 || (o.file == "shm" && len(f) > 6 && f[6] != "0") {
					continue
				}
				key, _ := strconv.ParseInt(f[0], 10, 64)
				what := o.what
				if o.file == "shm" {
					what += " attached by no member"
				}
				return unsupported("System V %s %s (key %#x) is not carried", what, f[1], uint32(key))
			}
		}
		names, err := mqueueNames()
		if err != nil {
			return fmt.Errorf("posix message queues: %w", err)
		}
		if len(names) > 0 {
			return unsupported("POSIX message queue /%s is not carried", names[0])
		}
		return nil
	})
}

// mqueueNames lists the POSIX message queues of the calling thread's IPC
// namespace, through an mqueue mount of its own that is never attached
// anywhere.
func mqueueNames() ([]string, error) {
	fsfd, err := unix.Fsopen("mqueue", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("fsopen: %w", err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return nil, fmt.Errorf("fsconfig: %w", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fsmount: %w", err)
	}
	defer unix.Close(mfd)
	// The mount fd is a path only: open its root to read it.
	dfd, err := unix.Openat(mfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open: %w", err)
	}
	dir := os.NewFile(uintptr(dfd), "mqueue")
	defer dir.Close()
	return dir.Readdirnames(-1)
}

// readNet describes pid's network namespace: lo, and nothing else.
func readNet(pid int) (*image.NetNamespace, error) {
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("interfaces: %w", err)
	}
	out := &image.NetNamespace{}
	for _, l := range links {
		a := l.Attrs()
		if a.Name != "lo" {
			return nil, unsupported("interface %s (%s) is not carried (only lo)", a.Name, l.Type())
		}
		out.LoUp = a.Flags&net.FlagUp != 0
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("addresses of lo: %w", err)
		}
		for _, ad := range addrs {
			out.Addrs = append(out.Addrs, ad.IPNet.String())
		}
	}
	return out, nil
}

// mountKey identifies a mount inherited from pfreeze's namespace.
func mountKey(m *procfs.Mount) string {
	return m.Point + "\x00" + m.FSType + "\x00" + m.Source + "\x00" + m.Root + "\x00" + m.Dev
}

// mountFlags maps mountinfo's per-mount options to MS_* flags.
var mountFlags = map[string]uint64{"ro": unix.MS_RDONLY, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC, "noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME,
	"relatime": unix.MS_RELATIME, "strictatime": unix.MS_STRICTATIME}

// readMounts describes pid's mount table.
func readMounts(pid int) (*image.MountNamespace, error) {
	host, err := procfs.Mountinfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	theirs, err := procfs.Mountinfo(procfs.Path(pid, "mountinfo"))
	if err != nil {
		return nil, err
	}
	inherited := map[string]int{}
	for _, m := range host {
		inherited[mountKey(&m)]++
	}
	out := &image.MountNamespace{}
	total, tmpfsDev := 0, map[string]string{}
	// ownDev: the first of the container's own mounts of each device.
	ownDev := map[string]*procfs.Mount{}
	for _, m := range theirs {
		r := image.Mount{Point: m.Point, FSType: m.FSType, Source: m.Source, Root: m.Root}
		for _, o := range strings.Split(m.Opts, ",") {
			r.Flags |= mountFlags[o]
		}
		if r.Flags&(unix.MS_RELATIME|unix.MS_NOATIME) == 0 {
			// mountinfo shows no strictatime: it is the want of both.
			r.Flags |= unix.MS_STRICTATIME
		}
		for _, o := range m.Optional {
			switch {
			case strings.HasPrefix(o, "shared:"):
				r.Shared = true
			case strings.HasPrefix(o, "master:"):
				r.Slave = true
			}
		}
		what := fmt.Sprintf("mount %s (%s from %s)", m.Point, m.FSType, m.Source)
		inner := ownDev[m.Dev]
		innerRel, isInner := "", false
		if inner != nil {
			innerRel, isInner = strings.CutPrefix(m.Root, inner.Root)
			isInner = isInner && (innerRel == "" || strings.HasPrefix(innerRel, "/") || inner.Root == "/")
		}
		switch {
		case inherited[mountKey(&m)] > 0:
			inherited[mountKey(&m)]--
			r.Kind = image.MountHost
		case isInner:
			// A part of one of its own mounts bound again: a runtime's
			// read-only /proc/sys.
			r.Kind, r.BindFrom = image.MountInner, path.Join(inner.Point, innerRel)
		case m.FSType == "devpts":
			r.Kind, r.Options = image.MountDevpts, fsOptions(m.Super)
		case m.FSType == "cgroup2":
			r.Kind = image.MountCgroup2
		case m.FSType == "proc":
			r.Kind = image.MountProc
		case m.FSType == "sysfs":
			r.Kind = image.MountSysfs
		case m.FSType == "mqueue":
			r.Kind = image.MountMqueue
		case m.FSType == "tmpfs":
			if m.Root != "/" || tmpfsDev[m.Dev] != "" {
				return nil, unsupported("%s: a tmpfs mounted again (of %s) is not carried", what, tmpfsDev[m.Dev])
			}
			tmpfsDev[m.Dev] = m.Point
			r.Kind, r.Options = image.MountTmpfs, fsOptions(m.Super)
			if r.Files, err = readTmpfs(pid, m.Point, &total); err != nil {
				return nil, fmt.Errorf("%s: %w", what, err)
			}
		default:
			from := bindSource(host, &m)
			if from == "" {
				return nil, unsupported("%s is not carried (only mounts inherited from pfreeze's namespace, proc, sysfs, mqueue, devpts, cgroup2, tmpfs and bind mounts of host paths or of its own mounts)", what)
			}
			r.Kind, r.BindFrom = image.MountBind, from
		}
		if r.Slave && r.Kind != image.MountHost && r.Kind != image.MountBind && r.Kind != image.MountInner {
			return nil, unsupported("%s is a slave of another mount: not carried", what)
		}
		if r.Kind != image.MountHost && ownDev[m.Dev] == nil {
			ownDev[m.Dev] = &procfs.Mount{Root: m.Root, Point: m.Point}
		}
		out.Mounts = append(out.Mounts, r)
	}
	if len(out.Mounts) == 0 || out.Mounts[0].Point != "/" {
		return nil, fmt.Errorf("mountinfo of %d does not start with its root", pid)
	}
	if k := out.Mounts[0].Kind; k != image.MountHost && k != image.MountBind {
		return nil, unsupported("its root, a %s mount, is not carried (only pfreeze's root or a host directory)", out.Mounts[0].FSType)
	}
	return out, nil
}

// fsOptions are a filesystem's options to mount it with again: its
// mountinfo super options but rw/ro, which are the mount's.
func fsOptions(super string) string {
	var opts []string
	for _, o := range strings.Split(super, ",") {
		if o != "rw" && o != "ro" {
			opts = append(opts, o)
		}
	}
	return strings.Join(opts, ",")
}

// statelessDevs are the character devices a container's tmpfs (a
// runtime's /dev) may hold: null, zero, full, random, urandom, tty, ptmx.
var statelessDevs = map[[2]uint32]bool{{1, 3}: true, {1, 5}: true, {1, 7}: true, {1, 8}: true, {1, 9}: true, {5, 0}: true, {5, 2}: true}

// bindSource returns where on this host the mount m (of the container's)
// shows a directory or file: the host mount of the same device whose root
// holds m's root, and m's root below it.
func bindSource(host []procfs.Mount, m *procfs.Mount) string {
	for i := len(host) - 1; i >= 0; i-- {
		h := host[i]
		if h.Dev != m.Dev {
			continue
		}
		rel, ok := strings.CutPrefix(m.Root, h.Root)
		if !ok || (rel != "" && !strings.HasPrefix(rel, "/") && h.Root != "/") {
			continue
		}
		p := path.Join(h.Point, rel)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// readTmpfs reads the contents of the tmpfs mounted at point in pid's
// mount namespace, through /proc/PID/root; the mounts on its directories
// are their own (only the directories are kept), and its unix socket
// files are left out (a listener of the tree binds its own again). total counts the bytes
// of every tmpfs read so far.
func readTmpfs(pid int, point string, total *int) ([]image.MountFile, error) {
	top := filepath.Join(procfs.Path(pid, "root"), point)
	var dev uint64
	var st syscall.Stat_t
	if err := syscall.Lstat(top, &st); err != nil {
		return nil, err
	}
	dev = st.Dev
	var out []image.MountFile
	links := map[uint64]string{} // inode -> first path, of files with more than one
	err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == top {
			return nil
		}
		rel, _ := filepath.Rel(top, p)
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		f := image.MountFile{Path: rel, Mode: st.Mode, Uid: st.Uid, Gid: st.Gid, Mtime: st.Mtim.Sec*1e9 + st.Mtim.Nsec}
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			out = append(out, f)
			if st.Dev != dev {
				// Another mount's point: it keeps its own contents.
				out[len(out)-1].Mode = syscall.S_IFDIR | 0o755
				return fs.SkipDir
			}
			return nil
		case syscall.S_IFREG:
			if st.Dev != dev {
				return unsupported("%s: a file mounted over a file is not carried", rel)
			}
			if first, ok := links[st.Ino]; ok {
				f.HardLink = first
				break
			}
			if st.Nlink > 1 {
				links[st.Ino] = rel
			}
			if *total += int(st.Size); *total > maxTmpfsBytes {
				return unsupported("more than %d MiB in the container's tmpfs mounts: not carried", maxTmpfsBytes>>20)
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			f.Data = b
		case syscall.S_IFLNK:
			if f.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case syscall.S_IFCHR:
			if !statelessDevs[[2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)}] {
				return unsupported("%s is character device %d:%d: not carried", rel, unix.Major(st.Rdev), unix.Minor(st.Rdev))
			}
			f.Rdev = st.Rdev
		case syscall.S_IFSOCK:
			// A listening socket of the tree binds its file again; one
			// nobody in the container holds accepts nothing.
			return nil
		default:
			return unsupported("%s is a %s: not carried", rel, fileType(st.Mode))
		}
		out = append(out, f)
		return nil
	})
	return out, err
}

func fileType(mode uint32) string {
	switch mode & syscall.S_IFMT {
	case syscall.S_IFIFO:
		return "FIFO"
	case syscall.S_IFSOCK:
		return "unix socket"
	case syscall.S_IFCHR:
		return "character device"
	case syscall.S_IFBLK:
		return "block device"
	}
	return "file of unknown type"
}

// namesFile checks that path, from a /proc link of process pid, names
// the file st there, as pid sees it (through /proc/PID/root: in its mount
// namespace, a container's), where the restored process opens it again.
// For a process in ours that is pfreeze's own view. what is "open file" or
// "mapped file".
func namesFile(pid int, path string, st *syscall.Stat_t, what string) error {
	var pst syscall.Stat_t
	if err := syscall.Stat(procfs.Path(live(pid), "root")+path, &pst); err == nil && pst.Ino == st.Ino && pst.Dev == st.Dev {
		return nil
	}
	// A link shows the path from pfreeze's root when the file is
	// reachable from it: a host file outside a container's root.
	if err := syscall.Stat(path, &pst); err == nil && pst.Ino == st.Ino && pst.Dev == st.Dev {
		return fmt.Errorf("the %s is outside the process's mount namespace (a host file a container was given): it cannot be reopened there", what)
	}
	return fmt.Errorf("path no longer names the %s", what)
}

// diagSocket opens a sock_diag socket in pid's network namespace (a
// container's, when not ours: made by a thread of ours that entered it).
func diagSocket(pid int) (int, error) {
	open := func() (int, error) {
		return unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	}
	mine, err1 := os.Readlink("/proc/self/ns/net")
	theirs, err2 := nsLink(pid, "net")
	if err1 != nil || err2 != nil || mine == theirs {
		return open()
	}
	th, err := nsthread.Enter(live(pid), "net")
	if err != nil {
		return -1, err
	}
	defer th.Close()
	s := -1
	err = th.Do(func() (err error) {
		s, err = open()
		return err
	})
	return s, err
}

// readSysVIn is readSysV run in pid's IPC namespace when it is not ours
// (a container's): the segment's id means something only there.
func readSysVIn(pid int) func(id uint64, kind image.FileKind, name, src string) ([]image.File, error) {
	return func(id uint64, kind image.FileKind, name, src string) ([]image.File, error) {
		mine, err1 := os.Readlink("/proc/self/ns/ipc")
		theirs, err2 := nsLink(pid, "ipc")
		if err1 != nil || err2 != nil || mine == theirs {
			return readSysV(id, kind, name, src)
		}
		th, err := nsthread.Enter(live(pid), "ipc")
		if err != nil {
			return nil, err
		}
		defer th.Close()
		var out []image.File
		err = th.Do(func() (err error) {
			out, err = readSysV(id, kind, name, src)
			return err
		})
		return out, err
	}
}
