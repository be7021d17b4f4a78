package nsthread

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestNewLeavesProcessAlone: a thread in a new UTS namespace sets its own
// host name there; the process (its main thread, which /proc/self/ns
// shows) and every other thread keep this host's, however many such
// threads come and go, and a thread that entered the namespace of
// another thread's sees the new name.
func TestNewLeavesProcessAlone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN) for new namespaces")
	}
	ns, err := os.Readlink("/proc/self/ns/uts")
	if err != nil {
		t.Fatal(err)
	}
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		th, err := New("uts", "ipc", "net")
		if err != nil {
			t.Fatal(err)
		}
		if err := th.Do(func() error { return unix.Sethostname([]byte("nsthread-test")) }); err != nil {
			th.Close()
			t.Fatal(err)
		}
		mine, _ := os.Readlink(th.NSPath("uts"))
		in, err := Enter(os.Getpid(), "uts")
		if err != nil {
			th.Close()
			t.Fatal(err)
		}
		in.Close()
		if mine == ns {
			t.Fatalf("round %d: the new thread is in the process's UTS namespace %s", i, ns)
		}
		th.Close()
		if got, _ := os.Readlink("/proc/self/ns/uts"); got != ns {
			t.Fatalf("round %d: the process is in UTS namespace %s, want %s", i, got, ns)
		}
		if got, _ := os.Hostname(); got != host {
			t.Fatalf("round %d: host name %q, want %q", i, got, host)
		}
	}
	if _, err := New("mnt"); err == nil {
		t.Fatal("New(mnt) succeeded: a thread cannot have a mount namespace of its own")
	}
}
