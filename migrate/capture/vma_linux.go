package capture

import (
	"fmt"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// describeVMAs turns the memory map into VMA records, refusing mappings a
// restore could not rebuild faithfully.
func describeVMAs(pid int, maps []procfs.Mapping, mem *ptrace.Mem) ([]image.VMA, error) {
	var out []image.VMA
	for _, m := range maps {
		v := image.VMA{Start: m.Start, End: m.End, Shared: m.Shared(), Name: m.Path,
			Offset: m.Offset, VmFlags: m.VmFlags}
		if m.Readable() {
			v.Prot |= unix.PROT_READ
		}
		if m.Writable() {
			v.Prot |= unix.PROT_WRITE
		}
		if m.Exec() {
			v.Prot |= unix.PROT_EXEC
		}
		where := fmt.Sprintf("map %#x-%#x", m.Start, m.End)
		if m.Path != "" {
			where += " (" + m.Path + ")"
		}
		switch {
		case m.Path == "[vsyscall]":
			continue // at the same fixed address in every process
		case m.Path == "[vdso]":
			v.Kind = image.VMAVdso
			v.Content = make([]byte, m.End-m.Start)
			if err := mem.Read(m.Start, v.Content); err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
		case m.Path == "[vvar]":
			v.Kind = image.VMAVvar
		case m.Path == "[vvar_vclock]":
			v.Kind = image.VMAVvarVclock
		case m.Path == "" || m.Path == "[heap]" || m.Path == "[stack]":
			v.Kind = image.VMAAnon
			if m.Shared() {
				v.Kind = image.VMASharedAnon
			}
		case strings.HasPrefix(m.Path, "/dev/zero") && m.Shared():
			v.Kind = image.VMASharedAnon
		case strings.HasPrefix(m.Path, "["):
			return nil, unsupported("%s: special mapping", where)
		case strings.HasSuffix(m.Path, " (deleted)") || strings.HasPrefix(m.Path, "/memfd:") || strings.HasPrefix(m.Path, "/SYSV"):
			var st syscall.Stat_t
			mf := fmt.Sprintf("/proc/%d/map_files/%x-%x", pid, m.Start, m.End)
			if err := syscall.Stat(mf, &st); err != nil {
				return nil, fmt.Errorf("%s: %w", where, explainMapFilesErr(err))
			}
			_, _, id, ok, err := fileObject(m.Path, &st)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			if !ok {
				return nil, unsupported("%s: file deleted or replaced since it was mapped", where)
			}
			v.Kind, v.Object = image.VMAFile, id
			v.FileSize = st.Size
		case strings.HasPrefix(m.Path, "/"):
			v.Kind = image.VMAFile
			// map_files names the mapped file itself, whatever its path says.
			var st syscall.Stat_t
			mf := fmt.Sprintf("/proc/%d/map_files/%x-%x", pid, m.Start, m.End)
			if err := syscall.Stat(mf, &st); err != nil {
				return nil, fmt.Errorf("%s: %w", where, explainMapFilesErr(err))
			}
			if err := namesFile(pid, m.Path, &st, "mapped file"); err != nil {
				return nil, unsupported("%s: %v", where, err)
			}
			v.FileSize = st.Size
			v.FileMtime = st.Mtim.Sec*1e9 + st.Mtim.Nsec
		default:
			return nil, unsupported("%s: unknown mapping", where)
		}
		out = append(out, v)
	}
	if !hasKind(out, image.VMAVdso) {
		return nil, unsupported("process without a vdso")
	}
	return out, nil
}

func hasKind(vmas []image.VMA, k image.VMAKind) bool {
	for _, v := range vmas {
		if v.Kind == k {
			return true
		}
	}
	return false
}

// Pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwap    = 1 << 62
	pmFile    = 1 << 61 // file page or shared anonymous
	// pmExclusive: the page is mapped by this process only (a present
	// page's mapcount is 1): not shared copy-on-write with a fork.
	pmExclusive = 1 << 56
)

const pageSize = 4096

// wantPage reports whether a page with pagemap entry e goes into the
// snapshot: for private file mappings only pages that are no longer the file's.
func wantPage(v *image.VMA, e uint64) bool {
	switch v.Kind {
	case image.VMAAnon:
		return e&(pmPresent|pmSwap) != 0
	case image.VMAFile:
		if v.Shared {
			return false
		}
		return e&pmSwap != 0 || (e&pmPresent != 0 && e&pmFile == 0)
	case image.VMASharedAnon:
		return true
	}
	return false
}
