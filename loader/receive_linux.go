package loader

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// ReceiveOptions say where a snapshot comes from and how it is checked.
type ReceiveOptions struct {
	Src string // stdin | FILE | tcp:[HOST:]PORT | unix:PATH (Receive only)
	// Keys and KeyDir hold the keys of encrypted snapshots (Keys, as
	// bytes, are looked up first); with either, plaintext is refused.
	Keys        []stream.Key
	KeyDir      string
	ReadTimeout time.Duration
	// CommitTimeout bounds the wait for the sender's go-ahead once the
	// process is built (a -halt migration).
	CommitTimeout time.Duration
	Insecure      bool      // allow a non-loopback listener without keys
	Warn          io.Writer // receives warnings and "listening on" lines
	Progress      bool
	// Interrupt, when it delivers, gives up while waiting for a sender or
	// reading and building: the half-built process is killed and the
	// sender, if any, resumes its original. Once the process is reported
	// built to a -halt sender (which then kills its original) it is no
	// longer heeded: from then on only the sender decides.
	Interrupt <-chan os.Signal
	// Parents are files that may be the parents of an incremental
	// snapshot (pthaw -parent); a parent not among them is looked for at
	// the path the snapshot records. Either is used only if its SHA-256
	// is the one the snapshot records.
	Parents []string
	Options
}

// Receive reads a snapshot from o.Src, builds the process and, once the
// sender agrees (network -halt migrations), starts it. Nothing runs before
// every byte has been authenticated (encrypted streams) and the snapshot's
// checksum verified; on any failure the half-built process is killed and
// the sender told, so that it resumes the original. Cancelling ctx (like
// o.Interrupt) gives up until the process is reported built to a -halt
// sender: then only the sender decides.
func Receive(ctx context.Context, tr *ptrace.Tracer, o ReceiveOptions) (*Process, error) {
	src, err := openSource(o)
	if err != nil {
		return nil, err
	}
	return ReceiveFrom(ctx, tr, src, o)
}

// ReceiveFrom is Receive from a source the caller opened (o.Src, the
// timeouts of reading and Insecure are the source's business then): for
// example a stream.NewConnSource over a connection between two agents.
// It runs the whole receiving side: the snapshot read to its end and
// verified, Build, Ready, AwaitCommit (up to o.CommitTimeout), Start.
// ReceiveFrom closes src.
func ReceiveFrom(ctx context.Context, tr *ptrace.Tracer, src stream.Source, o ReceiveOptions) (*Process, error) {
	defer src.Close()
	intr := watchInterrupt(ctx, o.Interrupt, src)
	defer intr.stop()
	body, dec, err := openBody(src, o)
	if err != nil {
		err = intr.explain(err)
		src.Ready(err)
		return nil, err
	}
	defer body.Close()
	p, err := Build(ctx, tr, dec, o.Options)
	if err == nil {
		if err = dec.ExpectEOF(); err != nil {
			p.Abort()
			err = fmt.Errorf("thaw: %w", err)
		}
	}
	if err == nil && intr.stop() {
		p.Abort()
		err = intr.explain(nil)
	}
	if err != nil {
		err = intr.explain(err)
		// Let the sender finish writing, so that it reads our reason
		// instead of a reset connection; a broken stream ends this at once.
		io.Copy(io.Discard, body)
		src.Ready(err)
		return nil, err
	}
	if err := src.Ready(nil); err != nil {
		p.Abort()
		return nil, fmt.Errorf("thaw: %w", err)
	}
	if err := src.AwaitCommit(o.CommitTimeout); err != nil {
		p.Abort()
		return nil, fmt.Errorf("thaw: %w (process not started)", err)
	}
	if err := p.Start(); err != nil {
		return nil, err
	}
	return p, nil
}

// interruptWatch closes the source when a signal arrives or ctx is done,
// until stopped.
type interruptWatch struct {
	mu      sync.Mutex
	stopped bool
	sig     os.Signal // the signal that closed the source, if any
	cause   error     // or ctx's cause, if ctx did
	done    chan struct{}
}

