package loader

import (
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
		path, err := findParent(p, o.Parents, !c.given)
		if err != nil {
			return nil, err
		}
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("parent: %w", err)
		}
		c.closers = append(c.closers, f)
		body, _, err := stream.NewReader(f, stream.ReaderOptions{Keys: o.Keys, KeyDir: o.KeyDir, RequireEncryption: o.KeyDir != "" || len(o.Keys) > 0})
		if err != nil {
			return nil, fmt.Errorf("parent %s: %w", path, err)
		}
		c.closers = append(c.closers, body)
		dec := image.NewDecoder(body)
		dec.CheckRegisters(ptrace.NumRegs)
		dec.ResolveParents(c.resolver(o, depth+1))
		return &namedSource{PageSource: image.NewPageSource(dec, nil), path: path}, nil
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

func (s *namedSource) Close() error {
	if err := s.PageSource.Close(); err != nil {
		return fmt.Errorf("%s: %w", s.path, err)
	}
	return nil
}

// findParent returns the first of candidates, then (if recorded) p.Path,
// whose size and SHA-256 are p's.
func findParent(p *image.Parent, candidates []string, recorded bool) (string, error) {
	want := hex.EncodeToString(p.SHA256)
	var mismatch error
	paths := append([]string(nil), candidates...)
	if recorded {
		paths = append(paths, p.Path)
	}
	for _, path := range paths {
		if path == "" {
			continue
		}
		// The size first: a file of another size is not hashed.
		if st, err := os.Stat(path); err == nil && uint64(st.Size()) != p.Size && st.Mode().IsRegular() {
			if mismatch == nil {
				mismatch = fmt.Errorf("parent %s: %w: %d bytes, the snapshot was made against one of %d", path, image.ErrWrongParent, st.Size(), p.Size)
			}
			continue
		}
		sum, size, err := fileDigest(path)
		if err != nil {
			if mismatch == nil && path == p.Path && !os.IsNotExist(err) {
				mismatch = fmt.Errorf("parent %s: %w", path, err)
			}
			continue
		}
		if size == p.Size && sum == want {
			return path, nil
		}
		if mismatch == nil {
			mismatch = fmt.Errorf("parent %s: %w: its sha256 is %.16s…, the snapshot was made against %.16s…", path, image.ErrWrongParent, sum, want)
		}
	}
	if mismatch != nil {
		return "", mismatch
	}
	return "", fmt.Errorf("parent snapshot %s (sha256 %.16s…) not found; give its path with -parent", p.Path, want)
}

func fileDigest(path string) (string, uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), uint64(n), nil
}
