// Package api is pclusterd's HTTP API: the JSON types it speaks and a client
// for them. It is all pclusterctl imports, so it must never import raft,
// memberlist or ptrace code (a test in cmd/pclusterctl checks).
package api

import (
	"fmt"
	"time"
)

// Paths served by pclusterd.
const (
	PathMembers   = "/v1/members"
	PathNodes     = "/v1/nodes"        // GET; /v1/nodes/NAME; POST /v1/nodes/NAME/eligibility, /v1/nodes/NAME/drain
	PathWorkloads = "/v1/workloads"    // GET, POST; /v1/workloads/ID[/stop|/logs]
	PathReport    = "/v1/agent/report" // POST by node agents
	// PathIndex: GET by node agents: the leader's applied index once a
	// barrier has passed (Index), what a replica must reach to be current.
	PathIndex = "/v1/agent/index"
	// PathMigrations: GET (?all=1: ended ones too), POST (plan);
	// /v1/migrations/ID; POST /v1/migrations/ID/step by node agents; POST
	// /v1/migrations/ID/transfer?attempt=N from the source agent to the
	// target's, which answers 101 and takes the connection for the stream.
	PathMigrations = "/v1/migrations"
	// PathBalance: GET the balancer's status, POST its mode.
	PathBalance = "/v1/balance"
	PathMetrics = "/metrics"
)

// Workload lists are paginated: GET /v1/workloads?per_page=N&next_token=T
// answers at most N workloads (default DefaultPerPage, at most MaxPerPage)
// in creation order, and HeaderNextToken, when set, is the next_token of the
// following page.
const (
	DefaultPerPage  = 100
	MaxPerPage      = 1000
	HeaderNextToken = "X-Pcluster-Next-Token"
)

// Load is a node's compact load vector.
type Load struct {
	CPULoad1  float64 `json:"cpu_load1"`
	NumCPU    int     `json:"num_cpu"`
	MemUsed   uint64  `json:"mem_used"`
	MemFree   uint64  `json:"mem_free"`
	Workloads int     `json:"workloads"`
	// What the node's workloads use, measured per workload by its agent:
	// CPU time per second in milli-cores, and memory in bytes.
	WorkloadCPUMilli uint32 `json:"workload_cpu_milli"`
	WorkloadRSS      uint64 `json:"workload_rss"`
}

// Member is a node as gossip and raft see it from the answering node.
type Member struct {
	Name     string `json:"name"`
	Addr     string `json:"addr"` // gossip address
	APIAddr  string `json:"api_addr"`
	RaftAddr string `json:"raft_addr"`
	Status   string `json:"status"` // alive, suspect, dead, left
	Role     string `json:"role"`   // leader, voter, nonvoter, none
	Load     Load   `json:"load"`
}

// Node is a node as the replicated state records it.
type Node struct {
	Name       string            `json:"name"`
	GossipAddr string            `json:"gossip_addr"`
	RaftAddr   string            `json:"raft_addr"`
	APIAddr    string            `json:"api_addr"`
	Labels     map[string]string `json:"labels,omitempty"`
	Status     string            `json:"status"` // ready, draining, down
	Eligible   bool              `json:"eligible"`
	Load       Load              `json:"load"`
	LoadAt     time.Time         `json:"load_at"`
	StatusAt   time.Time         `json:"status_at"`
	Workloads  int               `json:"workloads"` // active workloads placed here
	Drain      *NodeDrain        `json:"drain,omitempty"`
}

// NodeDrain is a node's drain, in progress or the last completed, with its
// progress counted from the migrations out of the node since it started.
type NodeDrain struct {
	StartedAt      time.Time `json:"started_at"`
	Deadline       time.Time `json:"deadline,omitzero"` // zero with no_deadline
	NoDeadline     bool      `json:"no_deadline,omitempty"`
	Force          bool      `json:"force,omitempty"`
	MaxParallel    int       `json:"max_parallel"`
	KeepIneligible bool      `json:"keep_ineligible,omitempty"`
	CompletedAt    time.Time `json:"completed_at,omitzero"`
	Moved          int       `json:"moved"`            // migrations done
	InFlight       int       `json:"in_flight"`        // migrations planned, transferring or committed
	Remaining      int       `json:"remaining"`        // active workloads still placed on the node
	Failed         []string  `json:"failed,omitempty"` // "ID: reason" of each aborted migration
	// Stuck: "ID: reason" of each workload still on the node that the
	// drain no longer tries to move (its moves failed every attempt).
	Stuck []string `json:"stuck,omitempty"`
	// Restarted: "ID on NODE" of each workload the drain restarted from
	// its command on another node instead (its restart policy allowed).
	Restarted []string `json:"restarted,omitempty"`
}

