package stream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// blockingPair returns the two ends of a blocking pipe (os.Pipe makes its
// ends non-blocking) or of a blocking unix stream socket pair, as stdin
// and stdout inherited from a shell are.
func blockingPair(t *testing.T, kind string) (r, w *os.File) {
	t.Helper()
	var fds [2]int
	var err error
	if kind == "pipe" {
		err = unix.Pipe2(fds[:], unix.O_CLOEXEC)
	} else {
		fds, err = unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		t.Fatal(err)
	}
	r, w = os.NewFile(uintptr(fds[0]), kind+"-r"), os.NewFile(uintptr(fds[1]), kind+"-w")
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

func flags(t *testing.T, f *os.File) int {
	t.Helper()
	var fl int
	var err error
	sc, _ := f.SyscallConn()
	sc.Control(func(fd uintptr) { fl, err = unix.FcntlInt(fd, unix.F_GETFL, 0) })
	if err != nil {
		t.Fatal(err)
	}
	return fl
}

// queued returns how many bytes wait to be read on f.
func queued(t *testing.T, f *os.File) int {
	t.Helper()
	var n int
	var err error
	sc, _ := f.SyscallConn()
	sc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }) // TIOCINQ is FIONREAD
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestPollableLeavesSharedFlags: the bounded reads and writes on a pipe or
// socket never change its open file description, which stdin and stdout
// share with other processes. (Before, it was made O_NONBLOCK for the
// stream's duration: a pfreeze killed meanwhile left it so, and in
// `{ pfreeze …; cat big; } | slow_reader` cat then failed with "write
// error: Resource temporarily unavailable".) Both ways of waiting are
// run: RWF_NOWAIT and, as where the kernel refuses it, poll first.
func TestPollableLeavesSharedFlags(t *testing.T) {
	for _, kind := range []string{"pipe", "socket"} {
		for _, nowait := range []bool{true, false} {
			name := kind + "/poll-first"
			if nowait {
				name = kind + "/nowait"
			}
			t.Run(name, func(t *testing.T) {
				r, w := blockingPair(t, kind)
				rfl, wfl := flags(t, r), flags(t, w)
				pw, pr := pollable(w, time.Minute), pollable(r, time.Minute)
				if pw == nil || pr == nil {
					t.Fatalf("pollable(%s) = nil", kind)
				}
				pw.nowait, pr.nowait = nowait, nowait

				// A write far larger than the buffer blocks, bounded.
				want := bytes.Repeat([]byte("0123456789abcdef"), 1<<17) // 2 MiB
				done := make(chan error, 1)
				go func() {
					n, err := pw.Write(want)
					if err == nil && n != len(want) {
						err = io.ErrShortWrite
					}
					done <- err
					w.Close()
				}()
				for queued(t, r) == 0 {
					time.Sleep(time.Millisecond)
				}
				if got := flags(t, w); got != wfl {
					t.Errorf("write end flags during a blocked write %#o, want %#o", got, wfl)
				}

				// A read waiting for data, bounded.
				var got bytes.Buffer
				buf := make([]byte, 100<<10)
				for {
					n, err := pr.Read(buf)
					got.Write(buf[:n])
					if f := flags(t, r); f != rfl {
						t.Fatalf("read end flags during reads %#o, want %#o", f, rfl)
					}
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatalf("read: %v", err)
					}
				}
				if err := <-done; err != nil {
					t.Fatalf("write: %v", err)
				}
				if !bytes.Equal(got.Bytes(), want) {
					t.Errorf("read %d bytes, not the %d written", got.Len(), len(want))
				}
			})
		}
	}
}

// TestPollableGivesUp: a write nobody reads and a read nobody writes end
// after the bound with "no progress for D", the flags untouched.
func TestPollableGivesUp(t *testing.T) {
	for _, nowait := range []bool{true, false} {
		r, w := blockingPair(t, "pipe")
		wfl := flags(t, w)
		pw, pr := pollable(w, 50*time.Millisecond), pollable(r, 50*time.Millisecond)
		pw.nowait, pr.nowait = nowait, nowait
		n, err := pw.Write(make([]byte, 1<<20))
		if !errors.Is(err, os.ErrDeadlineExceeded) || !strings.Contains(err.Error(), "no progress for 50ms") {
			t.Errorf("nowait=%v: write to a pipe nobody reads: %d, %v; want no progress for 50ms", nowait, n, err)
		}
		if n == 0 || n >= 1<<20 {
			t.Errorf("nowait=%v: wrote %d bytes before giving up, want what the pipe holds", nowait, n)
		}
		if got := flags(t, w); got != wfl {
			t.Errorf("nowait=%v: flags %#o, want %#o", nowait, got, wfl)
		}
		io.CopyN(io.Discard, r, int64(n))
		if _, err := pr.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("nowait=%v: read of a pipe nobody writes: %v, want no progress", nowait, err)
		}
	}
}

// TestFileSinkAbortEndsStalledWrite: Abort ends a write blocked on a pipe
// nobody reads at once, not after the write timeout: pfreeze interrupted
// while its reader stalls resumes the process now. (Before, SIGTERM to
// `pfreeze | stalled` left the process frozen for the whole
// -write-timeout.)
func TestFileSinkAbortEndsStalledWrite(t *testing.T) {
	r, w := blockingPair(t, "pipe")
	defer r.Close()
	s := &fileSink{spec: "pipe", f: w, std: true}
	s.setWriter(20 * time.Second) // without Abort, the write ends with "no progress" after this
	done := make(chan error, 1)
	go func() {
		_, err := s.Write(make([]byte, 1<<20))
		if err == nil {
			err = s.finish()
		}
		done <- err
	}()
	for queued(t, r) == 0 {
		time.Sleep(time.Millisecond)
	}
	s.Abort()
	if err := <-done; !errors.Is(err, ErrAborted) {
		t.Fatalf("write after Abort: %v, want ErrAborted", err)
	}
}

// TestFileSourceCloseEndsStalledRead: Close, from another goroutine, ends
// a read waiting on a pipe whose writer stalls at once: pthaw closes its
// source when SIGTERM comes, and the half-built process must go now, not
// after the read timeout. (Before, it took the whole -read-timeout.)
func TestFileSourceCloseEndsStalledRead(t *testing.T) {
	r, w := blockingPair(t, "pipe")
	defer w.Close()
	s := &fileSource{spec: "stdin", f: r, std: true, poll: pollable(r, 20*time.Second)} // without the abort, the read ends with "no progress" after this
	done := make(chan error, 1)
	tid := make(chan int)
	go func() {
		runtime.LockOSThread() // the wait is seen on this thread
		tid <- unix.Gettid()
		_, err := s.Read(make([]byte, 10))
		done <- err
	}()
	waitInPoll(t, <-tid)
	s.Close()
	if err := <-done; !errors.Is(err, ErrAborted) {
		t.Fatalf("read after Close: %v, want ErrAborted", err)
	}
}

// waitInPoll waits until thread tid is in poll(2) or ppoll(2).
func waitInPoll(t *testing.T, tid int) {
	t.Helper()
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/syscall", tid))
		if err != nil {
			t.Fatal(err)
		}
		if nr, _, _ := strings.Cut(string(b), " "); nr == strconv.Itoa(unix.SYS_POLL) || nr == strconv.Itoa(unix.SYS_PPOLL) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}
