package loader

import (
	"fmt"
	"os"
	"sort"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
)

// System V shared memory (image.File of kind FileSysV) keeps its id and
// key: the process's code holds the id. A segment with that id, key and
// size that still exists (the original, frozen with -halt on this host,
// left it, as SysV segments outlive their processes) is attached as it
// is, its contents the live ones; otherwise it is made again under its id
// (/proc/sys/kernel/shm_next_id) and key, filled, and given its owner and
// mode. The process attaches it with shmat at each saved attachment
// (start - offset of its areas), the parts it had unmapped are unmapped
// again and each area gets its protection. A segment that was marked for
// removal is marked again once attached; one made for a restore that
// fails is removed.

// shmNextID is the sysctl that gives the next segment made its id.
const shmNextID = "/proc/sys/kernel/shm_next_id"

// makeSysV finds or makes the segment r describes and attaches it to
// pthaw, to be filled: in a container's new IPC namespace, on the thread
// that holds it (container_linux.go), where nothing needs removing after
// a failure (the namespace goes with the restore). Runs on any goroutine.
func (p *Process) makeSysV(r *image.File) (*object, error) {
	ipc := p.containerIPC()
	if ipc == nil {
		return p.makeSysVHere(r)
	}
	var o *object
	err := ipc.Do(func() (err error) {
		n := len(p.createdShm)
		o, err = p.makeSysVHere(r)
		p.createdShm = p.createdShm[:n]
		return err
	})
	if o != nil {
		o.ipc = ipc
	}
	return o, err
}

// makeSysVHere is makeSysV in the calling thread's IPC namespace.
func (p *Process) makeSysVHere(r *image.File) (*object, error) {
	o := &object{img: r, shmid: r.ShmID}
	var desc unix.SysvShmDesc
	if _, err := unix.SysvShmCtl(r.ShmID, unix.IPC_STAT, &desc); err == nil {
		if desc.Perm.Key != r.Key || int64(desc.Segsz) != r.Size {
			return nil, fmt.Errorf("sysv segment %d exists with key %#x and %d bytes, not key %#x and %d bytes", r.ShmID, uint32(desc.Perm.Key), desc.Segsz, uint32(r.Key), r.Size)
		}
		o.reused = true
	} else {
		if r.Key != unix.IPC_PRIVATE {
			if id, err := unix.SysvShmGet(int(r.Key), 0, 0); err == nil {
				return nil, fmt.Errorf("sysv key %#x is taken by segment %d", uint32(r.Key), id)
			}
		}
		if err := os.WriteFile(shmNextID, []byte(strconv.Itoa(r.ShmID)), 0); err != nil {
			return nil, fmt.Errorf("sysv segment %d: %w", r.ShmID, err)
		}
		id, err := unix.SysvShmGet(int(r.Key), int(r.Size), unix.IPC_CREAT|unix.IPC_EXCL|int(r.Mode&0o777))
		os.WriteFile(shmNextID, []byte("-1"), 0)
		if err != nil {
			return nil, fmt.Errorf("sysv segment %d (key %#x): shmget: %w", r.ShmID, uint32(r.Key), err)
		}
		if id != r.ShmID {
			unix.SysvShmCtl(id, unix.IPC_RMID, nil)
			return nil, fmt.Errorf("sysv segment %d: made as %d (its id is taken)", r.ShmID, id)
		}
		p.createdShm = append(p.createdShm, id)
		desc = unix.SysvShmDesc{}
		if _, err := unix.SysvShmCtl(id, unix.IPC_STAT, &desc); err != nil {
			return nil, fmt.Errorf("sysv segment %d: %w", id, err)
		}
		desc.Perm.Uid, desc.Perm.Gid, desc.Perm.Mode = r.Uid, r.Gid, r.Mode&0o777
		if _, err := unix.SysvShmCtl(id, unix.IPC_SET, &desc); err != nil {
			return nil, fmt.Errorf("sysv segment %d: owner %d:%d mode %#o: %w", id, r.Uid, r.Gid, r.Mode, err)
		}
		if o.shm, err = unix.SysvShmAttach(id, 0, 0); err != nil {
			return nil, fmt.Errorf("sysv segment %d: attach: %w", id, err)
		}
	}
	return o, nil
}

