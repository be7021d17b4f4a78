package capture

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
)

// Files no path leads to — memfds, and regular files deleted while open
// or mapped — are saved with their contents (image.File), once however
// many fds and areas hold them; those name them by ID (Object). A file
// that was deleted but is still linked elsewhere (nlink > 0) is refused:
// a copy would split it from its other name. In a tree, members that
// hold one such file share it again.

// fileObject returns the image.File kind and name of the file behind a
// link (readlink of /proc/PID/fd/N or a mapping's path) with stat st, and
// its ID; ok false when it is an ordinary file with a path.
func fileObject(link string, st *syscall.Stat_t) (kind image.FileKind, name string, id uint64, ok bool, err error) {
	deleted := strings.HasSuffix(link, " (deleted)")
	switch {
	case strings.HasPrefix(link, "/SYSV"):
		// A System V segment: its inode number is its id.
		kind, name = image.FileSysV, strings.TrimSuffix(strings.TrimPrefix(link, "/"), " (deleted)")
	case strings.HasPrefix(link, "/memfd:"):
		kind, name = image.FileMemfd, strings.TrimSuffix(strings.TrimPrefix(link, "/memfd:"), " (deleted)")
		var fs unix.Statfs_t
		if serr := unix.Statfs(link, &fs); serr == nil && fs.Type == unix.HUGETLBFS_MAGIC {
			return 0, "", 0, false, unsupported("memfd on hugetlbfs")
		}
	case deleted && st.Mode&syscall.S_IFMT == syscall.S_IFREG:
		if st.Nlink > 0 {
			return 0, "", 0, false, unsupported("file deleted from this path but still linked elsewhere (%d links)", st.Nlink)
		}
		kind, name = image.FileDeleted, strings.TrimSuffix(link, " (deleted)")
	default:
		return 0, "", 0, false, nil
	}
	h := fnv.New64a()
	fmt.Fprintf(h, "%d:%d", st.Dev, st.Ino)
	return kind, name, h.Sum64() | 1, true, nil
}

// fileRecords returns the File records of the objects the process's
// areas and fds name, reading each one's contents through /proc (an fd
// of the process, or the area's map_files link). In a tree, saved holds
// the objects an earlier member saved, which members share: they are
// not saved again, and those saved now are added.
func fileRecords(pid int, vmas []image.VMA, fds []image.FD, saved map[uint64]bool) ([]image.File, error) {
	type obj struct {
		kind image.FileKind
		name string
		src  string
	}
	var order []uint64
	objs := map[uint64]*obj{}
	note := func(id uint64, kind image.FileKind, name, src string) {
		if _, ok := objs[id]; !ok && !saved[id] {
			objs[id] = &obj{kind, name, src}
			order = append(order, id)
		}
	}
	for _, f := range fds {
		if f.Object != 0 {
			var st syscall.Stat_t
			src := procfs.Path(pid, fmt.Sprintf("fd/%d", f.Fd))
			if err := syscall.Stat(src, &st); err != nil {
				return nil, fmt.Errorf("fd %d (%s): %w", f.Fd, f.What, err)
			}
			kind, name, _, _, _ := fileObject(f.What, &st)
			note(f.Object, kind, name, src)
		}
	}
	for _, v := range vmas {
		if v.Object != 0 {
			src := procfs.Path(pid, fmt.Sprintf("map_files/%x-%x", v.Start, v.End))
			var st syscall.Stat_t
			if err := syscall.Stat(src, &st); err != nil {
				return nil, fmt.Errorf("%s: %w", v.Label(), explainMapFilesErr(err))
			}
			kind, name, _, _, _ := fileObject(v.Name, &st)
			note(v.Object, kind, name, src)
		}
	}
	var out []image.File
	for _, id := range order {
		o := objs[id]
		read := readFileObject
		if o.kind == image.FileSysV {
			read = readSysVIn(pid)
		}
		recs, err := read(id, o.kind, o.name, o.src)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", o.src, err)
		}
		out = append(out, recs...)
		if saved != nil {
			saved[id] = true
		}
	}
	return out, nil
}

