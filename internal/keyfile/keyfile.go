// Package keyfile reads secret key files the way ssh reads private keys:
// only a regular file that belongs to us (or root) and that no one else can
// read or write. A key others can read is no secret; one others can write
// lets them forge whatever the key authenticates (a snapshot that pthaw
// runs as root, a node that joins the cluster).
package keyfile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Read returns the contents of the key file at path, at most max bytes
// plus one (so that the caller can tell a file that is too long). It opens
// without blocking (a FIFO planted in a key directory cannot hang the
// reader) and refuses anything but a regular file owned by the effective
// user or root with no group or other permissions.
func Read(path string, max int) ([]byte, error) {
	return read(path, max, false)
}

// ReadAnyOwner is Read for a key that only encrypts what we send (pfreeze
// -encrypt): the file may belong to anyone — root sealing a snapshot for a
// user's pthaw uses that user's key — but must still be private to its
// owner.
func ReadAnyOwner(path string, max int) ([]byte, error) {
	return read(path, max, true)
}

func read(path string, max int, anyOwner bool) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("key file %s is not a regular file (%v)", path, fi.Mode().Type())
	}
	if err := check(path, fi, anyOwner); err != nil {
		return nil, err
	}
	buf := make([]byte, max+1)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return buf[:n], nil
}

// Check refuses a key file (or key directory) that another user owns or
// that group or others may use: a directory others can write lets them add
// keys; a file others can read is no secret.
func Check(path string, fi os.FileInfo) error {
	return check(path, fi, false)
}

func check(path string, fi os.FileInfo, anyOwner bool) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner information", path)
	}
	if !anyOwner && int(st.Uid) != os.Geteuid() && st.Uid != 0 {
		return fmt.Errorf("%s belongs to uid %d, neither us (%d) nor root: refusing a key another user controls", path, st.Uid, os.Geteuid())
	}
	if fi.IsDir() {
		if fi.Mode().Perm()&0o022 != 0 {
			return fmt.Errorf("key directory %s is writable by group or others (mode %04o): anyone could add a key; chmod go-w %s", path, fi.Mode().Perm(), path)
		}
		return nil
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("key file %s is accessible to group or others (mode %04o): a key others can read is no secret; chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	return nil
}
