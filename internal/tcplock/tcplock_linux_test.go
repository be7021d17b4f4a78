package tcplock

import (
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// waitFor bounds every wait of these tests (a failure, not a measure).
const waitFor = 20 * time.Second

// inNewNetns runs f on a thread of its own in a network namespace of its
// own, with lo up; the thread, locked, dies with the goroutine, and the
// namespace, with its tables, with it.
func inNewNetns(t *testing.T, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) for a network namespace and nftables")
	}
	done := make(chan struct{})
	var setup error
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread goes with the namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			setup = err
			return
		}
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			setup = err
			return
		}
		f()
	}()
	<-done
	if setup != nil {
		t.Fatalf("network namespace: %v", setup)
	}
}

// TestLockDropsPeerPackets: while a connection is locked, what its peer
// sends does not reach it (the peer retransmits, nothing is received);
// once unlocked, the peer's retransmission gets in. The lock is a table
// of its own, listed by Locked, gone after Unlock, and unlocking twice
// is no error.
func TestLockDropsPeerPackets(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			inNewNetns(t, func() { lockDropsPeerPackets(t, host) })
		})
	}
}

func lockDropsPeerPackets(t *testing.T, host string) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Errorf("listen: %v", err)
		return
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Errorf("dial: %v", err)
		return
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Errorf("accept: %v", err)
		return
	}
	defer server.Close()
	local := server.LocalAddr().(*net.TCPAddr).AddrPort()
	peer := server.RemoteAddr().(*net.TCPAddr).AddrPort()

	if err := Lock(-1, local, peer); err != nil {
		t.Errorf("Lock: %v", err)
		return
	}
	names, err := Locked(-1)
	if want := Name(local, peer); err != nil || !slices.Equal(names, []string{want}) {
		t.Errorf("Locked: %q, %v, want [%q]", names, err, want)
	}
	if _, err := client.Write([]byte("x")); err != nil {
		t.Errorf("write: %v", err)
		return
	}
	// The peer retransmits: its first segment was dropped.
	raw, _ := client.(*net.TCPConn).SyscallConn()
	var info *unix.TCPInfo
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		raw.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
		if err != nil || info.Total_retrans > 0 {
			break
		}
	}
	if err != nil || info.Total_retrans == 0 {
		t.Errorf("the peer's byte: TCP_INFO %v, retransmissions %d, want a retransmission", err, info.Total_retrans)
		return
	}
	sraw, _ := server.(*net.TCPConn).SyscallConn()
	var inq int
	sraw.Control(func(fd uintptr) { inq, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	if err != nil || inq != 0 {
		t.Errorf("while locked: %d bytes received (%v), want none", inq, err)
	}
	if info.State != unix.BPF_TCP_ESTABLISHED {
		t.Errorf("while locked: the peer's state is %d, want established (%d)", info.State, unix.BPF_TCP_ESTABLISHED)
	}

	for i := 0; i < 2; i++ {
		if err := Unlock(-1, local, peer); err != nil {
			t.Errorf("Unlock %d: %v", i+1, err)
		}
	}
	if names, err := Locked(-1); err != nil || len(names) != 0 {
		t.Errorf("after Unlock: Locked %q, %v, want none", names, err)
	}
	server.SetReadDeadline(time.Now().Add(waitFor))
	b := make([]byte, 1)
	if _, err := io.ReadFull(server, b); err != nil || b[0] != 'x' {
		t.Errorf("after Unlock: read %q, %v, want the peer's x", b, err)
	}
}

// TestName: a table per 4-tuple, IPv4-mapped addresses named as IPv4 (as
// on the wire), so that capture and loader name it alike.
func TestName(t *testing.T) {
	l := netip.MustParseAddrPort("[::ffff:127.0.0.1]:8880")
	p := netip.MustParseAddrPort("127.0.0.1:40512")
	if got, want := Name(l, p), "pcluster-tcplock-127.0.0.1-8880-127.0.0.1-40512"; got != want {
		t.Errorf("Name: %q, want %q", got, want)
	}
	if got, want := Name(netip.MustParseAddrPort("[::1]:80"), netip.MustParseAddrPort("[::1]:5000")), "pcluster-tcplock-__1-80-__1-5000"; got != want {
		t.Errorf("Name: %q, want %q", got, want)
	}
	if err := Lock(-1, l, netip.MustParseAddrPort("[::1]:1")); err == nil {
		t.Errorf("Lock of two families: %v, want an error naming them", err)
	}
}
