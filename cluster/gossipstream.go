package cluster

import (
	"net"
	"sync"

	"github.com/hashicorp/memberlist"

	"github.com/pcluster/pcluster/internal/admit"
)

// maxGossipStreams bounds the gossip port's TCP connections (push/pull,
// large messages) being handled at once. memberlist handles each accepted
// one in a goroutine of its own for up to its TCP timeout (10 s), however
// many come: connecting fast, with no key, made pclusterd hold an
// unbounded number of descriptors, which raft and the API share. Beyond
// the bound a new connection is taken and the oldest from the address
// holding the most is closed (package admit). Nothing authenticates a
// stream as a whole (each message is verified with the cluster key), so a
// connection keeps its place until memberlist closes it.
const maxGossipStreams = 64

// gossipTransport is memberlist's own transport with its accepted TCP
// connections admitted into a table of maxGossipStreams places.
type gossipTransport struct {
	*memberlist.NetTransport
	pending *admit.Table
	streams chan net.Conn
	done    chan struct{}
	once    sync.Once
}

// newGossipTransport listens as memberlist would for mc, and sets mc's
// Transport (and, for port 0, its ports).
func newGossipTransport(mc *memberlist.Config) (*gossipTransport, error) {
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
		BindAddrs: []string{mc.BindAddr}, BindPort: mc.BindPort, Logger: mc.Logger, MetricLabels: mc.MetricLabels,
	})
	if err != nil {
		return nil, err
	}
	if mc.BindPort == 0 {
		mc.BindPort = nt.GetAutoBindPort()
		mc.AdvertisePort = mc.BindPort
	}
	t := &gossipTransport{NetTransport: nt, pending: admit.New(maxGossipStreams), streams: make(chan net.Conn), done: make(chan struct{})}
	mc.Transport = t
	go t.admitLoop()
	return t, nil
}

// admitLoop passes memberlist each accepted connection, admitted. It ends
// with Shutdown.
func (t *gossipTransport) admitLoop() {
	for {
		select {
		case c := <-t.NetTransport.StreamCh():
			ac := t.pending.Conn(c)
			if ac == nil {
				continue // shut down: c is closed
			}
			select {
			case t.streams <- ac:
			case <-t.done:
				ac.Close()
				return
			}
		case <-t.done:
			return
		}
	}
}

// StreamCh returns the admitted connections.
func (t *gossipTransport) StreamCh() <-chan net.Conn { return t.streams }

// Shutdown stops the transport: the inner one first (its accept loop may
// be handing admitLoop a connection), then admitLoop, then every
// connection still admitted.
func (t *gossipTransport) Shutdown() error {
	err := t.NetTransport.Shutdown()
	t.once.Do(func() {
		close(t.done)
		t.pending.Close()
	})
	return err
}
