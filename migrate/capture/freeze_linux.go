package capture

import (
	"fmt"
	"io"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
)

// Commit is called after the snapshot is completely written. It returns nil
// when the snapshot is safe elsewhere (flushed to its file, or restored by
// the receiver), and only then is a halted process killed. Commit may be nil.
type Commit func() error

// stopped is what Freeze needs of a stopped process or tree.
type stopped interface {
	Write(enc *image.Encoder) error
	Resume() error
	Kill() error
}

// Freeze stops pid, writes its snapshot to w and then either lets it run on
// (halt false: a checkpoint) or kills it (halt true: a migration). The
// process is killed only after commit succeeds; on any error before that it
// is resumed exactly where it was, so a failed freeze loses nothing.
func Freeze(tr *ptrace.Tracer, pid int, w io.Writer, halt bool, commit Commit) error {
	f, err := Attach(tr, pid)
	if err != nil {
		return err
	}
	return freeze(f, pid, w, halt, commit)
}

// FreezeTree is Freeze for pid and all its descendants (pfreeze -tree):
// every member is stopped, written, and then resumed or killed together.
func FreezeTree(tr *ptrace.Tracer, pid int, w io.Writer, halt bool, commit Commit) error {
	t, err := AttachTree(tr, pid)
	if err != nil {
		return err
	}
	return freeze(t, pid, w, halt, commit)
}

func freeze(f stopped, pid int, w io.Writer, halt bool, commit Commit) error {
	if err := f.Write(image.NewEncoder(w)); err != nil {
		if rerr := f.Resume(); rerr != nil {
			return fmt.Errorf("%w; and %v", err, rerr)
		}
		return err
	}
	if commit != nil {
		if err := commit(); err != nil {
			if rerr := f.Resume(); rerr != nil {
				return fmt.Errorf("freeze %d: %w; and %v", pid, err, rerr)
			}
			return fmt.Errorf("freeze %d: %w (process resumed)", pid, err)
		}
	}
	if halt {
		return f.Kill()
	}
	return f.Resume()
}
