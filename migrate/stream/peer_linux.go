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
	// The peer's socket has the remote address as its local one.
	want := procNetAddr(remote) + " " + procNetAddr(local)
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 8 || fields[1]+" "+fields[2] != want {
				continue
			}
			f.Close()
			return strconv.Atoi(fields[7])
		}
		f.Close()
	}
	return 0, fmt.Errorf("peer %s not found in /proc/net/tcp", remote)
}

// procNetAddr formats a as /proc/net/tcp{,6} does: the address in
// host-order 32-bit words as hex, a colon, the port as hex.
func procNetAddr(a *net.TCPAddr) string {
	ip := a.IP.To4()
	if ip == nil {
		ip = a.IP.To16()
	} else if strings.Contains(a.String(), "[") {
		// An IPv4-mapped peer of a tcp6 socket is listed in its 16-byte form.
		ip = a.IP.To16()
	}
	var b strings.Builder
	for i := 0; i+4 <= len(ip); i += 4 {
		w := []byte{ip[i+3], ip[i+2], ip[i+1], ip[i]}
		b.WriteString(strings.ToUpper(hex.EncodeToString(w)))
	}
	fmt.Fprintf(&b, ":%04X", a.Port)
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
