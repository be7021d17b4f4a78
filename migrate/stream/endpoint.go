package stream

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Sink is where a snapshot is written: stdout, a file or a socket.
//
// With -halt the sender calls AwaitReady after closing the body writer: it
// returns nil once the receiver reports that it received and verified the
// whole stream and built the process. The sender then kills the original
// and calls Commit to let the receiver start the clone. Any error from
// AwaitReady means the receiver will not start the clone: resume the
// original. For a regular file (named, or stdout redirected to one)
// AwaitReady makes the snapshot durable (fsync of the file and of its
// directory, and the atomic rename of a named file) and Commit does
// nothing, so "-halt" still means "kill once the snapshot is safely
// written". Nothing acknowledges a pipe, a FIFO, a terminal or a device:
// there AwaitReady refuses (ErrNoProof), and SinkOptions.Halt refuses at
// OpenSink, before the process is touched.
type Sink interface {
	io.WriteCloser
	// String returns the spec the sink was opened with.
	String() string
	AwaitReady(timeout time.Duration) error
	Commit() error
	// Abort gives up the snapshot (the sender was interrupted): a write,
	// AwaitReady or Commit under way or to come fails, a file is not
	// kept and a receiver sees a broken stream. Unlike the other methods
	// it may be called from any goroutine, while the sender uses the sink.
	Abort()
}

// Source is where a snapshot is read from: stdin, a file or a socket that
// accepts one sender.
//
// After reading the body to io.EOF the receiver builds the process and calls
// Ready(nil) (or Ready(err) when it failed), then AwaitCommit: nil means
// start the clone; an error means kill the half-built process. When the
// sender did not ask for the handshake (no -halt), or the source is not a
// socket, both return nil at once.
type Source interface {
	io.ReadCloser
	// String returns the spec the source was opened with.
	String() string
	// Addr returns the address actually listened on (useful with port 0),
	// or the path of a file source.
	Addr() string
	Ready(err error) error
	AwaitCommit(timeout time.Duration) error
}

// SinkOptions tune network sinks; zero means no limit.
type SinkOptions struct {
	DialTimeout  time.Duration
	WriteTimeout time.Duration // per write, extended on progress
	// Insecure allows an unencrypted stream to a TCP receiver beyond
	// loopback, with a warning line on Warn. Without it such a stream is
	// refused: anyone on the path could read the process's memory, and an
	// impostor receiver could accept it and have -halt kill the original.
	// (An unencrypted stream to a loopback or unix receiver goes only to
	// a receiver running as our own user or root.)
	Insecure bool
	// OwnerUID is one more user an unencrypted stream may go to over
	// loopback or a unix socket: the owner of the process being frozen
	// (root's pfreeze sending a user's process to that user's pthaw),
	// whose memory it is anyway. 0 (root) adds no one.
	OwnerUID int
	// Warn receives warning lines; nil means os.Stderr.
	Warn io.Writer
	// Authenticated says the connection itself authenticates the
	// receiver (NewConnSink over mutual TLS with the cluster's
	// certificates): plaintext may then go to it whatever its address,
	// and the loopback and unix peer-user checks (which a TLS connection
	// cannot answer) are skipped. Only a connection on which both ends
	// proved who they are may set it: anything else would send the
	// process's memory to whoever answered, and let them have a -halt
	// original killed.
	Authenticated bool
	// Halt says the caller will kill the process once AwaitReady returns:
	// OpenSink then refuses (ErrNoProof) a sink that could not prove the
	// snapshot safe — a pipe, FIFO, terminal, device or socket reached as
	// a file — so that the refusal comes before the process is stopped.
	Halt bool
}

