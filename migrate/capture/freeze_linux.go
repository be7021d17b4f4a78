package capture

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"golang.org/x/sys/unix"

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
//
// Cancelling ctx stops the freeze at its next write to w (between two
// batches of memory at the latest) and resumes the process, up to the
// moment a halted process is killed; the error then wraps ctx's cause.
// Whenever the caller dies instead, the process carries on too: every
// injected call leaves it as it was (ptrace.NewSeizedInjector), so there
// is nothing to put back.
func Freeze(ctx context.Context, tr *ptrace.Tracer, pid int, w io.Writer, halt bool, commit Commit) error {
	return FreezeWith(ctx, tr, pid, w, FreezeOptions{Halt: halt, Commit: commit})
}

// FreezeTree is Freeze for pid and all its descendants (pfreeze -tree):
// every member is stopped, written, and then resumed or killed together.
func FreezeTree(ctx context.Context, tr *ptrace.Tracer, pid int, w io.Writer, halt bool, commit Commit) error {
	return FreezeWith(ctx, tr, pid, w, FreezeOptions{Halt: halt, Commit: commit, Tree: true})
}

// FreezeOptions are Freeze's arguments, and more.
type FreezeOptions struct {
	Halt   bool
	Commit Commit
	Tree   bool // the process and all its descendants (FreezeTree)
	// TCP says which TCP connections move (tcp_linux.go).
	TCP TCPOptions
	// Notice, if set, receives one-line messages for the user about fds
	// the copy gets changed (a pipe leading outside).
	Notice func(string)
	// UnixReconnect: a unix socket connected to a peer outside the
	// process (or tree) is connected again to the peer's name by the
	// copy, instead of refused (pfreeze -unix-reconnect).
	UnixReconnect bool
	// UnixHandover: a unix socket connected to a peer outside the
	// process (or tree) is taken over, the same socket, by the copy:
	// pthaw takes it from the original on this host. Only for a -halt
	// move to a receiver that builds the copy while the original is
	// held (SendTo sets it then; UnixReconnect comes first).
	UnixHandover bool
	// Queried, if set, is called once every thread is stopped and the
	// calls injected to describe the process (every member of a tree)
	// are done, before the first byte of the snapshot is written.
	Queried func()
	// Live, when set, copies memory while the process runs before the
	// stop (pre-copy, precopy_linux.go; for a tree, every member's:
	// precopy_tree_linux.go).
	Live *LiveOptions
	// StopAndCopy keeps a checkpoint (no Halt, no Live) stopped for the
	// whole copy. Without it the process is stopped only to be described
	// and forked, and its memory is copied from the fork's
	// copy-on-write view while it runs (forksnap_linux.go).
	StopAndCopy bool
	// COWStats, if set, is filled in by a copy-on-write checkpoint.
	COWStats *COWStats
	// Parent, when set, makes the snapshot incremental: it refers to
	// Parent for the pages unchanged since (parent.go). Not live.
	Parent *Parent
	// Killed, with Halt, is called once the process is killed and its
	// PID free, before a single process's memory is freed (holdmm_linux.go):
	// a receiver told here to start the copy does not wait for that. Its
	// error is FreezeWith's.
	Killed func() error
}

