package scheduler

import (
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/raft"
	"github.com/vmihailenco/msgpack/v5"
)

// handler applies one decoded command to the state at raft index idx. It
// returns the command's result (sent back to the proposer), which may be an
// error; errors never leave the state half-changed.
type handler struct {
	decode func([]byte) (any, error)
	apply  func(s *State, idx uint64, cmd any) any
}

// handlers is filled by init functions in the files named after the objects
// they change (fsm_node.go, fsm_workload.go, fsm_other.go).
var handlers = map[CommandType]handler{}

func register[T any](t CommandType, apply func(s *State, idx uint64, cmd *T) any) {
	handlers[t] = handler{
		decode: func(b []byte) (any, error) {
			c := new(T)
			return c, msgpack.Unmarshal(b, c)
		},
		apply: func(s *State, idx uint64, cmd any) any { return apply(s, idx, cmd.(*T)) },
	}
}

// FSM is the raft finite state machine over State.
type FSM struct {
	// mu guards state and changed.
	mu      sync.RWMutex
	state   *State
	changed chan struct{} // closed and replaced after every change
}

// NewFSM returns an FSM with an empty state.
func NewFSM() *FSM {
	return &FSM{state: NewState(), changed: make(chan struct{})}
}

// Apply implements raft.FSM. An unknown command type without SkippableFlag
// panics: a binary that cannot understand the log must not serve it.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	if len(l.Data) == 0 {
		return fmt.Errorf("apply index %d: empty command", l.Index)
	}
	t := CommandType(l.Data[0])
	h, ok := handlers[t&^SkippableFlag]
	if !ok {
		if t&SkippableFlag != 0 {
			f.mu.Lock()
			f.state.Index = l.Index
			f.mu.Unlock()
			return nil
		}
		panic(fmt.Sprintf("scheduler: apply index %d: unknown command type %d; upgrade pclusterd", l.Index, uint8(t)))
	}
	cmd, err := h.decode(l.Data[1:])
	if err != nil {
		return fmt.Errorf("apply index %d: decode %s: %w", l.Index, t, err)
	}
	f.mu.Lock()
	res := h.apply(f.state, l.Index, cmd)
	f.state.Index = l.Index
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
	return res
}

// Read calls fn with the state under a read lock. fn must not keep or change
// anything it is given.
func (f *FSM) Read(fn func(s *State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

// Changed returns a channel closed at the next change of the state.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed
}

// Copy returns a deep copy of the state.
func (f *FSM) Copy() (*State, error) {
	f.mu.RLock()
	b, err := msgpack.Marshal(f.state)
	f.mu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("copy state: %w", err)
	}
	s := NewState()
	if err := msgpack.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("copy state: %w", err)
	}
	return s, nil
}

// Snapshot implements raft.FSM. The state is encoded under the read lock so
// Persist can run while new entries apply.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	b, err := msgpack.Marshal(f.state)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	return snapshot(b), nil
}

// Restore implements raft.FSM.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	s := NewState()
	if err := msgpack.NewDecoder(rc).Decode(s); err != nil {
		return fmt.Errorf("restore snapshot: %w", err)
	}
	fill(s)
	f.mu.Lock()
	f.state = s
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
	return nil
}

// fill replaces nil maps after decoding an old or empty snapshot.
func fill(s *State) {
	if s.Nodes == nil {
		s.Nodes = map[string]*Node{}
	}
	if s.Workloads == nil {
		s.Workloads = map[string]*Workload{}
	}
	if s.Migrations == nil {
		s.Migrations = map[string]*Migration{}
	}
	if s.CheckpointPolicies == nil {
		s.CheckpointPolicies = map[string]*CheckpointPolicy{}
	}
	if s.Checkpoints == nil {
		s.Checkpoints = map[string]*WorkloadCheckpoints{}
	}
}

type snapshot []byte

func (s snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		sink.Cancel()
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s snapshot) Release() {}
