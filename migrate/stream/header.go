// Package stream frames a snapshot for transport: the plain-text header line
// that opens every snapshot, and the layers (compression, authenticated
// encryption) and endpoints (stdout/stdin, files, FIFOs, tcp and unix
// sockets) the body travels through, plus the -halt handshake that lets the
// sender kill the original only once the receiver has built the clone.
//
// The writer stacks records → compression → encryption → sink; the header
// line names every layer, so a reader needs only the key directory. The
// encryption is a chunked AEAD (STREAM, as in age) under a per-stream key
// bound to the header line: truncation, reordering and tampering fail.
// docs/stream.md specifies every byte.
//
// The header line is the only part of a snapshot that is not inside the
// layers it names, so it is parsed defensively: bounded length, known keys
// only, one version number that says how everything after it is laid out.
//
// Sinks, sources and the readers and writers are used by one goroutine
// each; only Source.Close may be called from another (to stop a listener).
package stream

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// Magic opens every snapshot. It is followed by the format version.
const Magic = "PCLUSTER-SNAPSHOT"

// Version is the newest snapshot format this build reads and the one it writes.
const Version = 1

// MaxHeaderLen bounds the header line, newline included, so that random input
// is rejected after a few bytes instead of being buffered.
const MaxHeaderLen = 1024

// ErrNotSnapshot is returned when the input does not start with Magic.
var ErrNotSnapshot = errors.New("not a pcluster snapshot (no " + Magic + " header)")

// Header describes how the body of a snapshot is encoded. Fields are
// key=value pairs on the header line; a key this build does not know is an
// error, because ignoring it could mean misreading every byte after it.
type Header struct {
	Version int
	// Params holds every key=value pair of the line, e.g. compress=zstd,
	// encrypt=aes-gcm, key=NAME. Layers read the keys they own.
	Params map[string]string

	// raw is the exact line ReadHeader consumed, newline included; it is
	// what the encryption layer authenticates.
	raw string
}

// Get returns the value of key, or def when the header does not carry it.
func (h *Header) Get(key, def string) string {
	if v, ok := h.Params[key]; ok {
		return v
	}
	return def
}

// String formats h as the header line, newline included. Keys are sorted so
// the same header always produces the same bytes.
func (h *Header) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d", Magic, h.Version)
	keys := make([]string, 0, len(h.Params))
	for k := range h.Params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%s", k, h.Params[k])
	}
	b.WriteByte('\n')
	return b.String()
}

// WriteHeader writes h's line to w.
func WriteHeader(w io.Writer, h *Header) error {
	for k, v := range h.Params {
		if !validToken(k) || !validToken(v) {
			return fmt.Errorf("header: invalid parameter %q=%q", k, v)
		}
	}
	s := h.String()
	if len(s) > MaxHeaderLen {
		return fmt.Errorf("header: %d bytes, longer than %d", len(s), MaxHeaderLen)
	}
	_, err := io.WriteString(w, s)
	return err
}

// ReadHeader reads the header line from r one byte at a time, so that not a
// byte of the body is consumed: the caller hands r on to the layers.
// known lists the keys the caller understands; any other key is an error.
func ReadHeader(r io.Reader, known ...string) (*Header, error) {
	br, ok := r.(io.ByteReader)
	if !ok {
		br = &byteReader{r: r}
	}
	var line []byte
	for {
		c, err := br.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				if len(line) == 0 {
					return nil, errors.New("empty input: no snapshot")
				}
				if !strings.HasPrefix(Magic, string(line)) && !strings.HasPrefix(string(line), Magic) {
					return nil, ErrNotSnapshot
				}
				return nil, errors.New("snapshot header truncated")
			}
			return nil, fmt.Errorf("read snapshot header: %w", err)
		}
		if c == '\n' {
			break
		}
		line = append(line, c)
		if len(line) <= len(Magic) && !strings.HasPrefix(Magic, string(line)) {
			return nil, ErrNotSnapshot
		}
		if len(line) >= MaxHeaderLen {
			return nil, fmt.Errorf("snapshot header longer than %d bytes", MaxHeaderLen)
		}
	}
	h, err := parseHeader(string(line), known)
	if err != nil {
		return nil, err
	}
	h.raw = string(line) + "\n"
	return h, nil
}

func parseHeader(line string, known []string) (*Header, error) {
	fields := strings.Split(line, " ")
	if fields[0] != Magic {
		return nil, ErrNotSnapshot
	}
	if len(fields) < 2 {
		return nil, errors.New("snapshot header has no version")
	}
	v, err := strconv.Atoi(fields[1])
	if err != nil || v < 1 {
		return nil, fmt.Errorf("snapshot header: bad version %q", fields[1])
	}
	if v > Version {
		return nil, fmt.Errorf("snapshot format version %d is newer than this build reads (%d): upgrade pthaw", v, Version)
	}
	h := &Header{Version: v, Params: map[string]string{}}
	for _, f := range fields[2:] {
		k, val, ok := strings.Cut(f, "=")
		if !ok || !validToken(k) || !validToken(val) {
			return nil, fmt.Errorf("snapshot header: malformed field %q", f)
		}
		if !contains(known, k) {
			return nil, fmt.Errorf("snapshot header: unknown field %q (written by a newer build?)", k)
		}
		if _, dup := h.Params[k]; dup {
			return nil, fmt.Errorf("snapshot header: field %q given twice", k)
		}
		h.Params[k] = val
	}
	return h, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// validToken reports whether s may appear as a key or value: printable ASCII
// without spaces or '='.
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c > '~' || c == '=' {
			return false
		}
	}
	return true
}

type byteReader struct {
	r   io.Reader
	buf [1]byte
}

func (b *byteReader) ReadByte() (byte, error) {
	if _, err := io.ReadFull(b.r, b.buf[:]); err != nil {
		return 0, err
	}
	return b.buf[0], nil
}
