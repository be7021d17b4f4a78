package capture

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"time"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// SendOptions say where a snapshot goes and how it is encoded.
type SendOptions struct {
	Dest string // stdout | FILE | tcp:HOST:PORT | unix:PATH (Send only)
	// Codec, Cipher and Key encode the body (stream.Options).
	Codec        stream.Codec
	Cipher       stream.Cipher
	Key          *stream.Key
	DialTimeout  time.Duration
	WriteTimeout time.Duration
	// ReadyTimeout bounds the wait for the receiver to build the process
	// after the whole snapshot was sent (-halt over a network).
	ReadyTimeout time.Duration
	// Insecure allows an unencrypted stream to a receiver beyond
	// loopback (stream.SinkOptions.Insecure).
	Insecure bool
	Halt     bool
	Tree     bool // the process and all its descendants
	Progress bool // draw a progress bar on stderr
	// TCP says which TCP connections move with the process.
	TCP TCPOptions
	// Notice, if set, receives one-line messages for the user
	// (FreezeOptions.Notice).
	Notice func(string)
	// UnixReconnect is FreezeOptions.UnixReconnect.
	UnixReconnect bool
	// OtherHost says the receiver runs on another host (a cluster
	// migration): a unix connection to a peer outside is then never
	// handed over (FreezeOptions.UnixHandover) but refused at the freeze,
	// before anything is sent.
	OtherHost bool
	// Decide, with Halt, is called once the receiver has built the
	// process (the sink's AwaitReady returned nil) and before the
	// original is killed: nil goes on (kill, then the sink's Commit); an
	// error resumes the original, and the receiver, never told to
	// commit, kills its copy. A cluster agent records the move here.
	Decide func() error
	// Unconfirmed, with Halt, is called when the wait for the receiver's
	// verdict fails (why): the whole snapshot was sent, so the receiver
	// may have built the process and gone on without us (a link cut
	// after the last byte), and only the caller can know. An error
	// resumes the original; nil goes on to Decide as if the receiver had
	// said built. Unset: the failure resumes the original.
	Unconfirmed func(why error) error
	// Frozen, if set, is called once every thread is stopped and the
	// calls injected to describe the process (every member of a tree)
	// are done, before the first byte of the snapshot: a cluster agent
	// takes the process's virtual IP away and freezes its cgroup here
	// (node/vip.go, node/migrate.go).
	Frozen func()
	// Live copies memory while the process runs, in rounds, and stops
	// it only for the last (pfreeze -live; LiveOptions bound it); a
	// tree, every member's memory.
	Live        bool
	LiveOptions LiveOptions
	// StopAndCopy and COWStats are FreezeOptions': without Halt or Live
	// the process is stopped only to be described and forked, unless
	// StopAndCopy (forksnap_linux.go).
	StopAndCopy bool
	COWStats    *COWStats
	// Parent makes the snapshot incremental (FreezeOptions.Parent).
	Parent *Parent
}

// Send freezes pid into the sink named by o.Dest. With o.Halt the process
// is killed only once the snapshot is safe: flushed and synced for a file,
// received, verified and built for a network receiver, which is then told
// to start it. Until then any failure resumes the original where it was,
// and so does cancelling ctx (Freeze), which also aborts the sink: a write
// or a wait for the receiver under way fails at once, and an unfinished
// file is never given its name.
func Send(ctx context.Context, tr *ptrace.Tracer, pid int, o SendOptions) error {
	// Everything that can fail without the process is done first: the
	// process is stopped only once the sink is open and the key read.
	// A process the user may not trace is refused before anything is
	// opened, or a receiver connected to (Attach checks it again).
	if err := mayTrace(pid, pid); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("freeze %d: %w", pid, err)
	}
	sink, err := stream.OpenSink(o.Dest, stream.SinkOptions{DialTimeout: o.DialTimeout, WriteTimeout: o.WriteTimeout,
		Insecure: o.Insecure, OwnerUID: ownerUID(pid), Halt: o.Halt})
	if err != nil {
		return err
	}
	return SendTo(ctx, tr, pid, sink, o)
}

