// Command pthaw restores a process from a snapshot stream.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

func main() {
	src := flag.String("src", "stdin", "input: stdin | FILE | tcp:[HOST:]PORT | unix:PATH (sockets listen for one sender)")
	keydir := flag.String("keydir", "", "directory of key files for encrypted snapshots; plaintext is then refused")
	readTimeout := flag.Duration("read-timeout", time.Minute, "how long a read (from a socket, pipe or FIFO) may make no progress")
	commitTimeout := flag.Duration("commit-timeout", time.Minute, "with a -halt sender: how long to wait for its go-ahead")
	insecure := flag.Bool("insecure", false, "listen on a non-loopback address without -keydir (anyone who connects can run code here)")
	detach := flag.Bool("detach", false, "print the restored PID and leave the process running")
	debug := flag.Bool("debug", false, "describe the snapshot on stdout instead of restoring it")
	newPID := flag.Bool("new-pid", false, "restore with a new PID even when the saved one is free")
	virtpid := flag.Bool("virtpid", false, "when the saved PID is taken, restore with a new one and make getpid/gettid (and signals the process sends itself) answer with the saved ids, by a seccomp filter pthaw serves; for a tree also getppid/getpgid/getsid, signals by PID and wait4/waitid, with pthaw as the members' tracer")
	pidns := flag.Bool("pidns", false, "restore into a new PID namespace, where the process (every member of a tree) has its saved PID even when that PID is taken here")
	var parents []string
	flag.Func("parent", "FILE: a parent of an incremental snapshot (pfreeze -parent), used if its SHA-256 is the one the snapshot names; repeatable; without it the path the snapshot records is tried", func(s string) error {
		parents = append(parents, s)
		return nil
	})
	inherit := inheritFDs{}
	flag.Var(inherit, "inherit-fd", "N=FD: give the process, for its fd N that was a pipe leading outside, a new open of pthaw's fd FD (a pipe or FIFO) instead of a pipe whose far end is closed; repeatable")
	flag.Parse()
	o := loader.ReceiveOptions{
		Src: *src, KeyDir: *keydir, ReadTimeout: *readTimeout, CommitTimeout: *commitTimeout,
		Insecure: *insecure, Warn: os.Stderr, Progress: term.IsTerminal(int(os.Stderr.Fd())), Parents: parents,
		Options: loader.Options{InheritFDs: inherit, NewPID: *newPID, PIDNamespace: *pidns, VirtPID: *virtpid, Detach: *detach, Notice: func(s string) {
			fmt.Fprintf(os.Stderr, "pthaw: %s\n", s)
		}},
	}
	code, err := run(o, *debug)
	if errors.Is(err, stream.ErrListenBeyondLoopback) {
		err = fmt.Errorf("%w; give a key directory (-keydir), listen on 127.0.0.1, or pass -insecure", err)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "pthaw: %v\n", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(o loader.ReceiveOptions, debug bool) (int, error) {
	if flag.NArg() > 0 {
		return 0, fmt.Errorf("unexpected argument %q", flag.Arg(0))
	}
	// No wait of pthaw is unbounded: a -halt sender's original stays
	// frozen while it waits.
	if o.ReadTimeout <= 0 {
		return 0, fmt.Errorf("-read-timeout %v: must be positive", o.ReadTimeout)
	}
	if o.CommitTimeout <= 0 {
		return 0, fmt.Errorf("-commit-timeout %v: must be positive", o.CommitTimeout)
	}
	if debug {
		return 0, loader.Describe(os.Stdout, o)
	}
	if o.VirtPID && (o.Detach || o.PIDNamespace) {
		return 0, errors.New("-virtpid needs pthaw to stay and serve the process's getpid calls: it cannot be combined with -detach or -pidns")
	}
	if o.NewPID && o.PIDNamespace {
		return 0, errors.New("-pidns restores the saved PIDs: it cannot be combined with -new-pid")
	}
	// Until the process is reported built, a termination signal gives up
	// cleanly (nothing restored, the sender resumes its original); after
	// that signals must not kill us before the process runs, and once it
	// runs we forward them.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT)
	o.Interrupt = sigs
	tr := ptrace.NewTracer()
	defer tr.Close()
	p, err := loader.Receive(context.Background(), tr, o)
	if err != nil {
		return 0, err
	}
	if o.Detach {
		fmt.Println(p.Pid()) // in -pidns mode: its pid on this host
		return 0, nil
	}
	stop := make(chan struct{})
	defer close(stop)
	go p.Supervise(stop)
	return wait(p, sigs)
}

// wait waits for the restored process (through the init of its PID
// namespace, which exits with its status, or as the tracer of a tree with
// virtual PIDs), forwarding termination signals to the process (the
// terminal delivers SIGINT and SIGQUIT to it directly), and returns its
// exit status the way a shell reports it.
func wait(p *loader.Process, sigs chan os.Signal) (int, error) {
	pid := p.Pid()
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
	ws, err := p.Wait()
	if err != nil {
		return 0, err
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return ws.ExitStatus(), nil
}

// inheritFDs is -inherit-fd N=FD, repeated: the process's fd N gets a new
// open of pthaw's fd FD.
type inheritFDs map[int]*os.File

func (m inheritFDs) String() string { return "" }

func (m inheritFDs) Set(v string) error {
	a, b, ok := strings.Cut(v, "=")
	n, err1 := strconv.Atoi(a)
	fd, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || n < 0 || fd < 0 {
		return fmt.Errorf("%q: want N=FD, the process's fd number and pthaw's", v)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		return fmt.Errorf("%q: pthaw's fd %d is not open", v, fd)
	}
	m[n] = os.NewFile(uintptr(fd), "fd "+b)
	return nil
}
