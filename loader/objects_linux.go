package loader

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/internal/nsthread"
	"github.com/pcluster/pcluster/migrate/image"
)

// Files no path leads to (image.File: memfds, deleted files) are made by
// pthaw as the snapshot brings them — a memfd with its name, a deleted
// file as an unnamed file (O_TMPFILE) in its directory, hidden from
// everyone — filled, sealed, and opened by the process through
// /proc/<pthaw>/fd/N (a new open file description of the same file, as
// for a tree's pipes) for each area that maps it and each fd that holds
// it. pthaw closes its own once the process is built (or aborted). A
// deleted file's copy reads "/dir/#inode (deleted)" in /proc, not its old
// name; its owner is pthaw's user.

// object is a File being made, held by pthaw.
type object struct {
	f     *os.File
	img   *image.File
	next  int64 // the offset of the next chunk
	ready bool  // sealed
	// A System V segment (sysvshm_linux.go) has no file: its id, pthaw's
	// attachment while it is filled, and whether it existed already.
	shmid  int
	shm    []byte
	reused bool
	ipc    *nsthread.Thread // the container's IPC namespace it is in, or nil
}

// addFile takes one File record: the first of an object makes it, every
// one writes its data. Runs on any goroutine.
func (p *Process) addFile(r *image.File) error {
	objs := p.objs()
	o, ok := objs[r.ID]
	if !ok && r.Kind == image.FileSysV {
		var err error
		if o, err = p.makeSysV(r); err != nil {
			return err
		}
		objs[r.ID] = o
	} else if !ok {
		f, err := makeObject(r)
		if err != nil {
			return fmt.Errorf("file %s: %w", r.Name, err)
		}
		o = &object{f: f, img: r}
		objs[r.ID] = o
		if err := ownFile(f, r); err != nil {
			return fmt.Errorf("file %s: %w", r.Name, err)
		}
		if err := f.Truncate(r.Size); err != nil {
			return fmt.Errorf("file %s: size %d: %w", r.Name, r.Size, err)
		}
	} else if r.Kind != 0 || o.ready {
		return fmt.Errorf("%w: file %#x described twice", image.ErrCorrupt, r.ID)
	}
	if r.Off < o.next || r.Off+int64(len(r.Data)) > o.img.Size {
		return fmt.Errorf("%w: file %#x: data at %d+%d", image.ErrCorrupt, r.ID, r.Off, len(r.Data))
	}
	if o.img.Kind == image.FileSysV {
		o.writeSysV(r.Off, r.Data)
	} else if _, err := o.f.WriteAt(r.Data, r.Off); err != nil {
		return fmt.Errorf("file %s: %w", o.img.Name, err)
	}
	o.next = r.Off + int64(len(r.Data))
	return nil
}

// makeObject creates the file a File record describes, empty.
func makeObject(r *image.File) (*os.File, error) {
	switch r.Kind {
	case image.FileMemfd:
		fd, err := unix.MemfdCreate(r.Name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			return nil, fmt.Errorf("memfd_create: %w", err)
		}
		return os.NewFile(uintptr(fd), "/memfd:"+r.Name), nil
	case image.FileDeleted:
		perm := r.Mode & 0o7777
		fd, err := unix.Open(filepath.Dir(r.Name), unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, perm)
		if err != nil {
			// Its directory is gone too, or its filesystem has no
			// O_TMPFILE: anywhere will do, nobody sees it.
			fd, err = unix.Open(os.TempDir(), unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, perm)
		}
		if err != nil {
			return nil, fmt.Errorf("unnamed copy (O_TMPFILE): %w", err)
		}
		return os.NewFile(uintptr(fd), r.Name), nil
	}
	return nil, fmt.Errorf("%w: file %#x of kind %d", image.ErrCorrupt, r.ID, r.Kind)
}

// ownFile gives a made memfd or deleted file its owner and mode back
// (fchmod after fchown, which clears set-id bits; the mode is beyond the
// umask, as it was). The owner is changed only when it differs, and by a
// pthaw acting for an ordinary user only to one that user may give (their
// uid, their gid or one of their groups): a copy owned by another — root's
// memfd handed to the user's process, or a snapshot whose file records
// carry no owner (read as 0:0) — stays the user's who made it. It is a
// file nobody else holds, so that gives the user nothing of another's.
func ownFile(f *os.File, r *image.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if (st.Uid != r.Uid || st.Gid != r.Gid) && mayChown(r.Uid, r.Gid) {
		if err := unix.Fchown(int(f.Fd()), int(r.Uid), int(r.Gid)); err != nil {
			return fmt.Errorf("owner %d:%d: %w", r.Uid, r.Gid, err)
		}
	}
	if err := unix.Fchmod(int(f.Fd()), r.Mode&0o7777); err != nil {
		return fmt.Errorf("mode %#o: %w", r.Mode&0o7777, err)
	}
	return nil
}

// mayChown reports whether pthaw may give a file it made the owner
// uid:gid: root always; an ordinary user (forUser) only their own uid
// with their gid or one of their supplementary groups, as chown(2) allows
// without CAP_CHOWN (which pthaw's file capabilities do not include).
func mayChown(uid, gid uint32) bool {
	me, mygid, user := forUser()
	if !user {
		return true
	}
	if int(uid) != me {
		return false
	}
	if int(gid) == mygid {
		return true
	}
	groups, err := unix.Getgroups()
	return err == nil && slices.Contains(groups, int(gid))
}

// sealFiles gives every memfd its seals, once its contents are written
// (F_SEAL_WRITE would forbid them). Before anything maps them: a
// writable shared mapping would forbid F_SEAL_WRITE.
func (p *Process) sealFiles() error {
	for _, o := range p.objs() {
		if o.ready {
			continue
		}
		o.ready = true
		if o.img.Kind == image.FileMemfd && o.img.Seals != 0 {
			if _, err := unix.FcntlInt(o.f.Fd(), unix.F_ADD_SEALS, o.img.Seals); err != nil {
				return fmt.Errorf("memfd %s: seals %#x: %w", o.img.Name, o.img.Seals, err)
			}
		}
	}
	return nil
}

// objectPath is where the process opens object id, or "" if the snapshot
// has no such File.
func (p *Process) objectPath(id uint64) string {
	o, ok := p.objs()[id]
	if !ok || o.f == nil {
		return ""
	}
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), o.f.Fd())
}

// objs returns the objects the process may name: a tree's members share
// theirs (one member's fds and areas may hold a file another saved).
func (p *Process) objs() map[uint64]*object {
	m := &p.objects
	if p.tree != nil {
		m = &p.tree.objects
	}
	if *m == nil {
		*m = map[uint64]*object{}
	}
	return *m
}

// closeObjects closes pthaw's own fds of the objects: the process holds
// its own by now (it is built), or is gone. A tree's are closed with it
// (closeAllObjects), once every member is built.
func (p *Process) closeObjects() {
	closeAllObjects(p.objects)
	p.objects = nil
}

func closeAllObjects(objs map[uint64]*object) {
	for _, o := range objs {
		if o.f != nil {
			o.f.Close()
		} else {
			o.closeSysV()
		}
	}
}