// DrainRequest starts, updates or cancels a node's drain (POST
// /v1/nodes/NAME/drain). Deadline is relative to the leader's clock, in
// nanoseconds; 0 means the default (1 h) unless NoDeadline or Force.
// MaxParallel 0 means 1. Disable cancels the drain in progress.
type DrainRequest struct {
	Deadline       time.Duration `json:"deadline,omitempty"`
	NoDeadline     bool          `json:"no_deadline,omitempty"`
	Force          bool          `json:"force,omitempty"`
	MaxParallel    int           `json:"max_parallel,omitempty"`
	KeepIneligible bool          `json:"keep_ineligible,omitempty"`
	Disable        bool          `json:"disable,omitempty"`
}

// EligibilityRequest sets whether placement may pick a node (POST
// /v1/nodes/NAME/eligibility). Eligible is required.
type EligibilityRequest struct {
	Eligible *bool `json:"eligible"`
}

// RunRequest asks for a new workload.
type RunRequest struct {
	Name        string            `json:"name,omitempty"`
	Command     string            `json:"command"`
	Args        []string          `json:"args,omitempty"`
	Env         []string          `json:"env,omitempty"`
	Cwd         string            `json:"cwd,omitempty"`
	UID         *int64            `json:"uid,omitempty"`   // 0..4294967294
	GID         *int64            `json:"gid,omitempty"`   // 0..4294967294
	User        string            `json:"user,omitempty"`  // a user name, resolved on the node that runs it
	Group       string            `json:"group,omitempty"` // a group name, resolved on the node that runs it
	Labels      map[string]string `json:"labels,omitempty"`
	Constraints map[string]string `json:"constraints,omitempty"`
	VIP         string            `json:"vip,omitempty"`
	Node        string            `json:"node,omitempty"`
	Restart     string            `json:"restart,omitempty"` // never, on-failure, always
	MaxRestarts int               `json:"max_restarts,omitempty"`
	MemoryMB    uint64            `json:"memory_mb,omitempty"`
	CPUMilli    int               `json:"cpu_milli,omitempty"`
	// Migrate "never" keeps the balancer from moving the workload (drains
	// and operators still may); "" lets it.
	Migrate string `json:"migrate,omitempty"`
	// Fence: "freeze" or "off", what a node cut off from the majority
	// does with the workload; "": as its checkpoint policies say, else
	// freeze.
	Fence string `json:"fence,omitempty"`
}

// Workload is one supervised process.
type Workload struct {
	ID          string            `json:"id"`
	Name        string            `json:"name"`
	Command     string            `json:"command"`
	Args        []string          `json:"args,omitempty"`
	Env         []string          `json:"env,omitempty"`
	Cwd         string            `json:"cwd,omitempty"`
	UID         int               `json:"uid"` // -1: not given
	GID         int               `json:"gid"` // -1: not given
	User        string            `json:"user,omitempty"`
	Group       string            `json:"group,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Constraints map[string]string `json:"constraints,omitempty"`
	VIP         string            `json:"vip,omitempty"`
	MemoryMB    uint64            `json:"memory_mb,omitempty"`
	CPUMilli    int               `json:"cpu_milli,omitempty"`
	Restart     string            `json:"restart"`
	MaxRestarts int               `json:"max_restarts,omitempty"`
	Migrate     string            `json:"migrate,omitempty"`
	Fence       string            `json:"fence,omitempty"`
	Desired     string            `json:"desired"`
	DesiredNode string            `json:"desired_node"`
	Node        string            `json:"node"`
	State       string            `json:"state"`
	Attempt     int               `json:"attempt"`
	Restarts    int               `json:"restarts"`
	PID         int               `json:"pid,omitempty"`      // the program's, on its node
	NSPID       int               `json:"ns_pid,omitempty"`   // the program's in its PID namespace
	InitPID     int               `json:"init_pid,omitempty"` // the namespace's init, on its node
	ExitCode    int               `json:"exit_code"`
	Signal      string            `json:"signal,omitempty"`
	Message     string            `json:"message,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	StartedAt   time.Time         `json:"started_at,omitzero"`
	EndedAt     time.Time         `json:"ended_at,omitzero"`
	ModifyIndex uint64            `json:"modify_index"`
	// Failover says how the workload last came back after its node was
	// declared down; nil if it never did.
	Failover *Failover `json:"failover,omitempty"`
}

