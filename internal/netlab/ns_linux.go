package netlab

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// InNS runs f on an OS thread moved into network namespace ns (a name
// under /run/netns, such as a Host's NS). The thread is never returned
// to the runtime's pool: it ends with its goroutine.
func InNS(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		h, err := netns.GetFromName(ns)
		if err != nil {
			errc <- fmt.Errorf("netns %s: %w", ns, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}
