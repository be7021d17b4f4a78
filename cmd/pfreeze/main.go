// Command pfreeze captures a running process to a snapshot stream.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/image"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

func main() {
	pid := flag.Int("pid", -1, "PID of the process to freeze")
	dest := flag.String("dest", "stdout", "output: stdout | FILE | tcp:HOST:PORT | unix:PATH")
	compress := flag.String("compress", "none", "compression: none | auto (snappy, each block only if the link is slow enough to hide the time) | gzip[:1-9] | flate[:1-9] | snappy | zstd[:1-22]")
	encrypt := flag.String("encrypt", "none", "authenticated encryption: none | aes-gcm:KEYFILE | chacha20-poly1305:KEYFILE")
	insecure := flag.Bool("insecure", false, "send an unencrypted snapshot to a tcp receiver beyond loopback (anyone on the path can read the process's memory)")
	halt := flag.Bool("halt", false, "kill the process once its snapshot is safe: fsync'ed to a regular file, or built by a pthaw listening on tcp:/unix: (a migration); refused to a pipe, FIFO or device, which acknowledge nothing")
	tree := flag.Bool("tree", false, "freeze the process and all its descendants (parent/child links, process groups, sessions, shared anonymous memory)")
	debug := flag.Bool("debug", false, "print a human-readable description of the process instead of a snapshot")
	dialTimeout := flag.Duration("dial-timeout", 10*time.Second, "how long to wait for a network connection")
	writeTimeout := flag.Duration("write-timeout", time.Minute, "how long a write (to a socket, pipe or FIFO) may make no progress")
	readyTimeout := flag.Duration("ready-timeout", 5*time.Minute, "with -halt over a network: how long the receiver may take to build the process")
	tcpAddrs := flag.String("tcp-addrs", "", "the local addresses that move with the process, comma-separated IP or IP/PREFIX (its virtual IPs): a TCP connection from any other address is refused, or with -tcp-close closed; empty: every connection moves (pthaw on this host)")
	unixReconnect := flag.Bool("unix-reconnect", false, "connect the restored process again to the named unix sockets (a daemon's, such as journald's) it was connected to outside the process, instead of refusing them")
	tcpClose := flag.Bool("tcp-close", false, "close the TCP connections whose local address does not move (-tcp-addrs) instead of refusing: their peers get a reset, the restored process finds them aborted")
	live := flag.Bool("live", false, "with -halt to a listening pthaw (tcp:/unix:): copy memory while the process runs, in rounds, and stop it only for the last (live migration; with -tree, every member's memory)")
	liveRounds := flag.Int("live-rounds", 8, "with -live: the most rounds after the first full copy")
	liveDowntime := flag.Duration("live-downtime", 100*time.Millisecond, "with -live: the stop aimed at; rounds go on until what is left can be sent in this long")
	parent := flag.String("parent", "", "write an incremental snapshot: only the pages whose contents differ from those of this earlier snapshot FILE (of the same process or tree, not -live), which the new one names by path and SHA-256; pthaw then needs it too")
	liveBandwidth := flag.Int64("live-bandwidth", 0, "with -live: bytes per second the rounds may send (0: no cap)")
	stopCopy := flag.Bool("stop-copy", false, "without -halt: keep the process stopped for the whole copy, instead of the short stop of a copy-on-write checkpoint (its memory read from a fork of it while it runs)")
	flag.Parse()
	tcp, err := tcpOptions(*tcpAddrs, *tcpClose)
	if err != nil {
		fmt.Fprintf(os.Stderr, "pfreeze: %v\n", err)
		os.Exit(2)
	}
	// -halt on this host (every connection moves): hold off the peers'
	// packets until pthaw has rebuilt the connections (docs/pfreeze.md).
	tcp.Lock = *halt && tcp.Moving == nil && restoresHere(*dest)
	// A reader that goes away (pfreeze | head) must give us EPIPE, an
	// error we handle by resuming the process, not a silent death.
	signal.Ignore(syscall.SIGPIPE)
	err = run(interruptible(), *pid, *debug, *compress, *encrypt, *parent, capture.SendOptions{
		Dest: *dest, Tree: *tree, Halt: *halt, Insecure: *insecure,
		DialTimeout: *dialTimeout, WriteTimeout: *writeTimeout, ReadyTimeout: *readyTimeout,
		Progress: term.IsTerminal(int(os.Stderr.Fd())), TCP: tcp,
		Notice:        func(s string) { fmt.Fprintf(os.Stderr, "pfreeze: %s\n", s) },
		UnixReconnect: *unixReconnect, StopAndCopy: *stopCopy,
		Live: *live, LiveOptions: capture.LiveOptions{MaxRounds: *liveRounds, Downtime: *liveDowntime, Bandwidth: *liveBandwidth,
			Notice: func(s string) { fmt.Fprintf(os.Stderr, "pfreeze: %s\n", s) }},
	})
	switch {
	case errors.Is(err, stream.ErrPlaintextBeyondLoopback):
		err = fmt.Errorf("%w; use -encrypt aes-gcm:KEYFILE, or pass -insecure", err)
	case errors.Is(err, stream.ErrPlaintextToStranger):
		err = fmt.Errorf("%w; use -encrypt", err)
	}
	if errors.Is(err, capture.ErrConnectionStays) {
		err = fmt.Errorf("%w (-tcp-addrs); to close such connections instead (their peers get a reset), pass -tcp-close", err)
	}
	if errors.Is(err, stream.ErrNoProof) {
		err = fmt.Errorf("-halt refused, the process is untouched: %w; to move a process, send it to a listening pthaw (-dest tcp:HOST:PORT or -dest unix:PATH, with pthaw -src on that address: its handshake proves the restore), or write a file (-dest FILE, fsync'ed before the kill)", err)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "pfreeze: %v\n", err)
		os.Exit(1)
	}
}