func watchInterrupt(ctx context.Context, c <-chan os.Signal, src io.Closer) *interruptWatch {
	w := &interruptWatch{done: make(chan struct{})}
	go func() {
		select {
		case s := <-c: // never, when c is nil
			w.mu.Lock()
			if !w.stopped {
				w.sig = s
				src.Close()
			}
			w.mu.Unlock()
		case <-ctx.Done():
			w.mu.Lock()
			if !w.stopped {
				w.cause = context.Cause(ctx)
				src.Close()
			}
			w.mu.Unlock()
		case <-w.done:
		}
	}()
	return w
}

// stop ends the watch and reports whether a signal or ctx came first.
// After it returns no signal is taken from the channel.
func (w *interruptWatch) stop() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.stopped {
		w.stopped = true
		close(w.done)
	}
	return w.sig != nil || w.cause != nil
}

// explain replaces err, the consequence of closing the source (or nil), by
// the signal or the cancellation that did it.
func (w *interruptWatch) explain(err error) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.sig != nil:
		return fmt.Errorf("interrupted by %s before the process was built: nothing restored", signalName(w.sig))
	case w.cause != nil:
		return fmt.Errorf("thaw: %w before the process was built: nothing restored", w.cause)
	}
	return err
}

// signalName names s as kill(1) does ("SIGTERM"), not by its description.
func signalName(s os.Signal) string {
	if n, ok := s.(syscall.Signal); ok {
		if name := unix.SignalName(n); name != "" {
			return name
		}
	}
	return s.String()
}

// Describe prints the snapshot read from o.Src (pthaw -debug).
func Describe(w io.Writer, o ReceiveOptions) error {
	src, err := openSource(o)
	if err != nil {
		return err
	}
	defer src.Close()
	body, dec, err := openBody(src, o)
	if err != nil {
		return err
	}
	defer body.Close()
	return image.Describe(w, dec, ptrace.RegNames[:])
}

func openSource(o ReceiveOptions) (stream.Source, error) {
	src, err := stream.OpenSource(o.Src, stream.SourceOptions{
		ReadTimeout: o.ReadTimeout, HaveKeys: o.KeyDir != "", KeyDir: o.KeyDir, Insecure: o.Insecure, Warn: o.Warn})
	if err != nil {
		return nil, err
	}
	if o.Warn != nil && (strings.HasPrefix(o.Src, "tcp:") || strings.HasPrefix(o.Src, "unix:")) {
		fmt.Fprintf(o.Warn, "pthaw: listening on %s\n", src.Addr())
	}
	return src, nil
}

func openBody(src stream.Source, o ReceiveOptions) (io.ReadCloser, *image.Decoder, error) {
	var r io.Reader = src
	if o.Progress {
		r = stream.NewProgressReader(src, "pthaw", 0)
	}
	body, h, err := stream.NewReader(r, stream.ReaderOptions{Keys: o.Keys, KeyDir: o.KeyDir, RequireEncryption: o.KeyDir != "" || len(o.Keys) > 0})
	if err != nil {
		return nil, nil, err
	}
	dec := NewDecoder(body, h)
	c := &chain{}
	dec.ResolveParents(c.resolver(o, 0))
	return &chainBody{body, c}, dec, nil
}

// NewDecoder returns the decoder that a restore reads a snapshot's body
// with (body and h from stream.NewReader): thread records are checked
// for this architecture's registers, and an encrypted stream's CRC-32C is
// not computed (every chunk is authenticated, the last one marked: the
// checksum would add nothing).
func NewDecoder(body io.Reader, h *stream.Header) *image.Decoder {
	dec := image.NewDecoder(body)
	dec.CheckRegisters(ptrace.NumRegs)
	if h.Get(stream.KeyEncrypt, stream.CipherNone) != stream.CipherNone {
		dec.SkipChecksum()
	}
	return dec
}

// chainBody is a snapshot's body and the parents it refers to.
type chainBody struct {
	io.ReadCloser
	parents *chain
}

func (b *chainBody) Close() error {
	b.parents.Close()
	return b.ReadCloser.Close()
}
