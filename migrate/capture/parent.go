package capture

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/stream"
)

// Parent is a snapshot an incremental one refers to (FreezeOptions.Parent):
// its identity and the digest of every page it holds. The new snapshot
// carries only the pages whose contents differ from the parent's, found
// by comparing the SHA-256 of each page with the parent's (exact: no
// tracking of writes is needed between the two, and a page written back
// to what it was costs nothing).
type Parent struct {
	Record  image.Parent
	Digests *image.PageDigests
}

// pagesOf returns the digests of the pages of the processes pids (in the
// order they are written) that each may refer to in the parent: those of
// the same pid, for the members the parent holds in an order the new
// snapshot keeps (it is read front to back); nil for the others.
func (p *Parent) pagesOf(pids []int) []map[uint64][image.DigestSize]byte {
	out := make([]map[uint64][image.DigestSize]byte, len(pids))
	if p == nil {
		return out
	}
	pos := map[int]int{}
	for i, pid := range p.Digests.Order {
		pos[pid] = i
	}
	last := -1
	for i, pid := range pids {
		if at, ok := pos[pid]; ok && at > last {
			out[i], last = p.Digests.Pages[pid], at
		}
	}
	return out
}

// OpenParent reads the snapshot file path (decrypting it with one of keys;
// with keys, a plaintext one is refused) and returns it as a parent for an
// incremental snapshot.
func OpenParent(path string, keys []stream.Key) (*Parent, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("parent %s: %w", path, err)
	}
	f, err := os.Open(abs)
	if err != nil {
		return nil, fmt.Errorf("parent: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	counted := &countWriter{w: h}
	tee := io.TeeReader(f, counted)
	// With a key, the parent must be encrypted too: a reader with keys
	// refuses plaintext (an attacker's), so a chain is all one or the other.
	body, _, err := stream.NewReader(tee, stream.ReaderOptions{Keys: keys, RequireEncryption: len(keys) > 0})
	if err != nil {
		return nil, fmt.Errorf("parent %s: %w", path, err)
	}
	defer body.Close()
	d, err := image.ReadDigests(image.NewDecoder(body))
	if err != nil {
		return nil, fmt.Errorf("parent %s: %w", path, err)
	}
	// The identity covers every byte of the file.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return nil, fmt.Errorf("parent %s: %w", path, err)
	}
	return &Parent{Record: image.Parent{SHA256: h.Sum(nil), Size: counted.n, Path: abs}, Digests: d}, nil
}

type countWriter struct {
	w io.Writer
	n uint64
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += uint64(len(p))
	return c.w.Write(p)
}

// deltaWriter writes a process's pages against a parent's: runs of pages
// whose digest is the parent's at the same address become ParentPages
// records, the others Pages records, in address order.
type deltaWriter struct {
	enc    *image.Encoder
	parent map[uint64][image.DigestSize]byte
	// refAddr and refs are the ParentPages run being gathered.
	refAddr uint64
	refs    []byte
	// Own and Referred count the bytes written and referred to.
	own, referred uint64
}

// write is called with runs of one memory area each: a ParentPages record
// must not span two areas, so a run never continues the one before.
func (w *deltaWriter) write(addr uint64, data []byte) error {
	if err := w.flush(); err != nil {
		return err
	}
	start := 0 // of the run of the process's own pages not yet written
	for p := 0; p < len(data); p += pageSize {
		a := addr + uint64(p)
		d, ok := w.parent[a]
		if !ok {
			continue
		}
		sum := sha256.Sum256(data[p : p+pageSize])
		if sum != d {
			continue
		}
		if start < p {
			if err := w.writeOwn(addr+uint64(start), data[start:p]); err != nil {
				return err
			}
		}
		start = p + pageSize
		if len(w.refs) > 0 && (w.refAddr+uint64(len(w.refs)/image.DigestSize)*pageSize != a || len(w.refs) == image.MaxParentPages*image.DigestSize) {
			if err := w.flush(); err != nil {
				return err
			}
		}
		if len(w.refs) == 0 {
			w.refAddr = a
		}
		w.refs = append(w.refs, sum[:]...)
		w.referred += pageSize
	}
	if start < len(data) {
		return w.writeOwn(addr+uint64(start), data[start:])
	}
	return nil
}

func (w *deltaWriter) writeOwn(addr uint64, data []byte) error {
	if err := w.flush(); err != nil {
		return err
	}
	w.own += uint64(len(data))
	return w.enc.WritePages(addr, data)
}

// flush writes the ParentPages run gathered so far.
func (w *deltaWriter) flush() error {
	if len(w.refs) == 0 {
		return nil
	}
	err := w.enc.Write(&image.ParentPages{Addr: w.refAddr, Digests: w.refs})
	w.refs = w.refs[:0]
	return err
}