// Failover is a workload's last failover: restored from checkpoint
// Checkpoint (Age: the work rolled back, from the checkpoint to the loss
// of the node), or restarted from its command (Checkpoint 0).
type Failover struct {
	At         time.Time `json:"at"`
	From       string    `json:"from"`
	To         string    `json:"to"`
	Checkpoint uint64    `json:"checkpoint,omitempty"`
	Age        Duration  `json:"age"`
}

// Report kinds sent by node agents.
const (
	ReportStarted = "started"
	ReportExited  = "exited"
	// ReportLost: the attempt never ran here and has no process
	// (scheduler.WorkloadLostCmd); Message says why.
	ReportLost = "lost"
)

// Index is the leader's answer on PathIndex.
type Index struct {
	Index uint64 `json:"index"`
}

// Report is a node agent telling the leader about one of its workloads.
type Report struct {
	Kind       string    `json:"kind"`
	ID         string    `json:"id"`
	Node       string    `json:"node"`
	Attempt    int       `json:"attempt"`
	PID        int       `json:"pid,omitempty"`
	StartTicks uint64    `json:"start_ticks,omitempty"`
	NSPID      int       `json:"ns_pid,omitempty"`
	InitPID    int       `json:"init_pid,omitempty"`
	ExitCode   int       `json:"exit_code"`
	Signal     string    `json:"signal,omitempty"`
	Message    string    `json:"message,omitempty"`
	At         time.Time `json:"at"`
}

// ErrorBody is the JSON body of every non-2xx answer.
type ErrorBody struct {
	Error string `json:"error"`
}

// MigrateRequest asks for a workload to move (POST /v1/migrations).
type MigrateRequest struct {
	Workload string `json:"workload"`       // ID or name
	Node     string `json:"node,omitempty"` // target; "" lets placement pick (never the current node)
	Reason   string `json:"reason,omitempty"`
}

// Migration is one move of a workload, as the replicated state records it.
type Migration struct {
	ID          string    `json:"id"`
	Workload    string    `json:"workload"`
	Name        string    `json:"name,omitempty"` // the workload's, if it is still in the state
	Source      string    `json:"source"`
	Target      string    `json:"target"`
	State       string    `json:"state"` // planned, transferring, committed, done, aborted
	Attempt     int       `json:"attempt"`
	Reason      string    `json:"reason,omitempty"`
	Origin      string    `json:"origin,omitempty"` // who planned it: operator, drain, balancer
	Error       string    `json:"error,omitempty"`
	PlannedAt   time.Time `json:"planned_at"`
	UpdatedAt   time.Time `json:"updated_at"`
	EndedAt     time.Time `json:"ended_at,omitzero"`
	ModifyIndex uint64    `json:"modify_index"`
	// TransferAt is when the source began the transfer. The process is
	// stopped from StoppedAt (a live migration: it ran on while Rounds
	// rounds sent PrecopyBytes of its memory), or without one from
	// TransferAt, until the done step (EndedAt). Bytes is the stream's
	// size.
	TransferAt   time.Time `json:"transfer_at,omitzero"`
	Bytes        int64     `json:"bytes,omitempty"`
	Rounds       int       `json:"rounds,omitempty"`
	PrecopyBytes int64     `json:"precopy_bytes,omitempty"`
	StoppedAt    time.Time `json:"stopped_at,omitzero"`
}

