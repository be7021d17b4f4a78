package stream

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestHaltNeedsProof: with SinkOptions.Halt, OpenSink refuses every sink
// that cannot prove a snapshot safe (pfreeze -halt | pthaw lost the
// process when pthaw failed after reading it all), at once — a FIFO
// without a reader does not block the refusal — and accepts regular
// files, named or as stdout, which AwaitReady makes durable.
func TestHaltNeedsProof(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devnull.Close()
	gone, err := os.Create(filepath.Join(dir, "gone.snap"))
	if err != nil {
		t.Fatal(err)
	}
	defer gone.Close()
	os.Remove(gone.Name())
	for _, tc := range []struct {
		name, spec string
		stdout     *os.File
		want       string
	}{
		{"stdout deleted file", "stdout", gone, "stdout is a deleted file"},
		{"fifo", fifo, nil, fifo + " is a FIFO"},
		{"file:fifo", "file:" + fifo, nil, fifo + " is a FIFO"},
		{"stdout pipe", "stdout", pw, "stdout is a pipe"},
		{"- pipe", "-", pw, "stdout is a pipe"},
		{"/dev/null", os.DevNull, nil, "is a character device"},
		{"stdout /dev/null", "stdout", devnull, "stdout is a character device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.stdout != nil {
				defer func(f *os.File) { os.Stdout = f }(os.Stdout)
				os.Stdout = tc.stdout
			}
			s, err := OpenSink(tc.spec, SinkOptions{Halt: true})
			if err == nil {
				s.Close()
				t.Fatalf("OpenSink(%s, Halt) accepted a sink that acknowledges nothing", tc.spec)
			}
			if !errors.Is(err, ErrNoProof) || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("OpenSink(%s, Halt): got %v, want one line saying %q (ErrNoProof)", tc.spec, err, tc.want)
			}
		})
	}

	// Regular files: a new name, an existing file, stdout redirected.
	out, err := os.Create(filepath.Join(dir, "stdout.snap"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	old := filepath.Join(dir, "old.snap")
	if err := os.WriteFile(old, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		spec, path string
		stdout     *os.File
	}{
		{filepath.Join(dir, "new.snap"), filepath.Join(dir, "new.snap"), nil},
		{"file:" + old, old, nil},
		{"stdout", out.Name(), out},
	} {
		func() {
			if tc.stdout != nil {
				defer func(f *os.File) { os.Stdout = f }(os.Stdout)
				os.Stdout = tc.stdout
			}
			s, err := OpenSink(tc.spec, SinkOptions{Halt: true})
			if err != nil {
				t.Fatalf("OpenSink(%s, Halt): %v", tc.spec, err)
			}
			defer s.Close()
			w, err := NewWriter(s, Options{})
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(w, "records")
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.AwaitReady(time.Second); err != nil {
				t.Fatalf("AwaitReady(%s): %v", tc.spec, err)
			}
			got, err := os.ReadFile(tc.path)
			if err != nil || !bytes.HasSuffix(got, []byte("records")) {
				t.Errorf("%s after AwaitReady: %q, %v; want the snapshot", tc.spec, got, err)
			}
		}()
	}
}

// TestAwaitReadyRefusesPipe: a sink opened without Halt on a pipe still
// refuses AwaitReady (the kill signal), and then writes nothing more.
func TestAwaitReadyRefusesPipe(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	defer func(f *os.File) { os.Stdout = f }(os.Stdout)
	os.Stdout = pw
	s, err := OpenSink("stdout", SinkOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := NewWriter(s, Options{})
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "records")
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.AwaitReady(time.Second); !errors.Is(err, ErrNoProof) {
		t.Fatalf("AwaitReady on a pipe: got %v, want ErrNoProof", err)
	}
	if err := s.Close(); !errors.Is(err, ErrNoProof) {
		t.Errorf("Close after the refusal: got %v, want the refusal again", err)
	}
	pw.Close()
	if got, _ := io.ReadAll(pr); len(got) != 0 {
		t.Errorf("the pipe's reader got %q after the refusal, want nothing", got)
	}
}