// SourceOptions tune sources.
type SourceOptions struct {
	ReadTimeout time.Duration // per read once a sender is connected, extended on progress
	// HaveKeys says the caller will refuse plaintext (pthaw -keydir): only
	// then may a TCP source listen on a non-loopback address.
	HaveKeys bool
	// KeyDir, with HaveKeys, is the caller's key directory: a listener
	// then takes as its sender only a connection that authenticates — its
	// header names a key of KeyDir and its first chunk verifies under it —
	// so that nobody without a key can take the listener's one turn.
	// Another connection is told it was refused and dropped.
	KeyDir string
	// Insecure allows a non-loopback TCP listener without keys, with a
	// warning line on Warn.
	Insecure bool
	// Authenticated says the connection itself authenticates the sender
	// (NewConnSource over mutual TLS with the cluster's certificates):
	// plaintext may then come from it whatever its address, and the
	// loopback and unix peer-user checks are skipped. Only a connection
	// on which both ends proved who they are may set it: anything else
	// would run whatever process a stranger sends.
	Authenticated bool
	// Warn receives warning lines; nil means os.Stderr.
	Warn io.Writer
}

// ErrAborted is the cause of the errors of a sink after Abort.
var ErrAborted = errors.New("aborted")

// Causes of refusing plaintext, for the command-line tools to say which
// flags change the decision (errors.Is); the messages name the peer and
// the reason, no flag.
var (
	// ErrPlaintextBeyondLoopback: an unencrypted stream to a receiver
	// beyond loopback, without SinkOptions.Insecure or Authenticated.
	ErrPlaintextBeyondLoopback = errors.New("unencrypted snapshot beyond loopback")
	// ErrPlaintextToStranger: an unencrypted stream to a loopback or unix
	// receiver running as another user.
	ErrPlaintextToStranger = errors.New("unencrypted snapshot to another user")
	// ErrListenBeyondLoopback: a listener beyond loopback without keys
	// or SourceOptions.Insecure.
	ErrListenBeyondLoopback = errors.New("listener beyond loopback without keys")
)

// refusal is an error whose message is complete by itself and whose
// cause is one of the sentinels above.
type refusal struct {
	msg   string
	cause error
}

func (r *refusal) Error() string { return r.msg }
func (r *refusal) Unwrap() error { return r.cause }

// ErrUDP is returned for udp: specs.
var ErrUDP = errors.New("udp is refused: a snapshot must arrive complete and in order, and UDP loses and reorders data; use tcp:HOST:PORT")

// splitSpec returns the scheme of a tcp:/unix:/udp:/file: spec, or "" for a
// plain path.
func splitSpec(spec string) (scheme, rest string) {
	s, r, ok := strings.Cut(spec, ":")
	if !ok {
		return "", spec
	}
	switch strings.ToLower(s) {
	case "tcp", "unix", "udp", "file", "tcp4", "tcp6", "udp4", "udp6":
		return strings.ToLower(s), r
	}
	return "", spec
}

// OpenSink opens spec for writing: stdout (or -), FILE (or file:FILE),
// tcp:HOST:PORT or unix:PATH.
func OpenSink(spec string, opt SinkOptions) (Sink, error) {
	scheme, rest := splitSpec(spec)
	switch scheme {
	case "udp", "udp4", "udp6":
		return nil, fmt.Errorf("stream: sink %s: %w", spec, ErrUDP)
	case "tcp", "tcp4", "tcp6", "unix":
		if rest == "" {
			return nil, fmt.Errorf("stream: sink %s: missing address", spec)
		}
		return dialSink(spec, scheme, rest, opt)
	case "file":
		return openHaltableFileSink(spec, rest, opt)
	}
	if spec == "stdout" || spec == "-" || spec == "" {
		s := openStdoutSink(opt.WriteTimeout)
		if opt.Halt {
			if err := s.checkHalt(); err != nil {
				return nil, err
			}
		}
		return s, nil
	}
	return openHaltableFileSink(spec, spec, opt)
}