// writeSysV puts a chunk of a segment's contents into it; a segment that
// existed keeps its own. Runs on any goroutine.
func (o *object) writeSysV(off int64, data []byte) {
	if o.shm != nil {
		copy(o.shm[off:], data)
	}
}

// closeSysV lets pthaw's attachment of the segment go and marks it for
// removal again if it was: the process has its own attachment by now
// (the build ended), or is gone. Runs on any goroutine.
func (o *object) closeSysV() {
	if o.shm != nil {
		unix.SysvShmDetach(o.shm)
		o.shm = nil
	}
	if o.img.Removed {
		rm := func() error {
			_, err := unix.SysvShmCtl(o.shmid, unix.IPC_RMID, nil)
			return err
		}
		if o.ipc != nil {
			o.ipc.Do(rm)
		} else {
			rm()
		}
	}
}

// removeCreatedShm removes the segments made for a restore that failed.
func (p *Process) removeCreatedShm() {
	for _, id := range p.createdShm {
		unix.SysvShmCtl(id, unix.IPC_RMID, nil)
	}
	p.createdShm = nil
}

// sysvObject returns the segment area v attaches, or nil.
func (p *Process) sysvObject(v *image.VMA) *object {
	if v.Object == 0 {
		return nil
	}
	if o := p.objs()[v.Object]; o != nil && o.img.Kind == image.FileSysV {
		return o
	}
	return nil
}

// attachSysV attaches, in the process, every System V segment its areas
// map: one shmat per attachment (areas of one segment at one start -
// offset), then the parts not in the snapshot unmapped and each area
// given its protection. Runs on the tracer thread, before the other
// areas are mapped.
func (p *Process) attachSysV() error {
	type attach struct {
		o     *object
		base  uint64
		areas []*image.VMA
	}
	var list []*attach
	byBase := map[[2]uint64]*attach{}
	for _, v := range p.vmas {
		o := p.sysvObject(v)
		if o == nil {
			continue
		}
		if v.Offset > v.Start || !v.Shared {
			return fmt.Errorf("%w: %s: System V attachment at offset %#x", image.ErrCorrupt, vmaName(v), v.Offset)
		}
		k := [2]uint64{v.Object, v.Start - v.Offset}
		a := byBase[k]
		if a == nil {
			a = &attach{o: o, base: k[1]}
			byBase[k] = a
			list = append(list, a)
		}
		a.areas = append(a.areas, v)
	}
	for _, a := range list {
		size := uint64(a.o.img.Size+pageSize-1) &^ (pageSize - 1)
		flags := uintptr(unix.SHM_RDONLY)
		for _, v := range a.areas {
			if v.Prot&unix.PROT_WRITE != 0 {
				flags &^= unix.SHM_RDONLY
			}
			if v.Prot&unix.PROT_EXEC != 0 {
				flags |= shmExec
			}
		}
		at, err := p.call(unix.SYS_SHMAT, uintptr(a.o.shmid), uintptr(a.base), flags)
		if err != nil {
			return fmt.Errorf("sysv segment %d: shmat at %#x: %w", a.o.shmid, a.base, err)
		}
		if uint64(at) != a.base {
			return fmt.Errorf("sysv segment %d: attached at %#x, not %#x", a.o.shmid, at, a.base)
		}
		sort.Slice(a.areas, func(i, j int) bool { return a.areas[i].Start < a.areas[j].Start })
		next := a.base
		for _, v := range append(a.areas, &image.VMA{Start: a.base + size}) {
			if v.Start > next {
				if _, err := p.call(unix.SYS_MUNMAP, uintptr(next), uintptr(v.Start-next)); err != nil {
					return fmt.Errorf("sysv segment %d: unmap %#x-%#x: %w", a.o.shmid, next, v.Start, err)
				}
			}
			if v.End == 0 {
				break
			}
			if _, err := p.call(unix.SYS_MPROTECT, uintptr(v.Start), uintptr(v.Len()), uintptr(v.Prot)); err != nil {
				return fmt.Errorf("%s: mprotect: %w", vmaName(v), err)
			}
			next = v.End
		}
	}
	return nil
}

// shmExec is SHM_EXEC (shmat: an executable attachment).
const shmExec = 0o100000
