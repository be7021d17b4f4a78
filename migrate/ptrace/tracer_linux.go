// Package ptrace wraps the ptrace(2) requests pcluster uses to stop, inspect
// and rebuild processes, and owns the one OS thread they must come from.
//
// The kernel accepts ptrace requests for a tracee only from the thread that
// attached it (and a PTRACE_TRACEME child is attached to the thread that
// forked it). Go moves goroutines between threads, so every request goes
// through a Tracer: one goroutine that locks its OS thread for its whole
// life and runs closures sent to it. Functions documented "runs on the
// tracer thread" must only be called from inside Tracer.Do.
package ptrace

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Tracer serves closures on one locked OS thread.
//
// A tracee that never stopped (Wait gave up on it: ErrTimeout) cannot be
// detached, PTRACE_DETACH needs a stopped tracee; it stays attached,
// untouched, until Close, whose thread exit makes the kernel release it
// and drop an interrupt still pending for it, so it never stops.
type Tracer struct {
	reqs chan func()
	done chan struct{}
	tid  int // the tracer thread
	once sync.Once
}

// NewTracer starts the tracer goroutine. Close ends it; when its thread
// exits, the kernel detaches every remaining tracee (and kills those
// attached with PTRACE_O_EXITKILL).
func NewTracer() *Tracer {
	t := &Tracer{reqs: make(chan func()), done: make(chan struct{})}
	started := make(chan struct{})
	go t.serve(started)
	<-started
	return t
}

// serve locks its goroutine to its thread for good and runs the requests
// there. Never unlocked: the goroutine's exit takes the thread with it,
// so no other goroutine ever runs on a thread that is a tracer, and the
// kernel releases the tracees. But the runtime does not end the main
// thread (it parks it forever instead): there a tracer would keep its
// tracees after Close. So on the main thread serve holds it while
// another goroutine, which must then run on another thread, becomes the
// tracer.
func (t *Tracer) serve(started chan<- struct{}) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		next := make(chan struct{})
		go t.serve(next)
		<-next
		runtime.UnlockOSThread()
		close(started)
		return
	}
	t.tid = unix.Gettid()
	close(started)
	defer close(t.done)
	for f := range t.reqs {
		f()
	}
}

// Do runs f on the tracer thread and returns its error. A panic in f is
// turned into an error so that the tracer thread survives.
func (t *Tracer) Do(f func() error) (err error) {
	ch := make(chan error, 1)
	t.reqs <- func() {
		defer func() {
			if r := recover(); r != nil {
				ch <- fmt.Errorf("tracer: panic: %v", r)
			}
		}()
		ch <- f()
	}
	return <-ch
}

// Close stops the tracer goroutine and waits, at most StopTimeout, for
// its thread to be gone: then the kernel has released every tracee.
// Calls after the first do nothing.
func (t *Tracer) Close() { t.once.Do(t.close) }

func (t *Tracer) close() {
	close(t.reqs)
	<-t.done
	// The goroutine has ended, its thread is ending: the runtime makes
	// it exit since it was locked.
	task := fmt.Sprintf("/proc/self/task/%d", t.tid)
	var pause time.Duration
	for deadline := time.Now().Add(StopTimeout); time.Now().Before(deadline); time.Sleep(pause) {
		if _, err := os.Stat(task); err != nil {
			return
		}
		pause = min(max(2*pause, 20*time.Microsecond), 2*time.Millisecond)
	}
}
