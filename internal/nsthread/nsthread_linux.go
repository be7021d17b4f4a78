// Package nsthread runs functions on an OS thread of this process that
// has entered (setns) or made (unshare) UTS, IPC or network namespaces
// other than the process's own. These namespaces belong to a thread, so
// the rest of the process stays where it is: a freezer reads a
// container's host name, System V objects and interfaces on one, a
// restorer makes the container's new namespaces on one. A thread that
// changed namespaces is never given back to the Go scheduler: it ends
// with its goroutine (Close).
package nsthread

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// kinds maps the namespaces a thread may change to their clone flags
// (mount and user namespaces cannot be changed by one thread of many,
// and PID namespaces apply only to children).
var kinds = map[string]int{"uts": unix.CLONE_NEWUTS, "ipc": unix.CLONE_NEWIPC, "net": unix.CLONE_NEWNET}

// Thread is a locked OS thread in namespaces of its own, serving Do.
type Thread struct {
	fns  chan func()
	tid  int
	done chan struct{}
}

// Enter starts a thread in the namespaces of pid named by kinds ("uts",
// "ipc", "net").
func Enter(pid int, kinds ...string) (*Thread, error) {
	var fds []*os.File
	defer func() {
		for _, f := range fds {
			f.Close()
		}
	}()
	var flags []int
	for _, k := range kinds {
		flag, err := flagOf(k)
		if err != nil {
			return nil, err
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", pid, k))
		if err != nil {
			return nil, fmt.Errorf("%s namespace of pid %d: %w", k, pid, err)
		}
		fds, flags = append(fds, f), append(flags, flag)
	}
	return start(func() error {
		for i, f := range fds {
			if err := unix.Setns(int(f.Fd()), flags[i]); err != nil {
				return fmt.Errorf("enter the %s namespace of pid %d: %w", kinds[i], pid, err)
			}
		}
		return nil
	})
}

// New starts a thread in new namespaces of kinds.
func New(kinds ...string) (*Thread, error) {
	flags := 0
	for _, k := range kinds {
		flag, err := flagOf(k)
		if err != nil {
			return nil, err
		}
		flags |= flag
	}
	return start(func() error {
		if err := unix.Unshare(flags); err != nil {
			return fmt.Errorf("new %v namespaces: %w", kinds, err)
		}
		return nil
	})
}

func flagOf(kind string) (int, error) {
	flag, ok := kinds[kind]
	if !ok {
		return 0, fmt.Errorf("nsthread: a thread cannot change its %s namespace", kind)
	}
	return flag, nil
}

// start runs enter on a new locked thread and, if it succeeds, serves
// Do on it until Close. The thread is not unlocked: it ends with the
// goroutine, in whatever namespaces it reached. It is never the main
// thread, which cannot end (the runtime would keep it, in the new
// namespaces, and /proc/self/ns would show them for the whole process):
// a goroutine that finds itself there keeps it busy while another one
// takes a thread, which then cannot be the main one.
func start(enter func() error) (*Thread, error) {
	t := &Thread{fns: make(chan func()), done: make(chan struct{})}
	errc := make(chan error, 1)
	var serve func()
	serve = func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			locked := make(chan struct{})
			go func() {
				runtime.LockOSThread()
				close(locked)
				serve()
			}()
			<-locked
			runtime.UnlockOSThread()
			return
		}
		defer close(t.done)
		t.tid = unix.Gettid()
		if err := enter(); err != nil {
			errc <- err
			return
		}
		errc <- nil
		for fn := range t.fns {
			fn()
		}
	}
	go serve()
	if err := <-errc; err != nil {
		<-t.done
		return nil, err
	}
	return t, nil
}

// Do runs fn on the thread and returns its error.
func (t *Thread) Do(fn func() error) error {
	var err error
	ran := make(chan struct{})
	t.fns <- func() {
		defer close(ran)
		err = fn()
	}
	<-ran
	return err
}

// NSPath names the thread's namespace of kind in /proc, for another
// process to join it (setns).
func (t *Thread) NSPath(kind string) string {
	return fmt.Sprintf("/proc/%d/task/%d/ns/%s", os.Getpid(), t.tid, kind)
}

// Close ends the thread; its namespaces live on only in the processes
// that joined them.
func (t *Thread) Close() {
	close(t.fns)
	<-t.done
}
