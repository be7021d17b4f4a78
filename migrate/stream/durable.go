package stream

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// ErrNoProof is wrapped by the refusal of a sink that cannot prove a
// snapshot safe: nothing acknowledges a pipe, a FIFO, a terminal or a
// device, so a caller that kills the process once AwaitReady returns could
// lose it (the reader may fail after reading it all, or be killed).
var ErrNoProof = errors.New("nothing there can prove the snapshot safe before the process is killed")

// checkHaltPath refuses, before the file is opened (opening a FIFO for
// writing would wait for a reader), a path sink that could not prove the
// snapshot safe. A path that does not exist yet becomes a regular file.
func checkHaltPath(spec, path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return nil
	}
	return haltKind(spec, path, fi)
}

// checkHalt refuses a sink whose open file could not prove the snapshot
// safe: only a regular file can, once fsync'ed (AwaitReady). It decides by
// fstat, whatever the name says (-dest /dev/stdout, stdout redirected).
func (s *fileSink) checkHalt() error {
	if s.regular() {
		return nil // ours: fsync'ed and named by finish
	}
	fi, err := s.f.Stat()
	if err != nil {
		return fmt.Errorf("stream: sink %s: %w", s.spec, err)
	}
	what := s.path
	if s.std {
		what = "stdout"
	}
	return haltKind(s.spec, what, fi)
}

func haltKind(spec, what string, fi os.FileInfo) error {
	m := fi.Mode()
	var kind string
	switch {
	case m.IsRegular():
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink == 0 {
			kind = "a deleted file"
			break
		}
		return nil
	case m&os.ModeNamedPipe != 0:
		kind = "a pipe"
		if what != "stdout" {
			kind = "a FIFO"
		}
	case m&os.ModeSocket != 0:
		kind = "a socket without the migration handshake"
	case m&os.ModeCharDevice != 0:
		kind = "a character device"
	case m&os.ModeDevice != 0:
		kind = "a block device"
	default:
		kind = "not a regular file"
	}
	return fmt.Errorf("stream: sink %s: %s is %s: %w", spec, what, kind, ErrNoProof)
}

// durable completes AwaitReady's promise after finish: the file's data is
// on disk and so is the directory entry that names it. finish syncs the
// file; a rename into place or a name the shell made (stdout redirected)
// also needs its directory synced, and any failure means the snapshot is
// not known to be safe.
func (s *fileSink) durable() error {
	switch {
	case s.regular():
		return syncDir(s.spec, filepath.Dir(s.path))
	case s.std:
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("stream: sync %s: %w", s.spec, err)
		}
		name, err := os.Readlink("/proc/self/fd/" + fmt.Sprint(s.f.Fd()))
		if err != nil {
			return fmt.Errorf("stream: sync %s: %w", s.spec, err)
		}
		if strings.HasSuffix(name, " (deleted)") || !filepath.IsAbs(name) {
			return fmt.Errorf("stream: sink %s: the file was deleted: %w", s.spec, ErrNoProof)
		}
		return syncDir(s.spec, filepath.Dir(name))
	}
	return nil
}

func syncDir(spec, dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("stream: sync %s: directory %s: %w", spec, dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("stream: sync %s: directory %s: %w", spec, dir, err)
	}
	return nil
}
