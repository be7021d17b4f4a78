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
	"runtime"
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
}

// NewTracer starts the tracer goroutine. Close ends it; when its thread
// exits, the kernel detaches every remaining tracee (and kills those
// attached with PTRACE_O_EXITKILL).
func NewTracer() *Tracer {
	t := &Tracer{reqs: make(chan func()), done: make(chan struct{})}
	started := make(chan struct{})
	go func() {
		// Never unlocked: the goroutine's exit takes the thread with it, so
		// no other goroutine ever runs on a thread that is a tracer.
		runtime.LockOSThread()
		close(started)
		defer close(t.done)
		for f := range t.reqs {
			f()
		}
	}()
	<-started
	return t
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

// Close stops the tracer goroutine and waits for it to exit.
func (t *Tracer) Close() {
	close(t.reqs)
	<-t.done
}
