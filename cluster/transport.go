package cluster

import (
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// tlsStream is raft's stream layer over mutual TLS with the cluster CA.
type tlsStream struct {
	net.Listener
	client    *tls.Config
	advertise net.Addr // what peers dial; raft records it in its configuration
}

// Addr is the advertised address: raft refuses an unspecified one (0.0.0.0).
func (t *tlsStream) Addr() net.Addr { return t.advertise }

func newTLSStream(addr string, server, client *tls.Config) (*tlsStream, error) {
	ln, err := tls.Listen("tcp", addr, server)
	if err != nil {
		return nil, fmt.Errorf("raft listen %s: %w", addr, err)
	}
	return &tlsStream{Listener: ln, client: client}, nil
}

func (t *tlsStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	c, err := tls.DialWithDialer(d, "tcp", string(addr), t.client)
	if err != nil {
		return nil, fmt.Errorf("raft dial %s: %w", addr, err)
	}
	return c, nil
}
