package stream

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/pcluster/pcluster/internal/keyfile"
)

// KeySize is the exact length of a key file: 32 bytes from a CSPRNG
// (`head -c 32 /dev/urandom > k.key`). A file of any other length is refused
// rather than stretched or truncated, so a text file or a public key handed
// over by mistake is noticed at once.
const KeySize = 32

// keyIDLen is the length in bytes of a key ID (hex-encoded on the header line).
const keyIDLen = 8

// key is a loaded pre-shared key: its bytes, the name the header carries and
// the ID that proves (to the reader) that the right file was found.
type key struct {
	name  string
	id    string
	bytes [KeySize]byte
}

// Key is a pre-shared stream key given as bytes, as a program that derives
// its keys (rather than reading key files) holds them.
type Key struct {
	// Name goes on the header line (key=): a reader with a key
	// directory looks for a file of that name first. A plain name:
	// letters, digits, '-', '_', '.', no leading '.'.
	Name string
	// Bytes are the key: exactly KeySize bytes from a CSPRNG.
	Bytes []byte
}

// ID returns the key's public identifier (KeyID), which the header line
// carries (keyid=) and readers find the key by.
func (k Key) ID() string { return KeyID(k.Bytes) }

// load checks k and copies it into the internal form.
func (k Key) load() (*key, error) {
	if len(k.Bytes) != KeySize {
		return nil, fmt.Errorf("key %s holds %d bytes, want exactly %d", k.Name, len(k.Bytes), KeySize)
	}
	if !validKeyName(k.Name) {
		return nil, fmt.Errorf("key name %q cannot go on the header line (use letters, digits, '-', '_', '.', no leading '.')", k.Name)
	}
	c := &key{name: k.Name}
	copy(c.bytes[:], k.Bytes)
	c.id = KeyID(c.bytes[:])
	return c, nil
}

// ReadKeyFile loads a sender's key file: exactly KeySize bytes, named
// after the file. The file may belong to another user (the receiving
// user's key); it must not be writable by others. Errors name the file
// but never its content.
func ReadKeyFile(path string) (Key, error) {
	k, err := readKeyFile(path, true)
	if err != nil {
		return Key{}, err
	}
	return Key{Name: k.name, Bytes: append([]byte(nil), k.bytes[:]...)}, nil
}

// KeyID returns the short public identifier of a 32-byte key: the first 8
// bytes of HMAC-SHA-256(key, "pcluster-stream key id v1"), hex-encoded. It
// reveals nothing usable about the key and lets a reader pick the right file
// out of a key directory even when it was renamed.
func KeyID(k []byte) string {
	m := hmac.New(sha256.New, k)
	m.Write([]byte("pcluster-stream key id v1"))
	return hex.EncodeToString(m.Sum(nil)[:keyIDLen])
}

// readKeyFile loads a key file and checks its length. Errors name the file
// but never its content. anyOwner: the file may belong to another user (a
// sender's key); a receiver's keys must be ours or root's.
func readKeyFile(path string, anyOwner bool) (*key, error) {
	read := keyfile.Read
	if anyOwner {
		read = keyfile.ReadAnyOwner
	}
	buf, err := read(path, KeySize)
	if err != nil {
		return nil, err
	}
	defer clear(buf)
	if len(buf) != KeySize {
		what := fmt.Sprintf("holds %d bytes, want exactly %d", len(buf), KeySize)
		if len(buf) > KeySize {
			what = fmt.Sprintf("is longer than %d bytes", KeySize)
		}
		return nil, fmt.Errorf("key file %s %s (make one with: (umask 077; head -c 32 /dev/urandom > %s))", path, what, filepath.Base(path))
	}
	k := &key{name: filepath.Base(path)}
	copy(k.bytes[:], buf)
	k.id = KeyID(k.bytes[:])
	return k, nil
}

// validKeyName reports whether name may be looked up in a key directory: a
// plain file name, never a path, so that a forged header cannot point the
// reader at a file outside the directory.
func validKeyName(name string) bool {
	return validToken(name) && !strings.ContainsAny(name, `/\`) && !strings.HasPrefix(name, ".")
}

// findKey looks up the key a header names: among keys by its ID, then in
// dir: first the file called
// name, then (if it is missing or holds another key) any 32-byte regular file
// in dir whose ID matches. It never reads outside dir.
func findKey(keys []Key, dir, name, id string) (*key, error) {
	for _, k := range keys {
		if len(k.Bytes) == KeySize && hmac.Equal([]byte(k.ID()), []byte(id)) {
			c := &key{name: k.Name, id: k.ID()}
			copy(c.bytes[:], k.Bytes)
			return c, nil
		}
	}
	if dir == "" && len(keys) > 0 {
		return nil, fmt.Errorf("snapshot is encrypted with key %s (id %s): none of the %d given keys has that id", name, id, len(keys))
	}
	if dir == "" {
		return nil, fmt.Errorf("snapshot is encrypted with key %s (id %s): no key directory given", name, id)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("key directory: %w", err)
	}
	if err := keyfile.Check(dir, fi); err != nil {
		return nil, err
	}
	var firstErr error
	if validKeyName(name) {
		k, err := readKeyFile(filepath.Join(dir, name), false)
		if err == nil && hmac.Equal([]byte(k.id), []byte(id)) {
			k.name = name
			return k, nil
		}
		if err == nil {
			firstErr = fmt.Errorf("key %s in %s has id %s, the snapshot was encrypted with key id %s: wrong key", name, dir, k.id, id)
		} else if !errors.Is(err, os.ErrNotExist) {
			firstErr = err
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read key directory: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || e.Name() == name {
			continue
		}
		info, err := e.Info()
		if err != nil || info.Size() != KeySize {
			continue
		}
		k, err := readKeyFile(filepath.Join(dir, e.Name()), false)
		if err == nil && hmac.Equal([]byte(k.id), []byte(id)) {
			return k, nil
		}
	}
	if firstErr != nil {
		return nil, firstErr
	}
	return nil, fmt.Errorf("no key named %s or with id %s in %s", name, id, dir)
}
