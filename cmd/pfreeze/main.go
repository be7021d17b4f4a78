// Command pfreeze captures a running process to a snapshot stream.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

func main() {
	pid := flag.Int("pid", -1, "PID of the process to freeze")
	dest := flag.String("dest", "stdout", "output: stdout | FILE")
	halt := flag.Bool("halt", false, "kill the process once its snapshot is completely written (a migration)")
	debug := flag.Bool("debug", false, "print a human-readable description of the process instead of a snapshot")
	flag.Parse()
	if err := run(*pid, *dest, *halt, *debug); err != nil {
		fmt.Fprintf(os.Stderr, "pfreeze: %v\n", err)
		os.Exit(1)
	}
}

func run(pid int, dest string, halt, debug bool) error {
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags come first: pfreeze -pid P)", flag.Arg(0))
	}
	if pid <= 0 {
		return errors.New("-pid is required")
	}
	tr := ptrace.NewTracer()
	defer tr.Close()
	if debug {
		if halt {
			return errors.New("-debug describes the process and leaves it running; it cannot be combined with -halt")
		}
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			err := image.Describe(os.Stdout, image.NewDecoder(pr), ptrace.RegNames[:])
			pr.CloseWithError(err)
			done <- err
		}()
		err := capture.Freeze(tr, pid, pw, false, nil)
		pw.CloseWithError(err)
		if derr := <-done; err == nil {
			err = derr
		}
		return err
	}
	var out io.Writer = os.Stdout
	var closeOut func() error = func() error { return nil }
	if dest != "stdout" {
		f, err := os.OpenFile(dest, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		out, closeOut = f, func() error {
			if err := f.Sync(); err != nil {
				f.Close()
				return err
			}
			return f.Close()
		}
	}
	bw := bufio.NewWriterSize(out, 1<<20)
	if err := stream.WriteHeader(bw, &stream.Header{Version: stream.Version, Params: map[string]string{"compress": "none", "encrypt": "none"}}); err != nil {
		return err
	}
	commit := func() error {
		if err := bw.Flush(); err != nil {
			return err
		}
		return closeOut()
	}
	return capture.Freeze(tr, pid, bw, halt, commit)
}