// readFileObject reads the file at src into File records of FileChunk
// bytes, leaving out chunks of zeros.
func readFileObject(id uint64, kind image.FileKind, name, src string) ([]image.File, error) {
	f, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return nil, err
	}
	if st.Size > image.MaxFileSize {
		return nil, unsupported("%s of %d bytes", name, st.Size)
	}
	first := image.File{ID: id, Kind: kind, Name: name, Size: st.Size, Mode: st.Mode, Uid: st.Uid, Gid: st.Gid}
	if kind == image.FileMemfd {
		seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
		if err != nil {
			return nil, fmt.Errorf("memfd seals: %w", err)
		}
		first.Seals = seals
	}
	out := []image.File{first}
	zero := make([]byte, image.FileChunk)
	for off := int64(0); off < st.Size; off += image.FileChunk {
		buf := make([]byte, min(image.FileChunk, st.Size-off))
		n, err := f.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		buf = buf[:n]
		if bytes.Equal(buf, zero[:n]) {
			continue
		}
		if off == 0 {
			out[0].Data = buf
			continue
		}
		out = append(out, image.File{ID: id, Off: off, Data: buf})
	}
	return out, nil
}

// readSysV reads the System V segment an area maps (src, its map_files
// link, whose inode number is the segment's id) into File records: its
// key, owner and mode from /proc/sysvipc/shm, its contents through an
// attachment of our own, read-only.
func readSysV(id uint64, kind image.FileKind, name, src string) ([]image.File, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(src, &st); err != nil {
		return nil, err
	}
	shmid := int(st.Ino)
	first := image.File{ID: id, Kind: kind, Name: name, ShmID: shmid}
	b, err := os.ReadFile("/proc/sysvipc/shm")
	if err != nil {
		return nil, err
	}
	found := false
	for _, line := range strings.Split(string(b), "\n")[1:] {
		// key shmid perms size cpid lpid nattch uid gid ...
		f := strings.Fields(line)
		if len(f) < 9 || f[1] != strconv.Itoa(shmid) {
			continue
		}
		key, err1 := strconv.ParseInt(f[0], 10, 32)
		perms, err2 := strconv.ParseUint(f[2], 8, 32)
		size, err3 := strconv.ParseInt(f[3], 10, 64)
		uid, err4 := strconv.ParseUint(f[7], 10, 32)
		gid, err5 := strconv.ParseUint(f[8], 10, 32)
		if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
			return nil, fmt.Errorf("/proc/sysvipc/shm line %q: %w", line, err)
		}
		first.Key, first.Mode, first.Size = int32(key), uint32(perms)&0o777, size
		first.Uid, first.Gid = uint32(uid), uint32(gid)
		first.Removed = perms&shmDest != 0
		found = true
	}
	if !found {
		return nil, fmt.Errorf("segment %d not in /proc/sysvipc/shm", shmid)
	}
	if first.Size > image.MaxFileSize {
		return nil, unsupported("%s of %d bytes", name, first.Size)
	}
	mem, err := unix.SysvShmAttach(shmid, 0, unix.SHM_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("attach segment %d: %w", shmid, err)
	}
	defer unix.SysvShmDetach(mem)
	out := []image.File{first}
	zero := make([]byte, image.FileChunk)
	for off := int64(0); off < first.Size; off += image.FileChunk {
		chunk := mem[off:min(off+image.FileChunk, first.Size)]
		if bytes.Equal(chunk, zero[:len(chunk)]) {
			continue
		}
		buf := append([]byte(nil), chunk...)
		if off == 0 {
			out[0].Data = buf
			continue
		}
		out = append(out, image.File{ID: id, Off: off, Data: buf})
	}
	return out, nil
}

// shmDest is SHM_DEST in a segment's mode: marked for removal.
const shmDest = 0o1000

// checkWatchedObjects refuses an inotify watch on a deleted file that no
// fd or area of the process holds (nor, in a tree, an earlier member:
// saved): there would be no copy of the file to watch.
func checkWatchedObjects(vmas []image.VMA, fds []image.FD, saved map[uint64]bool) error {
	held := map[uint64]bool{}
	for _, v := range vmas {
		held[v.Object] = true
	}
	for _, f := range fds {
		held[f.Object] = true
	}
	for _, f := range fds {
		for _, w := range f.Watches {
			if w.Object != 0 && !held[w.Object] && !saved[w.Object] {
				return unsupported("fd %d (%s): inotify watch %d: watched file %s was deleted, and no fd or mapping of the process holds it", f.Fd, f.What, w.Wd, w.Path)
			}
		}
	}
	return nil
}
