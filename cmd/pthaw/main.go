// Command pthaw restores a process from a snapshot stream.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

func main() {
	src := flag.String("src", "stdin", "input: stdin | FILE")
	detach := flag.Bool("detach", false, "print the restored PID and leave the process running")
	debug := flag.Bool("debug", false, "describe the snapshot on stdout instead of restoring it")
	newPID := flag.Bool("new-pid", false, "restore with a new PID even when the saved one is free")
	flag.Parse()
	code, err := run(*src, *detach, *debug, *newPID)
	if err != nil {
		fmt.Fprintf(os.Stderr, "pthaw: %v\n", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(src string, detach, debug, newPID bool) (int, error) {
	if flag.NArg() > 0 {
		return 0, fmt.Errorf("unexpected argument %q", flag.Arg(0))
	}
	var in io.Reader = os.Stdin
	if src != "stdin" {
		f, err := os.Open(src)
		if err != nil {
			return 0, err
		}
		defer f.Close()
		in = f
	}
	br := bufio.NewReaderSize(in, 1<<20)
	h, err := stream.ReadHeader(br, "compress", "encrypt")
	if err != nil {
		return 0, err
	}
	if h.Get("compress", "none") != "none" || h.Get("encrypt", "none") != "none" {
		return 0, fmt.Errorf("snapshot uses compress=%s encrypt=%s, which this build does not read", h.Get("compress", "none"), h.Get("encrypt", "none"))
	}
	dec := image.NewDecoder(br)
	if debug {
		return 0, image.Describe(os.Stdout, dec, ptrace.RegNames[:])
	}
	// Signals meant for the restored process must not kill us while we
	// build it; once it runs, we forward them.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT)
	tr := ptrace.NewTracer()
	defer tr.Close()
	p, err := loader.Build(tr, dec, loader.Options{NewPID: newPID, Detach: detach, Notice: func(s string) {
		fmt.Fprintf(os.Stderr, "pthaw: %s\n", s)
	}})
	if err != nil {
		return 0, err
	}
	if err := p.Start(); err != nil {
		return 0, err
	}
	if detach {
		fmt.Println(p.Pid())
		return 0, nil
	}
	return wait(p.Pid(), sigs)
}

// wait waits for the restored process, our child, forwarding termination
// signals (the terminal delivers SIGINT and SIGQUIT to it directly), and
// returns its exit status the way a shell reports it.
func wait(pid int, sigs chan os.Signal) (int, error) {
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case s := <-sigs:
				if s == syscall.SIGTERM || s == syscall.SIGHUP {
					syscall.Kill(pid, s.(syscall.Signal))
				}
			case <-done:
				return
			}
		}
	}()
	var ws syscall.WaitStatus
	for {
		_, err := syscall.Wait4(pid, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("wait for pid %d: %w", pid, err)
		}
		break
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return ws.ExitStatus(), nil
}
