// Package scheduler holds the raft-replicated cluster state (nodes, workloads,
// migrations, checkpoint policies), the FSM that changes it, and the pure
// decisions taken from it, such as where a new workload runs.
package scheduler

import (
	"fmt"
	"sort"

	"github.com/vmihailenco/msgpack/v5"
)

// NodeStatus is a node's standing in the cluster.
type NodeStatus string

// Node statuses.
const (
	NodeReady    NodeStatus = "ready"
	NodeDraining NodeStatus = "draining"
	NodeDown     NodeStatus = "down"
)

// Load is the compact load vector a node gossips and the leader records.
type Load struct {
	CPULoad1  float64 `msgpack:"l1"`
	NumCPU    int     `msgpack:"cpu"`
	MemUsed   uint64  `msgpack:"mu"`
	MemFree   uint64  `msgpack:"mf"`
	Workloads int     `msgpack:"w"`
	// What the node's own workloads use, measured by its agent from each
	// workload's cgroup (node/usage_linux.go): WCPU, CPU time per second
	// in milli-cores, and WRSS, memory in bytes, summed over all of them;
	// Use, the same per workload ID for the busiest ones (as many as fit
	// in the gossip metadata). The balancer counts these, not the host's
	// load average, which namespaces of one machine share.
	WCPU uint32         `msgpack:"wc,omitempty"`
	WRSS uint64         `msgpack:"wm,omitempty"`
	Use  map[string]Use `msgpack:"u,omitempty"`
	// UseTrunc: Use leaves out some workloads (they did not fit).
	UseTrunc bool `msgpack:"ut,omitempty"`
}

// Use is what one workload uses: CPU in milli-cores (CPU time per second
// of wall time over the last sample interval) and memory in bytes. It is
// encoded as a two-element array of compact integers to keep the gossip
// metadata small (EncodeMsgpack).
type Use struct {
	CPU uint32
	RSS uint64
}

// EncodeMsgpack writes u as [CPU, RSS], each integer in as few bytes as
// it needs.
func (u Use) EncodeMsgpack(enc *msgpack.Encoder) error {
	if err := enc.EncodeArrayLen(2); err != nil {
		return err
	}
	if err := enc.EncodeUint(uint64(u.CPU)); err != nil {
		return err
	}
	return enc.EncodeUint(u.RSS)
}

// DecodeMsgpack reads what EncodeMsgpack writes.
func (u *Use) DecodeMsgpack(dec *msgpack.Decoder) error {
	n, err := dec.DecodeArrayLen()
	if err != nil {
		return err
	}
	if n != 2 {
		return fmt.Errorf("workload use: %d elements, want 2", n)
	}
	cpu, err := dec.DecodeUint32()
	if err != nil {
		return fmt.Errorf("workload use: cpu: %w", err)
	}
	rss, err := dec.DecodeUint64()
	if err != nil {
		return fmt.Errorf("workload use: rss: %w", err)
	}
	u.CPU, u.RSS = cpu, rss
	return nil
}

// Node is one host running pclusterd.
type Node struct {
	Name       string            `msgpack:"name"`
	GossipAddr string            `msgpack:"gossip"`
	RaftAddr   string            `msgpack:"raft"`
	APIAddr    string            `msgpack:"api"`
	Labels     map[string]string `msgpack:"labels"`
	// NoVIP says why the node cannot carry virtual IPs (its pclusterd
	// lacks CAP_NET_ADMIN or CAP_NET_RAW), "" when it can.
	NoVIP    string     `msgpack:"no_vip"`
	Status   NodeStatus `msgpack:"status"`
	Eligible bool       `msgpack:"eligible"`
	Load     Load       `msgpack:"load"`
	LoadAt   int64      `msgpack:"load_at"`   // unix nanoseconds
	StatusAt int64      `msgpack:"status_at"` // unix nanoseconds
	// Drain is the node's drain, in progress or the last completed; nil
	// when none was set or the last was cancelled.
	Drain *DrainSpec `msgpack:"drain"`
}

