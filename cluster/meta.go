package cluster

import (
	"fmt"

	"github.com/hashicorp/memberlist"
	"github.com/pcluster/pcluster/scheduler"
	"github.com/vmihailenco/msgpack/v5"
)

// meta is what each node gossips about itself in memberlist's node
// metadata (at most memberlist.MetaMaxSize bytes).
type meta struct {
	APIAddr  string            `msgpack:"a"`
	RaftAddr string            `msgpack:"r"`
	Expect   int               `msgpack:"e"` // -bootstrap-expect
	Booted   bool              `msgpack:"b"` // has raft state: never bootstrap again
	Load     scheduler.Load    `msgpack:"l"`
	Labels   map[string]string `msgpack:"t"` // -label, for placement constraints
	NoVIP    string            `msgpack:"v"` // why this node cannot carry virtual IPs; "" if it can
}

func (m meta) encode() ([]byte, error) {
	b, err := msgpack.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode node meta: %w", err)
	}
	if len(b) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("encode node meta: %d bytes, limit %d", len(b), memberlist.MetaMaxSize)
	}
	return b, nil
}

func decodeMeta(n *memberlist.Node) (meta, bool) {
	var m meta
	if n == nil || len(n.Meta) == 0 || msgpack.Unmarshal(n.Meta, &m) != nil {
		return m, false
	}
	return m, true
}
