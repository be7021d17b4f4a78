package image

import (
	"errors"
	"testing"
)

// TestCheckSockets: fd records of TCP connections and UDP sockets that a
// restore could not rebuild are corrupt, each named by its fd.
func TestCheckSockets(t *testing.T) {
	good := func() *TCPConn {
		return &TCPConn{Family: afInet, Local: SockAddr{IP: []byte{127, 0, 0, 1}, Port: 80},
			Peer: SockAddr{IP: []byte{127, 0, 0, 1}, Port: 4000}, State: TCPEstablished,
			SendQueue: make([]byte, 10), Unsent: 4, MSS: 1460, SndWscale: 7, RcvWscale: 7}
	}
	if err := CheckFD(&FD{Fd: 5, Kind: FDTCP, TCP: good()}); err != nil {
		t.Fatalf("a good connection: %v", err)
	}
	for name, bad := range map[string]func(c *TCPConn){
		"v6 address in v4":  func(c *TCPConn) { c.Local.IP = make([]byte, 16) },
		"no peer port":      func(c *TCPConn) { c.Peer.Port = 0 },
		"port out of range": func(c *TCPConn) { c.Local.Port = 70000 },
		"unsent > queue":    func(c *TCPConn) { c.Unsent = 11 },
		"negative unsent":   func(c *TCPConn) { c.Unsent = -1 },
		"state LISTEN":      func(c *TCPConn) { c.State = 10 },
		"window scale 15":   func(c *TCPConn) { c.SndWscale = 15 },
		"unknown family":    func(c *TCPConn) { c.Family = 1 },
	} {
		c := good()
		bad(c)
		if err := CheckFD(&FD{Fd: 5, Kind: FDTCP, TCP: c}); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: got %v, want corrupt", name, err)
		}
	}
	if err := CheckFD(&FD{Fd: 5, Kind: FDTCP}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a tcp record without its connection: got %v, want corrupt", err)
	}
	peer := SockAddr{IP: make([]byte, 16), Port: 53}
	if err := CheckFD(&FD{Fd: 6, Kind: FDUDP, UDP: &UDPSocket{Family: afInet6, Local: SockAddr{IP: make([]byte, 16)}, Peer: &peer}}); err != nil {
		t.Errorf("a good UDP socket: %v", err)
	}
	if err := CheckFD(&FD{Fd: 6, Kind: FDUDP, UDP: &UDPSocket{Family: afInet6, Local: SockAddr{IP: make([]byte, 4)}}}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a UDP socket with a v4 address on v6: got %v, want corrupt", err)
	}
}