// Stopped returns how long a finished migration's process was stopped
// (0 while it is not done).
func (m Migration) Stopped() time.Duration {
	from := m.StoppedAt
	if from.IsZero() {
		from = m.TransferAt
	}
	if from.IsZero() || m.EndedAt.IsZero() || m.State != "done" {
		return 0
	}
	return m.EndedAt.Sub(from)
}

// MigrationStep is a node agent moving a migration forward (POST
// /v1/migrations/ID/step): To is transferring, committed, done or aborted.
type MigrationStep struct {
	ID         string `json:"id"`
	Attempt    int    `json:"attempt"`
	Node       string `json:"node"`
	To         string `json:"to"`
	Error      string `json:"error,omitempty"`
	PID        int    `json:"pid,omitempty"`
	StartTicks uint64 `json:"start_ticks,omitempty"`
	InitPID    int    `json:"init_pid,omitempty"`
	Bytes      int64  `json:"bytes,omitempty"` // with committed: the stream's size
	// With committed, of a live migration: its pre-copy rounds, their
	// bytes, and when the source stopped the process for the last.
	Rounds       int       `json:"rounds,omitempty"`
	PrecopyBytes int64     `json:"precopy_bytes,omitempty"`
	StoppedAt    time.Time `json:"stopped_at,omitzero"`
	At           time.Time `json:"at"`
}

// Balancer modes (BalanceRequest.Mode, BalanceStatus.Mode).
const (
	BalanceOff          = "off"
	BalanceConservative = "conservative"
	BalanceAggressive   = "aggressive"
)

// BalanceRequest sets the balancer's mode (POST /v1/balance).
type BalanceRequest struct {
	Mode string `json:"mode"`
}

// BalanceStatus is the balancer as the leader sees it (GET /v1/balance).
type BalanceStatus struct {
	Mode  string    `json:"mode"`
	SetAt time.Time `json:"set_at,omitzero"`
	// Threshold: how much busier than the least busy node a node must be
	// before anything moves from it; MinGain: the least a move must gain.
	// Both are shares of a node's CPUs, set by the mode (0 when off).
	Threshold float64       `json:"threshold"`
	MinGain   float64       `json:"min_gain"`
	Interval  time.Duration `json:"interval"` // between rounds
	Cooldown  time.Duration `json:"cooldown"` // before a moved workload may move again
	Leader    string        `json:"leader"`   // the node that answered and runs the balancer
	Rounds    int           `json:"rounds"`   // since it became the leader
	Moves     int           `json:"moves"`    // planned since it became the leader
	Nodes     []BalanceNode `json:"nodes"`    // the last round's view, busiest first
	// Decisions are the last rounds' outcomes, oldest first: moves, and
	// runs of rounds that moved nothing with the latest reason why.
	Decisions []BalanceDecision `json:"decisions"`
}

// BalanceNode is one node in the balancer's last round.
type BalanceNode struct {
	Name         string  `json:"name"`
	Load         float64 `json:"load"`          // CPU used by its workloads, a share of its CPUs
	CPUMilli     uint32  `json:"cpu_milli"`     // used by all its workloads
	MovableMilli uint32  `json:"movable_milli"` // used by the workloads the balancer may move
	RSS          uint64  `json:"rss"`
	Why          string  `json:"why,omitempty"` // why it takes part in no move
}

// Balance decision kinds.
const (
	BalanceMoved   = "moved"   // a migration was planned
	BalanceRefused = "refused" // planned, but the state had changed meanwhile
	BalanceHeld    = "held"    // nothing moved; Reason says why
)

// BalanceDecision is one outcome of the balancer.
type BalanceDecision struct {
	At        time.Time `json:"at"`
	Last      time.Time `json:"last,omitzero"` // held: the latest of Rounds rounds
	Rounds    int       `json:"rounds"`
	Kind      string    `json:"kind"`
	Workload  string    `json:"workload,omitempty"`
	Source    string    `json:"source,omitempty"`
	Target    string    `json:"target,omitempty"`
	Migration string    `json:"migration,omitempty"`
	Reason    string    `json:"reason"`
}