// openHaltableFileSink opens a file sink; with opt.Halt only one that can
// prove the snapshot safe (a regular file), checked before opening (a FIFO
// would block the open) and again on the open file.
func openHaltableFileSink(spec, path string, opt SinkOptions) (*fileSink, error) {
	if opt.Halt {
		if err := checkHaltPath(spec, path); err != nil {
			return nil, err
		}
	}
	s, err := openFileSink(spec, path, opt)
	if err != nil || !opt.Halt {
		return s, err
	}
	if err := s.checkHalt(); err != nil {
		s.poll.close()
		s.f.Close()
		if s.tmp != "" {
			os.Remove(s.tmp)
		}
		return nil, err
	}
	return s, nil
}

// OpenSource opens spec for reading: stdin (or -), FILE (or file:FILE),
// tcp:[HOST:]PORT or unix:PATH. Sockets listen at once and accept exactly
// one sender on the first Read. tcp:PORT listens on all addresses, which,
// like any non-loopback address, needs HaveKeys or Insecure.
func OpenSource(spec string, opt SourceOptions) (Source, error) {
	scheme, rest := splitSpec(spec)
	switch scheme {
	case "udp", "udp4", "udp6":
		return nil, fmt.Errorf("stream: source %s: %w", spec, ErrUDP)
	case "tcp", "tcp4", "tcp6", "unix":
		if rest == "" {
			return nil, fmt.Errorf("stream: source %s: missing address", spec)
		}
		return listenSource(spec, scheme, rest, opt)
	case "file":
		return openFileSource(spec, rest, opt)
	}
	if spec == "stdin" || spec == "-" || spec == "" {
		return &fileSource{spec: "stdin", f: os.Stdin, std: true, poll: pollable(os.Stdin, opt.ReadTimeout)}, nil
	}
	return openFileSource(spec, spec, opt)
}

// fileSink writes stdout or a file, through a buffer (a raw record stream
// is written in small pieces). A regular file is written as an unnamed
// file (O_TMPFILE) in the destination's directory and linked under its
// name only when the body is complete and synced, so that a snapshot under
// its final name is never a truncated one, and an unfinished one leaves
// nothing behind, even when the writer is killed (the kernel frees an
// unnamed file with its last descriptor). Where the file system has no
// O_TMPFILE, a named temporary file takes its place, removed on every
// error path. A symlink is followed, not replaced (destination). Other
// files (devices, FIFOs), stdout and /dev/stdout are written directly; a pipe, FIFO or socket with the write timeout as the bound on
// each write (pollable).
type fileSink struct {
	spec, path string
	f          *os.File
	poll       *pollFile // f's bounded writes, or nil
	w          *bufio.Writer
	unnamed    bool   // f is an O_TMPFILE: link it to path when done
	tmp        string // the named temporary file, if that is what f is
	std        bool   // stdout: never closed
	linked     bool
	halting    bool // AwaitReady: a failed sync is an error even on stdout
	done       bool // the body writer closed every layer successfully
	finished   bool
	err        error
	// aborted is set by Abort, from any goroutine: the snapshot is not
	// kept, and writes fail.
	aborted atomic.Bool
}

func openStdoutSink(wt time.Duration) *fileSink {
	s := &fileSink{spec: "stdout", f: os.Stdout, std: true}
	s.setWriter(wt)
	return s
}

// setWriter buffers the writes to s.f; to a pipe, FIFO or socket each
// write may go without progress for at most wt (pollable).
func (s *fileSink) setWriter(wt time.Duration) {
	var w io.Writer = s.f
	if s.poll = pollable(s.f, wt); s.poll != nil {
		w = s.poll
	}
	s.w = bufio.NewWriterSize(w, 256<<10)
}

