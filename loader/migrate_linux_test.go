package loader_test

import (
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/ptrace"
	"github.com/pcluster/pcluster/migrate/stream"
)

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	code := m.Run()
	fixture.Cleanup()
	os.Exit(code)
}

// waitFor bounds each wait for a fixture's output: a failure bound, not
// a measure.
const waitFor = 20 * time.Second

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the restore clones the saved PID (CAP_CHECKPOINT_RESTORE) and traces the original")
	}
}

// clusterKey is a stream key held as bytes, as an agent derives it.
func clusterKey(t testing.TB) stream.Key {
	k := stream.Key{Name: "cluster", Bytes: make([]byte, stream.KeySize)}
	if _, err := rand.Read(k.Bytes); err != nil {
		t.Fatal(err)
	}
	return k
}

// agents are the two ends of a migration in this process: a source and a
// target, each with its tracer, over one mutual-TLS connection.
type agents struct {
	key              stream.Key
	srcConn, dstConn net.Conn
	srcTr, dstTr     *ptrace.Tracer
}

func newAgents(t testing.TB) *agents {
	a := &agents{key: clusterKey(t), srcTr: ptrace.NewTracer(), dstTr: ptrace.NewTracer()}
	t.Cleanup(func() { a.srcTr.Close(); a.dstTr.Close() })
	a.srcConn, a.dstConn = fixture.TLSPair(t)
	return a
}

// send runs the source agent's side: freeze pid with -halt semantics
// into the connection, decide (nil: kill and commit) once the target has
// built it.
func (a *agents) send(ctx context.Context, conn net.Conn, pid int, decide func() error) error {
	sink, err := stream.NewConnSink(ctx, conn, stream.SinkOptions{Authenticated: true, Halt: true, WriteTimeout: waitFor})
	if err != nil {
		return err
	}
	return capture.SendTo(ctx, a.srcTr, pid, sink, capture.SendOptions{Halt: true,
		Codec: stream.Codec{Name: stream.CompressAuto}, Cipher: stream.CipherAESGCM, Key: &a.key,
		ReadyTimeout: waitFor, Decide: decide})
}

// receive runs the target agent's side, the copy's stdout and stderr
// going to out.
func (a *agents) receive(ctx context.Context, conn net.Conn, out *os.File) (*loader.Process, error) {
	src, err := stream.NewConnSource(ctx, conn, stream.SourceOptions{Authenticated: true, ReadTimeout: waitFor})
	if err != nil {
		return nil, err
	}
	return loader.ReceiveFrom(ctx, a.dstTr, src, loader.ReceiveOptions{Keys: []stream.Key{a.key},
		CommitTimeout: waitFor, Options: loader.Options{Stdio: [3]*os.File{nil, out, out}}})
}

// reap kills and waits for a restored process: the test binary is its
// parent.
func reap(t testing.TB, p *loader.Process) {
	t.Helper()
	syscall.Kill(p.Pid(), syscall.SIGKILL)
	if _, err := p.Wait(); err != nil {
		t.Errorf("wait for the copy %d: %v", p.Pid(), err)
	}
}

// alive reports whether pid exists and has not exited.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && b[i+2] != 'X'
}

// TestMigrateOverTLS moves a counting process between two agents of this
// process over mutual TLS with the halt handshake, keys as bytes: the
// source decides only once the copy is built and not started, the
// original is killed only then, and the copy, with the original's PID,
// continues the counter where the original stopped.
func TestMigrateOverTLS(t *testing.T) {
	needRoot(t)
	orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "countforever"))
	orig.Expect(t, `^3$`, waitFor)
	a := newAgents(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	out := fixture.FollowReader(t, pr)

	var decided atomic.Bool
	var decideErr error
	sent := make(chan error, 1)
	go func() {
		sent <- a.send(context.Background(), a.srcConn, pid, func() error {
			decided.Store(true)
			// The target has built the copy and waits for the commit:
			// the original must still be there and the copy silent.
			if !alive(pid) {
				decideErr = errors.New("the original exited before the decision")
			}
			if l := out.Drain(); len(l) > 0 {
				decideErr = errors.New("the copy printed " + strconv.Quote(l[0]) + " before the commit")
			}
			return nil
		})
	}()
	p, rerr := a.receive(context.Background(), a.dstConn, pw)
	pw.Close()
	serr := <-sent
	if p != nil {
		defer reap(t, p)
	}
	if rerr != nil || serr != nil {
		t.Fatalf("target: %v; source: %v", rerr, serr)
	}
	if !decided.Load() || decideErr != nil {
		t.Fatalf("decision: called %v, %v", decided.Load(), decideErr)
	}
	if p.Pid() != pid {
		t.Errorf("the copy runs as pid %d, want the original's %d", p.Pid(), pid)
	}
	// The original's last line, then the copy's: one step each, no gap,
	// no repeat. The original's output ends: it was killed (and its
	// shell, having waited for it, exited).
	select {
	case <-orig.Done():
	case <-time.After(waitFor):
		t.Fatalf("the original's output did not end: it still runs after the commit")
	}
	orig.Drain()
	seen := orig.Last()
	last, err := strconv.Atoi(seen[len(seen)-1])
	if err != nil {
		t.Fatalf("the original's last line %q: %v", seen[len(seen)-1], err)
	}
	for want := last + 1; want <= last+3; want++ {
		got, err := out.Next(waitFor)
		if err != nil || got != strconv.Itoa(want) {
			t.Fatalf("the copy printed %q (%v), want %d", got, err, want)
		}
	}
}