// SendTo is Send to a sink the caller opened (o.Dest, the timeouts and
// Insecure are the sink's business then): for example a
// stream.NewConnSink over a connection between two agents. SendTo closes
// the sink.
func SendTo(ctx context.Context, tr *ptrace.Tracer, pid int, sink stream.Sink, o SendOptions) error {
	defer sink.Close()
	if err := mayTrace(pid, pid); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("freeze %d: %w", pid, err)
	}
	stopAbort := context.AfterFunc(ctx, sink.Abort)
	defer stopAbort()
	var w io.Writer = sink
	var prog *stream.ProgressWriter
	if o.Progress {
		prog = stream.NewProgressWriter(sink, "pfreeze", residentBytes(pid))
		w = prog
	}
	body, err := stream.NewWriter(w, stream.Options{Codec: o.Codec, Cipher: o.Cipher, Key: o.Key})
	if err != nil {
		return err
	}
	commit := func() error {
		if err := body.Close(); err != nil {
			return err
		}
		if o.Halt {
			if err := sink.AwaitReady(o.ReadyTimeout); err != nil {
				if o.Unconfirmed == nil {
					return err
				}
				if err := o.Unconfirmed(err); err != nil {
					return err
				}
			}
			if o.Decide != nil {
				if err := o.Decide(); err != nil {
					return err
				}
			}
			// Past this, an interruption no longer aborts the sink:
			// Freeze either resumes the process (and closing the sink
			// tells the receiver) or kills it, and then the receiver
			// must hear the commit.
			if !stopAbort() {
				return context.Cause(ctx)
			}
			return nil
		}
		return sink.Close()
	}
	fo := FreezeOptions{Halt: o.Halt, Commit: commit, Tree: o.Tree, TCP: o.TCP, Notice: o.Notice, UnixReconnect: o.UnixReconnect, Queried: o.Frozen,
		Parent: o.Parent, StopAndCopy: o.StopAndCopy, COWStats: o.COWStats}
	// A receiver on this host that builds the copy while the original is
	// held may take the original's unix connections to outside peers
	// over.
	if b, ok := sink.(interface{ BuildsFirst() bool }); ok && o.Halt && !o.OtherHost && b.BuildsFirst() {
		fo.UnixHandover = true
	}
	if o.Live {
		fo.Live = &o.LiveOptions
	}
	if o.Halt {
		// Told as soon as the process is killed: its memory is freed
		// after (holdmm_linux.go).
		fo.Killed = func() error {
			if err := sink.Commit(); err != nil {
				return fmt.Errorf("freeze %d: the process was halted but the receiver did not confirm it started it: %w", pid, err)
			}
			return nil
		}
	}
	err = FreezeWith(ctx, tr, pid, body, fo)
	if prog != nil {
		prog.Finish()
	}
	return err
}

// ownerUID returns the user pid wholly belongs to — real, effective,
// saved and filesystem uid all the same — or 0 (root: no one more) when
// they differ (a setuid program's memory may hold its owner's secrets) or
// cannot be read.
func ownerUID(pid int) int {
	st, err := procfs.Status(pid)
	if err != nil {
		return 0
	}
	var c image.Creds
	if err := parseCreds(st, &c); err != nil {
		return 0
	}
	u := c.Uid // real, effective, saved, fs
	if u[0] != u[1] || u[0] != u[2] || u[0] != u[3] {
		return 0
	}
	return int(u[0])
}

// residentBytes estimates the snapshot size for the progress bar.
func residentBytes(pid int) int64 {
	st, err := procfs.Status(pid)
	if err != nil {
		return 0
	}
	var kb int64
	fmt.Sscanf(st["VmRSS"], "%d", &kb)
	return kb << 10
}
