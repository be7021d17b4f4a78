package stream

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// tcpPeerUID returns the user owning the socket at the other end of a
// loopback TCP connection c, as the kernel lists it in /proc/net/tcp{,6}.
// A plaintext loopback listener accepts only its own user: on loopback any
// local user can connect, and a snapshot runs as whatever user it names.
func tcpPeerUID(c net.Conn) (int, error) {
	local, ok1 := c.LocalAddr().(*net.TCPAddr)
	remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return 0, fmt.Errorf("not a TCP connection")
	}
	// The peer's socket has the remote address as its local one. It is an
	// IPv4 socket (listed in /proc/net/tcp) or an IPv6 one (tcp6), which
	// for an IPv4 connection (a dual-stack listener, tcp:PORT) lists both
	// addresses in their IPv4-mapped 16-byte form.
	var tables [][2]string
	if remote.IP.To4() != nil && local.IP.To4() != nil {
		tables = append(tables, [2]string{"/proc/net/tcp", procNetAddr(remote.IP.To4(), remote.Port) + " " + procNetAddr(local.IP.To4(), local.Port)})
	}
	tables = append(tables, [2]string{"/proc/net/tcp6", procNetAddr(remote.IP.To16(), remote.Port) + " " + procNetAddr(local.IP.To16(), local.Port)})
	for _, t := range tables {
		if uid, ok, err := findSocketUID(t[0], t[1]); ok || err != nil {
			return uid, err
		}
	}
	return 0, fmt.Errorf("peer %s not found in /proc/net/tcp or tcp6", remote)
}

// findSocketUID looks up the socket whose "local remote" addresses are
// want in table and returns its owner.
func findSocketUID(table, want string) (uid int, found bool, err error) {
	f, err := os.Open(table)
	if err != nil {
		return 0, false, nil // no IPv6 in this kernel: nothing there
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 || fields[1]+" "+fields[2] != want {
			continue
		}
		uid, err := strconv.Atoi(fields[7])
		return uid, true, err
	}
	return 0, false, sc.Err()
}

// procNetAddr formats ip (4 or 16 bytes) and port as /proc/net/tcp{,6}
// does: the address in host-order 32-bit words as hex, a colon, the port
// as hex.
func procNetAddr(ip net.IP, port int) string {
	var b strings.Builder
	for i := 0; i+4 <= len(ip); i += 4 {
		w := []byte{ip[i+3], ip[i+2], ip[i+1], ip[i]}
		b.WriteString(strings.ToUpper(hex.EncodeToString(w)))
	}
	fmt.Fprintf(&b, ":%04X", port)
	return b.String()
}

// unixPeerUID returns the user of the process at the other end of a unix
// socket connection: for a client, the listener's, recorded by the kernel
// when it called listen (SO_PEERCRED).
func unixPeerUID(c net.Conn) (int, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("not a socket")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	return int(cred.Uid), nil
}