// restoresHere reports whether a snapshot sent to dest is restored on
// this host: a file, a unix socket, or a tcp: receiver on loopback.
func restoresHere(dest string) bool {
	hostPort, ok := strings.CutPrefix(dest, "tcp:")
	if !ok {
		return true
	}
	host, _, err := net.SplitHostPort(hostPort)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// tcpOptions parses -tcp-addrs and -tcp-close.
func tcpOptions(addrs string, close bool) (capture.TCPOptions, error) {
	o := capture.TCPOptions{Close: close}
	if addrs == "" {
		if close {
			return o, errors.New("-tcp-close needs -tcp-addrs: without it every connection moves")
		}
		return o, nil
	}
	o.Moving = []netip.Prefix{}
	for _, s := range strings.Split(addrs, ",") {
		s = strings.TrimSpace(s)
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return o, fmt.Errorf("-tcp-addrs: %q is not an IP address or prefix", s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		o.Moving = append(o.Moving, p.Masked())
	}
	return o, nil
}

// interruptible returns a context cancelled by the first SIGTERM, SIGINT,
// SIGHUP or SIGQUIT, with "interrupted by SIGTERM" as its cause: the
// freeze then stops and resumes the process (capture.Freeze). Those
// signals no longer kill pfreeze, so that it can put the process back;
// later ones are ignored while it does. The goroutine ends with the first
// signal, or with pfreeze.
func interruptible() context.Context {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT)
	ctx, cancel := context.WithCancelCause(context.Background())
	go func() {
		s := <-sigs
		cancel(fmt.Errorf("interrupted by %s", unix.SignalName(s.(syscall.Signal))))
	}()
	return ctx
}

func run(ctx context.Context, pid int, debug bool, compress, encrypt, parent string, o capture.SendOptions) error {
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags come first: pfreeze -pid P)", flag.Arg(0))
	}
	if pid <= 0 {
		return errors.New("-pid is required")
	}
	// No wait of pfreeze is unbounded: while it waits the process is frozen.
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"dial-timeout", o.DialTimeout}, {"write-timeout", o.WriteTimeout}, {"ready-timeout", o.ReadyTimeout}} {
		if f.d <= 0 {
			return fmt.Errorf("-%s %v: must be positive (the process stays frozen while pfreeze waits)", f.name, f.d)
		}
	}
	if o.Live && (debug || !o.Halt || !(strings.HasPrefix(o.Dest, "tcp:") || strings.HasPrefix(o.Dest, "unix:"))) {
		return errors.New("-live moves a process: it needs -halt and a listening pthaw (-dest tcp:HOST:PORT or unix:PATH)")
	}
	if o.Live && (o.LiveOptions.MaxRounds <= 0 || o.LiveOptions.Downtime <= 0 || o.LiveOptions.Bandwidth < 0) {
		return fmt.Errorf("-live-rounds %d, -live-downtime %v, -live-bandwidth %d: rounds and downtime must be positive, bandwidth not negative",
			o.LiveOptions.MaxRounds, o.LiveOptions.Downtime, o.LiveOptions.Bandwidth)
	}
	if !debug {
		so, err := stream.ParseOptions(compress, encrypt)
		if err != nil {
			return err
		}
		o.Codec, o.Cipher, o.Key = so.Codec, so.Cipher, so.Key
	}
	if parent != "" {
		if o.Live {
			return errors.New("-parent makes an incremental snapshot to a file: it cannot be combined with -live")
		}
		if same(parent, o.Dest) {
			return fmt.Errorf("-parent %s is also -dest: the new snapshot would overwrite the parent it needs", parent)
		}
		// The parent is read before the process is stopped.
		var keys []stream.Key
		if o.Key != nil {
			keys = append(keys, *o.Key)
		}
		p, err := capture.OpenParent(parent, keys)
		if err != nil {
			return err
		}
		o.Parent = p
	}
	tr := ptrace.NewTracer()
	defer tr.Close()
	if debug {
		if o.Halt {
			return errors.New("-debug describes the process and leaves it running; it cannot be combined with -halt")
		}
		return describe(ctx, tr, pid, o)
	}
	return capture.Send(ctx, tr, pid, o)
}

// describe freezes pid into a pipe read by the snapshot describer, so the
// description is exactly what a snapshot would carry.
func describe(ctx context.Context, tr *ptrace.Tracer, pid int, o capture.SendOptions) error {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := image.Describe(os.Stdout, image.NewDecoder(pr), ptrace.RegNames[:])
		pr.CloseWithError(err)
		done <- err
	}()
	err := capture.FreezeWith(ctx, tr, pid, pw, capture.FreezeOptions{Tree: o.Tree, TCP: o.TCP, Notice: o.Notice, UnixReconnect: o.UnixReconnect, Parent: o.Parent, StopAndCopy: true})
	pw.CloseWithError(err)
	if derr := <-done; err == nil {
		err = derr
	}
	return err
}

// same reports whether paths a and b name the same existing file.
func same(a, b string) bool {
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}