// cancelAfter is a connection that cancels a context once n bytes went
// through it (written, or read): a cancellation in the middle of a
// stream, wherever the stream is at that moment.
type cancelAfter struct {
	net.Conn
	n      atomic.Int64
	cancel context.CancelCauseFunc
	read   bool // count reads, not writes
}

var errAgentStops = errors.New("agent stops")

func (c *cancelAfter) count(n int) {
	if c.n.Add(-int64(n)) <= 0 {
		c.cancel(errAgentStops)
	}
}

func (c *cancelAfter) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if !c.read {
		c.count(n)
	}
	return n, err
}

func (c *cancelAfter) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.read {
		c.count(n)
	}
	return n, err
}

// TestMigrateCancelled cancels the migration of an 8 MiB process in the
// middle of its stream, once from the source's context and once from the
// target's: the original is resumed where it was and goes on counting,
// the decision is never asked for, both sides return the cancellation
// (the cancelling side wraps its cause), and no half-built process is
// left: the test binary's only child is the original.
func TestMigrateCancelled(t *testing.T) {
	needRoot(t)
	for _, side := range []string{"source", "target"} {
		t.Run(side, func(t *testing.T) {
			orig, pid := fixture.StartUnderShell(t, fixture.Build(t, "bigheap"), "8")
			orig.Expect(t, `^tick 1$`, waitFor)
			a := newAgents(t)
			ctx, cancel := context.WithCancelCause(context.Background())
			defer cancel(nil)
			srcCtx, dstCtx := ctx, context.Background()
			srcConn, dstConn := a.srcConn, a.dstConn
			if side == "source" {
				c := &cancelAfter{Conn: a.srcConn, cancel: cancel}
				c.n.Store(1 << 20)
				srcConn = c
			} else {
				srcCtx, dstCtx = context.Background(), ctx
				c := &cancelAfter{Conn: a.dstConn, cancel: cancel, read: true}
				c.n.Store(1 << 20)
				dstConn = c
			}
			sent := make(chan error, 1)
			go func() {
				sent <- a.send(srcCtx, srcConn, pid, func() error {
					return errors.New("decision asked for a cancelled migration")
				})
			}()
			p, rerr := a.receive(dstCtx, dstConn, nil)
			serr := <-sent
			if p != nil {
				reap(t, p)
				t.Fatalf("the target restored pid %d", p.Pid())
			}
			cancelling, other := serr, rerr
			if side == "target" {
				cancelling, other = rerr, serr
			}
			if !errors.Is(cancelling, errAgentStops) {
				t.Errorf("the %s: got %v, want the cancellation's cause", side, cancelling)
			}
			if other == nil || strings.Contains(other.Error(), "decision asked") {
				t.Errorf("the other side: got %v, want the stream broken", other)
			}
			if got, err := fixture.Children(os.Getpid()); err != nil || len(got) != 1 || got[0] != orig.Pid() {
				t.Errorf("children of the test: %v (%v), want only the original's shell %d", got, err, orig.Pid())
			}
			if !alive(pid) {
				t.Fatalf("the original %d is gone", pid)
			}
			orig.Drain()
			seen := orig.Last()
			n, err := strconv.Atoi(strings.TrimPrefix(seen[len(seen)-1], "tick "))
			if err != nil {
				t.Fatalf("the original's last line %q", seen[len(seen)-1])
			}
			if got, err := orig.Next(waitFor); err != nil || got != "tick "+strconv.Itoa(n+1) {
				t.Errorf("the original printed %q (%v) after the cancelled migration, want %q", got, err, "tick "+strconv.Itoa(n+1))
			}
		})
	}
}