// WorkloadState is where a workload is in its life.
type WorkloadState string

// Workload states. Lost means the node running it was declared dead: the
// process may or may not still exist, and deciding what to do is left to an
// operator or to the rescheduler (a later issue). Unlike the ended states,
// lost is never garbage-collected (scheduler/gc.go says why).
const (
	StatePending WorkloadState = "pending" // placed, not yet started by its node
	StateRunning WorkloadState = "running"
	StateExited  WorkloadState = "exited" // ended with status 0 and no restart due
	StateFailed  WorkloadState = "failed" // ended non-zero or by signal, no restart due
	StateStopped WorkloadState = "stopped"
	StateLost    WorkloadState = "lost"
)

// Active reports whether the workload occupies its node.
func (s WorkloadState) Active() bool {
	return s == StatePending || s == StateRunning
}

// Restart modes. Nothing is restarted unless the spec says so.
const (
	RestartNever     = "never"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// RestartPolicy says whether an ended workload is started again; Max bounds
// the number of restarts (0 means no bound).
type RestartPolicy struct {
	Mode string `msgpack:"mode"`
	Max  int    `msgpack:"max"`
}

// Resources is a hint used by placement.
type Resources struct {
	CPUMilli int    `msgpack:"cpu"`
	MemoryMB uint64 `msgpack:"mem"`
}

// MigrateNever keeps a workload out of the balancer's moves.
const MigrateNever = "never"

// Desired run states.
const (
	DesiredRunning = "running"
	DesiredStopped = "stopped"
)

// Workload is one supervised process.
type Workload struct {
	ID          string            `msgpack:"id"`
	Name        string            `msgpack:"name"`
	Command     string            `msgpack:"cmd"`
	Args        []string          `msgpack:"args"`
	Env         []string          `msgpack:"env"`
	Cwd         string            `msgpack:"cwd"`
	UID         int               `msgpack:"uid"`   // -1: not given; else 0..MaxID
	GID         int               `msgpack:"gid"`   // -1: not given; else 0..MaxID
	User        string            `msgpack:"user"`  // a user name, resolved by the node that runs it
	Group       string            `msgpack:"group"` // a group name, resolved by the node that runs it
	Labels      map[string]string `msgpack:"labels"`
	Constraints map[string]string `msgpack:"constraints"` // node labels required
	VIP         string            `msgpack:"vip"`
	Resources   Resources         `msgpack:"res"`
	Restart     RestartPolicy     `msgpack:"restart"`
	// Migrate is MigrateNever for a workload the balancer must not move
	// (drains and operators still may); "" lets it.
	Migrate string `msgpack:"migrate,omitempty"`
	// Fence is what a node cut off from the raft majority does with the
	// workload (FenceFreeze, FenceOff); "": as its checkpoint policies
	// say, else FenceFreeze (scheduler/fence.go).
	Fence string `msgpack:"fence,omitempty"`

	Desired     string        `msgpack:"desired"`
	DesiredNode string        `msgpack:"desired_node"` // where it should run
	Node        string        `msgpack:"node"`         // where it runs (or last ran)
	State       WorkloadState `msgpack:"state"`
	Attempt     int           `msgpack:"attempt"` // 1 for the first start, +1 per restart and per committed move
	Restarts    int           `msgpack:"restarts"`
	PID         int           `msgpack:"pid"`
	StartTicks  uint64        `msgpack:"start_ticks"` // /proc/PID/stat starttime, to tell PID reuse
	ExitCode    int           `msgpack:"exit_code"`
	Signal      string        `msgpack:"signal"`
	Message     string        `msgpack:"msg"`
	CreatedAt   int64         `msgpack:"created_at"`
	StartedAt   int64         `msgpack:"started_at"`
	EndedAt     int64         `msgpack:"ended_at"`
	LostAt      int64         `msgpack:"lost_at"` // when its node was declared down; 0 unless lost
	ModifyIndex uint64        `msgpack:"modify_index"`

	// A workload runs as a PID namespace of its own (node/init_linux.go):
	// PID is its program's PID on the host, NSPID the same process's in
	// its namespace (what getpid answers there; kept across moves), and
	// InitPID the host PID of the namespace's init, the process its agent
	// supervises, signals and moves, whose start StartTicks is. InitPID 0:
	// a plain child (started by an agent from before namespaces).
	NSPID   int `msgpack:"ns_pid"`
	InitPID int `msgpack:"init_pid"`

	// Restore, when set, is the last rollback asked for (`pclusterctl
	// restore`): attempt Restore.Attempt is restored from a checkpoint
	// instead of started from the command.
	Restore *RestoreSpec `msgpack:"restore"`
	// Failover, when set, says how the workload last came back after its
	// node was declared down (scheduler/failover.go).
	Failover *FailoverInfo `msgpack:"failover"`
}

// FailoverInfo records a failover: from a checkpoint (Seq > 0; Age is
// how much work was rolled back: from the checkpoint to the node's loss)
// or from the command (Seq 0).
type FailoverInfo struct {
	At   int64  `msgpack:"at"`
	From string `msgpack:"from"` // the node declared down
	To   string `msgpack:"to"`
	Seq  uint64 `msgpack:"seq"`
	Age  int64  `msgpack:"age"` // nanoseconds
}

// RestoreSpec says which checkpoint attempt Attempt of a workload is
// restored from, on which node (one holding a copy).
type RestoreSpec struct {
	Seq  uint64 `msgpack:"seq"`
	Node string `msgpack:"node"`
	// Replaces is the running attempt its node stops first (0: the
	// workload was not running).
	Replaces int   `msgpack:"replaces"`
	Attempt  int   `msgpack:"attempt"`
	NSPID    int   `msgpack:"ns_pid"` // the checkpoint's program in its namespace; 0: not a namespace
	At       int64 `msgpack:"at"`
}

// MigrationState is a step of the migration state machine
// (scheduler/fsm_migration.go): planned → transferring → committed → done,
// or planned|transferring → aborted.
type MigrationState string

// Migration states.
const (
	MigrationPlanned      MigrationState = "planned"      // the leader chose the target
	MigrationTransferring MigrationState = "transferring" // the source froze the process and streams it
	MigrationCommitted    MigrationState = "committed"    // the raft entry moved the workload to the target
	MigrationDone         MigrationState = "done"         // the target started it (or was lost after the commit)
	MigrationAborted      MigrationState = "aborted"      // before the commit: the workload stays on the source
)

// Active reports whether the migration still occupies its workload: at
// most one active migration per workload.
func (m MigrationState) Active() bool {
	return m == MigrationPlanned || m == MigrationTransferring || m == MigrationCommitted
}

// Who planned a migration (Migration.Origin): an operator through the API
// (pclusterctl migrate), a node's drain, or the balancer.
const (
	OriginOperator = "operator"
	OriginDrain    = "drain"
	OriginBalancer = "balancer"
)

// Migration records one move of a workload between nodes. Its ID is given
// by the FSM from the raft index of the plan ("m" + index), so replicas
// agree and planners stay pure.
type Migration struct {
	ID         string         `msgpack:"id"`
	WorkloadID string         `msgpack:"workload"`
	Source     string         `msgpack:"source"`
	Target     string         `msgpack:"target"`
	State      MigrationState `msgpack:"state"`
	// Attempt is the workload's attempt when planned: the generation every
	// step names. The commit moves the workload to Attempt+1.
	Attempt     int    `msgpack:"attempt"`
	Reason      string `msgpack:"reason"`           // why it was planned ("drain of node a", "operator")
	Origin      string `msgpack:"origin,omitempty"` // who planned it: operator, drain, balancer; "" if planned by an older version
	Error       string `msgpack:"error"`            // why it was aborted, or what happened after the commit
	PlannedAt   int64  `msgpack:"planned_at"`
	UpdatedAt   int64  `msgpack:"updated_at"`
	EndedAt     int64  `msgpack:"ended_at"` // done or aborted; 0 while active
	PlanIndex   uint64 `msgpack:"plan_index"`
	ModifyIndex uint64 `msgpack:"modify_index"`
	// TransferAt is when the source began the transfer (the transferring
	// step); Bytes, the size of the stream the target received (the
	// commit). The process is stopped from StoppedAt (a live migration:
	// it ran while Rounds rounds sent PrecopyBytes of its memory), or
	// without one from TransferAt, to the done step.
	TransferAt   int64 `msgpack:"transfer_at"`
	Bytes        int64 `msgpack:"bytes"`
	Rounds       int   `msgpack:"rounds,omitempty"`
	PrecopyBytes int64 `msgpack:"precopy_bytes,omitempty"`
	StoppedAt    int64 `msgpack:"stopped_at,omitempty"`
}

// DrainSpec is a node's drain, kept in the raft state so that a new leader
// carries it on (Nomad's DrainStrategy). Times are unix nanoseconds.
type DrainSpec struct {
	StartedAt      int64 `msgpack:"started_at"`
	Deadline       int64 `msgpack:"deadline"` // workloads still on the node then are stopped; 0 with NoDeadline
	NoDeadline     bool  `msgpack:"no_deadline"`
	Force          bool  `msgpack:"force"` // deadline now
	MaxParallel    int   `msgpack:"max_parallel"`
	KeepIneligible bool  `msgpack:"keep_ineligible"` // a cancelled drain leaves the node ineligible
	CompletedAt    int64 `msgpack:"completed_at"`    // 0 while draining
}

// Draining reports whether d is a drain in progress.
func (d *DrainSpec) Draining() bool { return d != nil && d.CompletedAt == 0 }

// CheckpointPolicy says which workloads are checkpointed how often
// (scheduler/checkpoint.go): every workload whose labels hold all of
// Selector (an empty selector: every workload).
type CheckpointPolicy struct {
	Name     string            `msgpack:"name"`
	Selector map[string]string `msgpack:"selector"`
	Interval int64             `msgpack:"interval"` // nanoseconds
	Keep     int               `msgpack:"keep"`     // checkpoints kept per workload; 0: DefaultCheckpointKeep
	Replicas int               `msgpack:"replicas"` // copies on other nodes
	// Fence: FenceOff keeps the workloads it applies to running on a
	// node cut off from the majority (unless their own Fence says
	// otherwise); "" or FenceFreeze: the default, freeze.
	Fence string `msgpack:"fence,omitempty"`
	// FullEvery: every FullEvery-th checkpoint of a chain is full, the
	// others incremental against the one before (0:
	// DefaultCheckpointFullEvery; 1: every checkpoint full).
	FullEvery int `msgpack:"full_every,omitempty"`
}

// Checkpoint is one leave-running checkpoint of a workload, a file in the
// data directory of each node in Holders.
type Checkpoint struct {
	WorkloadID string `msgpack:"workload"`
	Seq        uint64 `msgpack:"seq"`     // 1, 2, ... per workload
	Node       string `msgpack:"node"`    // the node that took it
	Attempt    int    `msgpack:"attempt"` // the workload's attempt it was taken of
	At         int64  `msgpack:"at"`      // when the process was frozen, unix nanoseconds
	Size       int64  `msgpack:"size"`    // bytes of the file
	// Targets are the nodes the leader chose for the copies; Holders the
	// nodes that reported holding the file (Node first).
	Targets []string `msgpack:"targets"`
	Holders []string `msgpack:"holders"`
	// NSPID is the program's PID in the workload's namespace, which the
	// checkpoint holds whole; 0: the checkpoint is of the process alone.
	NSPID int `msgpack:"ns_pid"`
	// Parent, for an incremental checkpoint, is the checkpoint (taken
	// before, kept) whose unchanged pages it refers to; 0: full.
	Parent uint64 `msgpack:"parent,omitempty"`
}

// Held reports whether node holds a copy of c.
func (c *Checkpoint) Held(node string) bool {
	for _, h := range c.Holders {
		if h == node {
			return true
		}
	}
	return false
}

// WorkloadCheckpoints is a workload's checkpoints, oldest first, and the
// outcome of the latest tries: a failure is counted and kept here (and
// shown by `checkpoint list`) until the next success, never skipped.
type WorkloadCheckpoints struct {
	Seq         uint64        `msgpack:"seq"` // the last sequence number given
	List        []*Checkpoint `msgpack:"list"`
	LastAt      int64         `msgpack:"last_at"`      // the last success
	RequestedAt int64         `msgpack:"requested_at"` // `checkpoint now`
	Failures    int           `msgpack:"failures"`     // consecutive failures since the last success
	FailedTotal int           `msgpack:"failed_total"`
	LastError   string        `msgpack:"last_error"`
	LastErrorAt int64         `msgpack:"last_error_at"`
}

// Chain returns checkpoint seq and the checkpoints it needs to be
// restored, itself first, then its parent, and so on to a full one; nil
// if seq or one of them is not kept.
func (r *WorkloadCheckpoints) Chain(seq uint64) []*Checkpoint {
	var out []*Checkpoint
	for seq != 0 && len(out) <= len(r.List) {
		c := r.Find(seq)
		if c == nil {
			return nil
		}
		out = append(out, c)
		seq = c.Parent
	}
	if seq != 0 {
		return nil // a loop: never recorded, but never followed forever
	}
	return out
}

// ChainHeld reports whether node holds checkpoint seq and every
// checkpoint it needs.
func (r *WorkloadCheckpoints) ChainHeld(seq uint64, node string) bool {
	chain := r.Chain(seq)
	for _, c := range chain {
		if !c.Held(node) {
			return false
		}
	}
	return chain != nil
}

// Find returns checkpoint seq, nil if it is not kept.
func (r *WorkloadCheckpoints) Find(seq uint64) *Checkpoint {
	for _, c := range r.List {
		if c.Seq == seq {
			return c
		}
	}
	return nil
}

// State is everything the raft log decides.
type State struct {
	Nodes              map[string]*Node             `msgpack:"nodes"`
	Workloads          map[string]*Workload         `msgpack:"workloads"`
	Migrations         map[string]*Migration        `msgpack:"migrations"`
	CheckpointPolicies map[string]*CheckpointPolicy `msgpack:"checkpoint_policies"`
	Balance            BalanceConfig                `msgpack:"balance"`
	// Checkpoints by workload ID; removed with the workload.
	Checkpoints map[string]*WorkloadCheckpoints `msgpack:"checkpoints"`
	Index       uint64                          `msgpack:"index"` // last applied raft index
}

// NewState returns an empty state.
func NewState() *State {
	return &State{
		Nodes:              map[string]*Node{},
		Workloads:          map[string]*Workload{},
		Migrations:         map[string]*Migration{},
		CheckpointPolicies: map[string]*CheckpointPolicy{},
		Checkpoints:        map[string]*WorkloadCheckpoints{},
	}
}

// SortedNodes returns the nodes ordered by name.
func (s *State) SortedNodes() []*Node {
	out := make([]*Node, 0, len(s.Nodes))
	for _, n := range s.Nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// SortedWorkloads returns the workloads ordered by creation, then ID.
func (s *State) SortedWorkloads() []*Workload {
	out := make([]*Workload, 0, len(s.Workloads))
	for _, w := range s.Workloads {
		out = append(out, w)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].CreatedAt != out[j].CreatedAt {
			return out[i].CreatedAt < out[j].CreatedAt
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// ActiveOn counts the active workloads whose desired or actual node is name.
func (s *State) ActiveOn(name string) int {
	n := 0
	for _, w := range s.Workloads {
		if w.State.Active() && (w.DesiredNode == name || w.Node == name) {
			n++
		}
	}
	return n
}
