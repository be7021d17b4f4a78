package loader

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

// maxChain bounds how many parents an incremental snapshot may have
// behind it (each is a file open while the process is built).
const maxChain = 256

// chain holds the parent files an incremental snapshot's decoder opened;
// closing it closes them all.
type chain struct {
	closers []io.Closer
	// given: look for parents only among the files given, not at the
	// paths snapshots record (an agent reads only its own files).
	given bool
}

// FollowParents makes dec, the decoder of a snapshot that may be
// incremental, read its parents (and theirs) from among paths, each used
// only if its size and SHA-256 are the ones recorded, decrypted with keys.
// The Closer closes the parents' files: call it once done with dec.
func FollowParents(dec *image.Decoder, paths []string, keys []stream.Key) io.Closer {
	c := &chain{given: true}
	dec.ResolveParents(c.resolver(ReceiveOptions{Keys: keys, Parents: paths}, 0))
	return c
}

func (c *chain) Close() error {
	for i := len(c.closers) - 1; i >= 0; i-- {
		c.closers[i].Close()
	}
	c.closers = nil
	return nil
}

// resolver opens the parent a snapshot names: the first of o.Parents, or
// else the file at the path the snapshot records, whose size and SHA-256
// are the ones the snapshot records. Its own parent is found the same way.
func (c *chain) resolver(o ReceiveOptions, depth int) image.ParentResolver {
	return func(p *image.Parent) (image.PageSource, error) {
		if depth >= maxChain {
			return nil, fmt.Errorf("parent %s: more than %d snapshots in the chain", p.Path, maxChain)
		}
		path, verified, err := findParent(p, o.Parents, !c.given)
		if err != nil {
			return nil, err
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("parent: %w", err)
		}
		c.closers = append(c.closers, f)
		// A parent not hashed to be found is hashed as it is read, and
		// checked once read (before the process may run; every page taken
		// from it is checked against its own digest as it comes).
		var r io.Reader = f
		var check func() error
		if !verified {
			h := sha256.New()
			r = io.TeeReader(f, h)
			check = func() error {
				if _, err := io.Copy(io.Discard, r); err != nil {
					return err
				}
				if sum := h.Sum(nil); !bytes.Equal(sum, p.SHA256) {
					return fmt.Errorf("%w: its sha256 is %.16x…, the snapshot was made against %.16x…", image.ErrWrongParent, sum, p.SHA256)
				}
				return nil
			}
		}
		body, _, err := stream.NewReader(r, stream.ReaderOptions{Keys: o.Keys, KeyDir: o.KeyDir, RequireEncryption: o.KeyDir != "" || len(o.Keys) > 0})
		if err != nil {
			return nil, fmt.Errorf("parent %s: %w", path, err)
		}
		c.closers = append(c.closers, body)
		dec := image.NewDecoder(body)
		dec.CheckRegisters(ptrace.NumRegs)
		dec.ResolveParents(c.resolver(o, depth+1))
		return &namedSource{PageSource: image.NewPageSource(dec, check), path: path}, nil
	}
}

// namedSource names the parent file in its errors.
type namedSource struct {
	image.PageSource
	path string
}

func (s *namedSource) ReadPages(pid int, addr uint64, p []byte) error {
	if err := s.PageSource.ReadPages(pid, addr, p); err != nil {
		return fmt.Errorf("%s: %w", s.path, err)
	}
	return nil
}

func (s *namedSource) String() string { return s.path }

func (s *namedSource) Close() error {
	if err := s.PageSource.Close(); err != nil {
		return fmt.Errorf("%s: %w", s.path, err)
	}
	return nil
}

// findParent returns the first of candidates, then (if recorded) p.Path,
// that can be p: of its size, and when several are, of its SHA-256
// (verified: true). A single file of the right size is returned
// unverified: the caller checks its digest as it reads it.
func findParent(p *image.Parent, candidates []string, recorded bool) (path string, verified bool, err error) {
	want := hex.EncodeToString(p.SHA256)
	paths := append([]string(nil), candidates...)
	if recorded {
		paths = append(paths, p.Path)
	}
	var sized []string
	var mismatch error
	for _, path := range paths {
		st, err := os.Stat(path)
		if path == "" || err != nil && os.IsNotExist(err) {
			continue
		}
		switch {
		case err != nil:
			if mismatch == nil {
				mismatch = fmt.Errorf("parent %s: %w", path, err)
			}
		case !st.Mode().IsRegular():
			if mismatch == nil {
				mismatch = fmt.Errorf("parent %s: not a regular file", path)
			}
		case uint64(st.Size()) != p.Size:
			if mismatch == nil {
				mismatch = fmt.Errorf("parent %s: %w: %d bytes, the snapshot was made against one of %d", path, image.ErrWrongParent, st.Size(), p.Size)
			}
		default:
			sized = append(sized, path)
		}
	}
	if len(sized) == 1 {
		return sized[0], false, nil
	}
	for _, path := range sized {
		sum, err := fileDigest(path)
		if err != nil {
			if mismatch == nil {
				mismatch = fmt.Errorf("parent %s: %w", path, err)
			}
			continue
		}
		if sum == want {
			return path, true, nil
		}
		if mismatch == nil {
			mismatch = fmt.Errorf("parent %s: %w: its sha256 is %.16s…, the snapshot was made against %.16s…", path, image.ErrWrongParent, sum, want)
		}
	}
	if mismatch != nil {
		return "", false, mismatch
	}
	return "", false, fmt.Errorf("parent snapshot %s (sha256 %.16s…) not found; give its path with -parent", p.Path, want)
}

func fileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