func openFileSink(spec, path string, opt SinkOptions) (*fileSink, error) {
	d, err := destination(path)
	if err != nil {
		return nil, fmt.Errorf("stream: open sink %s: %w", spec, err)
	}
	s := &fileSink{spec: spec, path: d.path}
	if d.fd >= 0 {
		// /dev/stdout and the like: that fd, as stdout is written.
		fd, err := unix.FcntlInt(uintptr(d.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("stream: open sink %s: fd %d: %w", spec, d.fd, err)
		}
		s.f = os.NewFile(uintptr(fd), path)
		s.setWriter(opt.WriteTimeout)
		return s, nil
	}
	path = d.path
	if fi, err := os.Stat(path); err == nil && !fi.Mode().IsRegular() {
		f, err := openWriteEnd(path, fi, opt.DialTimeout)
		if err != nil {
			return nil, fmt.Errorf("stream: open sink %s: %w", spec, err)
		}
		s.f = f
		s.setWriter(opt.WriteTimeout)
		return s, nil
	}
	// Snapshots hold process memory (keys, passwords): mode 0600.
	dir := filepath.Dir(path)
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o600)
	switch {
	case err == nil:
		s.f, s.unnamed = os.NewFile(uintptr(fd), path), true
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR):
		// No O_TMPFILE here (EISDIR: a kernel that predates it).
		f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".partial-*")
		if err != nil {
			return nil, fmt.Errorf("stream: open sink %s: %w", spec, err)
		}
		s.f, s.tmp = f, f.Name()
	default:
		return nil, fmt.Errorf("stream: open sink %s: %w", spec, &os.PathError{Op: "open", Path: dir, Err: err})
	}
	s.w = bufio.NewWriterSize(s.f, 256<<10)
	return s, nil
}

func (s *fileSink) String() string { return s.spec }

func (s *fileSink) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.aborted.Load() {
		s.err = fmt.Errorf("stream: write %s: %w", s.spec, ErrAborted)
		return 0, s.err
	}
	n, err := s.w.Write(p)
	if err != nil {
		s.err = fmt.Errorf("stream: write %s: %w", s.spec, err)
	}
	return n, s.err
}

// Abort makes the sink give up: later writes fail, and a file is not kept.
// It may be called from any goroutine, while another writes.
func (s *fileSink) Abort() {
	s.aborted.Store(true)
	s.poll.abort()
}

func (s *fileSink) link([]byte, bool) error { s.linked = true; return nil }
func (s *fileSink) bodyDone()               { s.done = true }

// regular reports whether the sink writes a regular file of its own.
func (s *fileSink) regular() bool { return s.unnamed || s.tmp != "" }