// FreezeWith is Freeze (or with o.Tree, FreezeTree) with every option.
func FreezeWith(ctx context.Context, tr *ptrace.Tracer, pid int, w io.Writer, o FreezeOptions) error {
	if o.Parent != nil && o.Live != nil {
		return fmt.Errorf("freeze %d: an incremental snapshot (with a parent) is not live", pid)
	}
	enc := image.NewEncoder(ctxWriter{ctx, w})
	if o.Tree {
		var tp *treePrecopy
		if o.Live != nil {
			var err error
			if tp, err = startTreePrecopy(tr, pid, *o.Live); err != nil {
				return err
			}
			if tp == nil && o.Live.Notice != nil {
				o.Live.Notice(fmt.Sprintf("live %d: no member of the tree can be copied live: stopped for the whole copy (stop-and-copy)", pid))
			}
		}
		if tp != nil {
			defer tp.close()
			if err := tp.run(enc); err != nil {
				return fmt.Errorf("live %d: %w (process tree running)", pid, err)
			}
		}
		t, err := AttachTree(tr, pid)
		if err != nil {
			return err
		}
		t.precopy = tp
		for _, m := range t.members {
			m.socks.policy, m.socks.notice, m.socks.reconnect, m.socks.handover = o.TCP, o.Notice, o.UnixReconnect, o.UnixHandover
		}
		t.queried = o.Queried
		t.cow = newCOW(o)
		for _, m := range t.members {
			m.cow = t.cow
		}
		defer t.cow.done()
		t.parent = o.Parent
		return freeze(ctx, t, pid, "process tree", enc, o)
	}
	var pc *precopy
	if o.Live != nil {
		var err error
		if pc, err = startPrecopy(tr, pid, *o.Live); err != nil {
			if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EPERM) {
				return err
			}
			if o.Live.Notice != nil {
				o.Live.Notice(fmt.Sprintf("%v: stopped for the whole copy (stop-and-copy)", err))
			}
		} else {
			defer pc.close()
			if err := pc.run(enc); err != nil {
				return fmt.Errorf("live %d: %w (process running)", pid, err)
			}
		}
	}
	c := newCOW(o)
	defer c.done()
	f, err := Attach(tr, pid)
	if err != nil {
		return err
	}
	f.socks.policy, f.socks.notice, f.socks.reconnect, f.socks.handover = o.TCP, o.Notice, o.UnixReconnect, o.UnixHandover
	f.queried = o.Queried
	f.precopy = pc
	f.cow = c
	f.parent = o.Parent
	// (A single process is in our PID namespace, never the init of one,
	// whose exit would wait for the holder: checkPidNS.)
	f.holdMM = o.Halt
	return freeze(ctx, f, pid, "process", enc, o)
}

// newCOW returns the state of a copy-on-write checkpoint if o asks for
// one (no Halt, no Live, no StopAndCopy), else nil.
func newCOW(o FreezeOptions) *cowRun {
	if o.Halt || o.Live != nil || o.StopAndCopy {
		return nil
	}
	c := &cowRun{t0: time.Now(), stats: o.COWStats, notice: o.Notice}
	if c.stats == nil {
		c.stats = &COWStats{}
	}
	return c
}

// done fills in the stop and copy times once the checkpoint ended.
func (c *cowRun) done() {
	if c == nil {
		return
	}
	end := time.Now()
	if c.released.IsZero() {
		c.stats.Stop = end.Sub(c.t0)
		return
	}
	c.stats.Stop, c.stats.Copy = c.released.Sub(c.t0), end.Sub(c.released)
}

// freeze writes f to enc, then commits and kills or resumes it (o.Halt,
// o.Commit, o.Killed); what says what pid is in an interruption's message.
func freeze(ctx context.Context, f stopped, pid int, what string, enc *image.Encoder, o FreezeOptions) error {
	halt, commit := o.Halt, o.Commit
	if err := f.Write(enc); err != nil {
		if ierr := interrupted(ctx, f, pid, what); ierr != nil {
			return ierr
		}
		if rerr := f.Resume(); rerr != nil {
			return fmt.Errorf("%w; and %v", err, rerr)
		}
		return err
	}
	if commit != nil {
		if err := commit(); err != nil {
			if ierr := interrupted(ctx, f, pid, what); ierr != nil {
				return ierr
			}
			if rerr := f.Resume(); rerr != nil {
				return fmt.Errorf("freeze %d: %w; and %v", pid, err, rerr)
			}
			return fmt.Errorf("freeze %d: %w (process resumed)", pid, err)
		}
	}
	if !halt {
		// The snapshot is complete: an interruption now changes nothing.
		return f.Resume()
	}
	// The last moment an interruption is heeded: from here on the process
	// is killed and the receiver told to start its copy.
	if ierr := interrupted(ctx, f, pid, what); ierr != nil {
		return ierr
	}
	err := f.Kill()
	if err == nil && o.Killed != nil {
		err = o.Killed()
	}
	if fr, ok := f.(*Frozen); ok {
		fr.releaseHolder()
	}
	return err
}

// interrupted resumes f if ctx was cancelled and returns the one line to
// say ("interrupted by SIGTERM: process 1234 resumed"), or nil if ctx was
// not cancelled.
func interrupted(ctx context.Context, f stopped, pid int, what string) error {
	if ctx.Err() == nil {
		return nil
	}
	if err := f.Resume(); err != nil {
		return fmt.Errorf("%w: %s %d could not be resumed: %v", context.Cause(ctx), what, pid, err)
	}
	return fmt.Errorf("%w: %s %d resumed", context.Cause(ctx), what, pid)
}

// ctxWriter fails every write once ctx is done, with its cause: the
// capture stops at its next record.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if c.ctx.Err() != nil {
		return 0, context.Cause(c.ctx)
	}
	return c.w.Write(p)
}
