package loader

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// ReceiveOptions say where a snapshot comes from and how it is checked.
type ReceiveOptions struct {
	Src         string // stdin | FILE | tcp:[HOST:]PORT | unix:PATH
	KeyDir      string // keys for encrypted snapshots; plaintext is then refused
	ReadTimeout time.Duration
	// CommitTimeout bounds the wait for the sender's go-ahead once the
	// process is built (a -halt migration).
	CommitTimeout time.Duration
	Insecure      bool      // allow a non-loopback listener without keys
	Warn          io.Writer // receives warnings and "listening on" lines
	Progress      bool
	Options
}

// Receive reads a snapshot from o.Src, builds the process and, once the
// sender agrees (network -halt migrations), starts it. Nothing runs before
// every byte has been authenticated (encrypted streams) and the snapshot's
// checksum verified; on any failure the half-built process is killed and
// the sender told, so that it resumes the original.
func Receive(tr *ptrace.Tracer, o ReceiveOptions) (*Process, error) {
	src, err := openSource(o)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	body, dec, err := openBody(src, o)
	if err != nil {
		src.Ready(err)
		return nil, err
	}
	defer body.Close()
	p, err := Build(tr, dec, o.Options)
	if err == nil {
		if err = dec.ExpectEOF(); err != nil {
			p.Abort()
			err = fmt.Errorf("thaw: %w", err)
		}
	}
	if err != nil {
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
		ReadTimeout: o.ReadTimeout, HaveKeys: o.KeyDir != "", Insecure: o.Insecure, Warn: o.Warn})
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
	body, _, err := stream.NewReader(r, stream.ReaderOptions{KeyDir: o.KeyDir, RequireEncryption: o.KeyDir != ""})
	if err != nil {
		return nil, nil, err
	}
	return body, image.NewDecoder(body), nil
}