// Checkpoint paths. PathCheckpoints: GET /v1/checkpoints/ID (the
// workload's checkpoints), POST /v1/checkpoints/ID/now; POST
// /v1/checkpoints/ID/SEQ/copy from the node that took it to a node the
// leader chose, served by that node itself over the cluster's mutual TLS
// (the body is the file). PathCheckpointReport: POST by node agents.
// PathCheckpointPolicies: GET, POST; DELETE /v1/checkpoint-policies/NAME.
const (
	PathCheckpoints        = "/v1/checkpoints"
	PathCheckpointReport   = "/v1/agent/checkpoint"
	PathCheckpointPolicies = "/v1/checkpoint-policies"
)

// CheckpointPolicy is a checkpoint policy (docs/cluster.md, "Checkpoints").
type CheckpointPolicy struct {
	Name     string            `json:"name"`
	Selector map[string]string `json:"selector,omitempty"`
	Interval Duration          `json:"interval"`
	Keep     int               `json:"keep"`
	Replicas int               `json:"replicas"`
	Fence    string            `json:"fence,omitempty"` // "off": the workloads it applies to are not fenced
	// FullEvery: every FullEvery-th checkpoint is full, the others
	// incremental (0: the default, 8; 1: all full).
	FullEvery int `json:"full_every,omitempty"`
}

// Duration is a time.Duration that JSON carries as a string ("5m0s").
type Duration time.Duration

// MarshalJSON writes d as time.Duration's String.
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// UnmarshalJSON reads a time.ParseDuration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if len(b) < 2 || b[0] != '"' || b[len(b)-1] != '"' {
		return fmt.Errorf("duration %s: want a string such as \"5m\"", b)
	}
	v, err := time.ParseDuration(string(b[1 : len(b)-1]))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// Checkpoint is one checkpoint of a workload.
type Checkpoint struct {
	Workload string    `json:"workload"`
	Seq      uint64    `json:"seq"`
	Node     string    `json:"node"` // the node that took it
	Attempt  int       `json:"attempt"`
	At       time.Time `json:"at"`
	Size     int64     `json:"size"`
	Targets  []string  `json:"targets"` // the nodes chosen for its copies
	Holders  []string  `json:"holders"` // the nodes holding the file
	// Parent: the checkpoint an incremental one needs (0: full).
	Parent uint64 `json:"parent,omitempty"`
}

// WorkloadCheckpoints is a workload's checkpoints, oldest first, its
// policy, and the outcome of the latest tries.
type WorkloadCheckpoints struct {
	Workload    string       `json:"workload"`
	Policy      string       `json:"policy,omitempty"` // the policies that apply, comma-separated
	Checkpoints []Checkpoint `json:"checkpoints"`
	LastAt      time.Time    `json:"last_at,omitzero"`
	Failures    int          `json:"failures"` // consecutive, since the last success
	FailedTotal int          `json:"failed_total"`
	LastError   string       `json:"last_error,omitempty"`
	LastErrorAt time.Time    `json:"last_error_at,omitzero"`
}

// Checkpoint report kinds.
const (
	CheckpointTaken  = "taken"
	CheckpointFailed = "failed"
	CheckpointCopied = "copied"
)

// CheckpointReport is a node agent's report of a checkpoint: taken (the
// answer is the Checkpoint, with its sequence number and the nodes
// chosen for its copies), failed, or copied (by a target).
type CheckpointReport struct {
	Kind     string    `json:"kind"`
	Workload string    `json:"workload"`
	Node     string    `json:"node"`
	Attempt  int       `json:"attempt"`
	Seq      uint64    `json:"seq"`
	Size     int64     `json:"size"`
	NSPID    int       `json:"ns_pid,omitempty"` // taken: the program's PID in its namespace
	Parent   uint64    `json:"parent,omitempty"` // taken: the checkpoint an incremental one needs
	Error    string    `json:"error,omitempty"`
	At       time.Time `json:"at"`
}

// RestoreRequest rolls a workload back to a checkpoint (POST
// /v1/workloads/ID/restore): Checkpoint 0 is the newest; Node "" is the
// workload's node if it holds a copy, else the first ready holder.
type RestoreRequest struct {
	Checkpoint uint64 `json:"checkpoint,omitempty"`
	Node       string `json:"node,omitempty"`
}