// finish flushes, syncs and closes the file and gives it its name.
func (s *fileSink) finish() error {
	if s.finished {
		return s.err
	}
	s.finished = true
	defer s.poll.close()
	if s.err == nil && s.linked && !s.done {
		s.err = fmt.Errorf("stream: %s: the snapshot body was not completed, not keeping it", s.spec)
	}
	if s.err == nil || !s.regular() {
		if err := s.w.Flush(); err != nil && s.err == nil {
			s.err = fmt.Errorf("stream: write %s: %w", s.spec, err)
		}
	}
	if s.err == nil {
		// Pipes, terminals and some devices cannot sync; only a regular
		// file's sync failure matters.
		if err := s.f.Sync(); err != nil && (s.regular() || s.halting) {
			s.err = fmt.Errorf("stream: sync %s: %w", s.spec, err)
		}
	}
	if s.std {
		return s.err
	}
	if s.err == nil && s.regular() && s.aborted.Load() {
		s.err = fmt.Errorf("stream: %s: %w", s.spec, ErrAborted)
	}
	if s.err == nil && s.unnamed {
		if err := s.name(); err != nil {
			s.err = fmt.Errorf("stream: %s: %w", s.spec, err)
		}
	}
	if err := s.f.Close(); err != nil && s.err == nil {
		s.err = fmt.Errorf("stream: close %s: %w", s.spec, err)
	}
	if !s.regular() {
		return s.err
	}
	if s.tmp != "" {
		if s.err != nil {
			os.Remove(s.tmp)
			return s.err
		}
		if err := os.Rename(s.tmp, s.path); err != nil {
			os.Remove(s.tmp)
			s.err = fmt.Errorf("stream: rename %s: %w", s.spec, err)
			return s.err
		}
	}
	if s.err != nil {
		return s.err
	}
	if d, err := os.Open(filepath.Dir(s.path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// AwaitReady makes the snapshot durable, or refuses a file that cannot
// be: then what is still buffered of the body is never written, so that a
// reader sees a truncated snapshot rather than a copy of a process that
// is resumed. (OpenSink with SinkOptions.Halt refuses such a file before
// anything is written.)
func (s *fileSink) AwaitReady(time.Duration) error {
	if s.finished {
		return s.err
	}
	if err := s.checkHalt(); err != nil {
		s.err, s.finished = err, true
		s.poll.close()
		if !s.std {
			s.f.Close()
		}
		return err
	}
	s.halting = true
	if err := s.finish(); err != nil {
		return err
	}
	if err := s.durable(); err != nil {
		s.err = err
		return err
	}
	return nil
}

// name links the unnamed file under s.path. linkat(2) refuses to replace
// an existing file, so then the file is linked under a temporary name and
// renamed over it (a rename is atomic); the temporary name is removed if
// that fails. Through /proc/self/fd with AT_SYMLINK_FOLLOW, which needs no
// privilege (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
func (s *fileSink) name() error {
	from := fmt.Sprintf("/proc/self/fd/%d", s.f.Fd())
	err := unix.Linkat(unix.AT_FDCWD, from, unix.AT_FDCWD, s.path, unix.AT_SYMLINK_FOLLOW)
	if !errors.Is(err, unix.EEXIST) {
		if err != nil {
			return &os.LinkError{Op: "link", Old: from, New: s.path, Err: err}
		}
		return nil
	}
	for range 100 {
		tmp := filepath.Join(filepath.Dir(s.path), fmt.Sprintf(".%s.partial-%d", filepath.Base(s.path), rand.Uint32()))
		err := unix.Linkat(unix.AT_FDCWD, from, unix.AT_FDCWD, tmp, unix.AT_SYMLINK_FOLLOW)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return &os.LinkError{Op: "link", Old: from, New: tmp, Err: err}
		}
		if err := os.Rename(tmp, s.path); err != nil {
			os.Remove(tmp)
			return err
		}
		return nil
	}
	return fmt.Errorf("link %s: no free temporary name", s.path)
}

func (s *fileSink) Commit() error { return s.err }
func (s *fileSink) Close() error  { return s.finish() }

// fileSource reads a file or stdin; a pipe, FIFO or socket with the read
// timeout as the bound on each read (pollable).
type fileSource struct {
	spec string
	f    *os.File
	std  bool
	poll *pollFile // f's bounded reads, or nil
}

func openFileSource(spec, path string, opt SourceOptions) (*fileSource, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("stream: open source %s: %w", spec, err)
	}
	return &fileSource{spec: spec, f: f, poll: pollable(f, opt.ReadTimeout)}, nil
}

func (s *fileSource) Read(p []byte) (int, error) {
	var r io.Reader = s.f
	if s.poll != nil {
		r = s.poll
	}
	n, err := r.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("stream: read %s: %w", s.spec, err)
	}
	return n, err
}
func (s *fileSource) String() string                  { return s.spec }
func (s *fileSource) Addr() string                    { return s.f.Name() }
func (s *fileSource) Ready(error) error               { return nil }
func (s *fileSource) AwaitCommit(time.Duration) error { return nil }
func (s *fileSource) Close() error {
	// pthaw closes its source from the goroutine that heeds SIGTERM: a
	// read waiting on a stalled pipe ends now.
	s.poll.abort()
	s.poll.close()
	if s.std {
		return nil
	}
	return s.f.Close()
}
