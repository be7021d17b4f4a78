package scheduler

import (
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

// CommandType is the first byte of every raft log entry. The enum is
// append-only: a value, once released, keeps its meaning forever.
type CommandType uint8

// Command types. Never renumber; add new ones at the end.
const (
	CmdNodeUpsert             CommandType = 1
	CmdNodeStatus             CommandType = 2
	CmdNodeLoads              CommandType = 3
	CmdWorkloadCreate         CommandType = 4
	CmdWorkloadStarted        CommandType = 5
	CmdWorkloadExited         CommandType = 6
	CmdWorkloadStop           CommandType = 7
	CmdMigrationPlan          CommandType = 8 // was migration-upsert, never used by a release (see docs/cluster.md)
	CmdCheckpointPolicyUpsert CommandType = 9
	CmdNodeEligibility        CommandType = 10
	CmdWorkloadGC             CommandType = 11
	CmdMigrationStep          CommandType = 12
	CmdNodeDrain              CommandType = 13
	CmdNodeDrainDone          CommandType = 14
	CmdWorkloadReschedule     CommandType = 15
	CmdWorkloadLost           CommandType = 16
	// 17..19 are left to other branches in flight; the balancer's start at 20.
	CmdBalanceSet CommandType = 20
	// 17..29 are left to other work in flight (load balancing).
	CmdCheckpointPolicyDelete CommandType = 30
	CmdCheckpointTaken        CommandType = 31
	CmdCheckpointFailed       CommandType = 32
	CmdCheckpointCopied       CommandType = 33
	CmdCheckpointPrune        CommandType = 34
	CmdCheckpointRequest      CommandType = 35
	CmdWorkloadRestore        CommandType = 36
	CmdWorkloadFailover       CommandType = 37
	CmdCheckpointTarget       CommandType = 38
)

// SkippableFlag marks a command that an FSM which does not know its type may
// ignore (Nomad's IgnoreUnknownTypeFlag). Without the flag an unknown type
// stops the FSM: applying only part of the log would make this node's state
// differ from its peers'.
const SkippableFlag CommandType = 0x80

func (t CommandType) String() string {
	switch t &^ SkippableFlag {
	case CmdNodeUpsert:
		return "node-upsert"
	case CmdNodeStatus:
		return "node-status"
	case CmdNodeLoads:
		return "node-loads"
	case CmdWorkloadCreate:
		return "workload-create"
	case CmdWorkloadStarted:
		return "workload-started"
	case CmdWorkloadExited:
		return "workload-exited"
	case CmdWorkloadStop:
		return "workload-stop"
	case CmdMigrationPlan:
		return "migration-plan"
	case CmdCheckpointPolicyUpsert:
		return "checkpoint-policy-upsert"
	case CmdNodeEligibility:
		return "node-eligibility"
	case CmdWorkloadGC:
		return "workload-gc"
	case CmdMigrationStep:
		return "migration-step"
	case CmdNodeDrain:
		return "node-drain"
	case CmdNodeDrainDone:
		return "node-drain-done"
	case CmdWorkloadReschedule:
		return "workload-reschedule"
	case CmdWorkloadLost:
		return "workload-lost"
	case CmdBalanceSet:
		return "balance-set"
	case CmdCheckpointPolicyDelete:
		return "checkpoint-policy-delete"
	case CmdCheckpointTaken:
		return "checkpoint-taken"
	case CmdCheckpointFailed:
		return "checkpoint-failed"
	case CmdCheckpointCopied:
		return "checkpoint-copied"
	case CmdCheckpointPrune:
		return "checkpoint-prune"
	case CmdCheckpointRequest:
		return "checkpoint-request"
	case CmdWorkloadRestore:
		return "workload-restore"
	case CmdWorkloadFailover:
		return "workload-failover"
	case CmdCheckpointTarget:
		return "checkpoint-target"
	}
	return fmt.Sprintf("command-%d", uint8(t))
}

// NodeUpsertCmd registers a node or updates its addresses and labels. A node
// that was down becomes ready again.
type NodeUpsertCmd struct {
	Node Node  `msgpack:"node"`
	At   int64 `msgpack:"at"`
}

// NodeStatusCmd changes a node's status. Setting NodeDown marks every active
// workload on it lost.
type NodeStatusCmd struct {
	Name   string     `msgpack:"name"`
	Status NodeStatus `msgpack:"status"`
	At     int64      `msgpack:"at"`
}

// NodeEligibilityCmd sets whether placement may pick the node.
type NodeEligibilityCmd struct {
	Name     string `msgpack:"name"`
	Eligible bool   `msgpack:"eligible"`
}

// NodeLoadsCmd records the gossiped load of many nodes at once.
type NodeLoadsCmd struct {
	Loads map[string]Load `msgpack:"loads"`
	At    int64           `msgpack:"at"`
}

// WorkloadCreateCmd adds a workload already placed on DesiredNode.
type WorkloadCreateCmd struct {
	Workload Workload `msgpack:"workload"`
}

// WorkloadStartedCmd is reported by the node that started attempt Attempt.
type WorkloadStartedCmd struct {
	ID         string `msgpack:"id"`
	Node       string `msgpack:"node"`
	Attempt    int    `msgpack:"attempt"`
	PID        int    `msgpack:"pid"`
	StartTicks uint64 `msgpack:"start_ticks"`
	NSPID      int    `msgpack:"ns_pid"`
	InitPID    int    `msgpack:"init_pid"`
	At         int64  `msgpack:"at"`
}

// WorkloadExitedCmd is reported by the node whose attempt Attempt ended.
// ExitCode is -1 when the status is unknown (an adopted process).
type WorkloadExitedCmd struct {
	ID       string `msgpack:"id"`
	Node     string `msgpack:"node"`
	Attempt  int    `msgpack:"attempt"`
	ExitCode int    `msgpack:"exit_code"`
	Signal   string `msgpack:"signal"`
	Message  string `msgpack:"msg"`
	At       int64  `msgpack:"at"`
}

// WorkloadLostCmd is reported by the node where attempt Attempt was to run
// and never did: a migration's target whose agent died after the commit,
// before it started the restored process (its copy died with the agent).
// Its restart policy applies as for a failure; without a restart due the
// workload is lost, as when its node dies.
type WorkloadLostCmd struct {
	ID      string `msgpack:"id"`
	Node    string `msgpack:"node"`
	Attempt int    `msgpack:"attempt"`
	Message string `msgpack:"msg"`
	At      int64  `msgpack:"at"`
}

// WorkloadStopCmd asks for a workload to be stopped.
type WorkloadStopCmd struct {
	ID string `msgpack:"id"`
	At int64  `msgpack:"at"`
}

// WorkloadGCCmd removes ended workloads (at most MaxGCBatch ids) that
// ended at or before Before (unix nanoseconds); the leader sends it after
// the retention.
type WorkloadGCCmd struct {
	IDs    []string `msgpack:"ids"`
	Before int64    `msgpack:"before"`
}

// MigrationPlanCmd plans the move of a running workload from the node it
// runs on to Target (scheduler/fsm_migration.go has the rules). The FSM
// names the migration "m" + the entry's raft index and returns it.
type MigrationPlanCmd struct {
	WorkloadID string `msgpack:"workload"`
	Target     string `msgpack:"target"`
	Reason     string `msgpack:"reason"`
	// Origin is who planned it: OriginOperator, OriginDrain or
	// OriginBalancer ("" in entries written before the field existed).
	Origin string `msgpack:"origin,omitempty"`
	At     int64  `msgpack:"at"`
}

// MigrationStepCmd moves migration ID forward to state To. Attempt is the
// migration's attempt (the workload's when planned) and Node the node that
// writes the step ("" for the leader's own decisions, aborts only): a step
// from another attempt or another node is refused as stale. PID and
// StartTicks come with done: the target's process; Bytes with committed:
// the size of the stream the target received, and for a live migration
// Rounds, PrecopyBytes and StoppedAt, what the stream said of its
// pre-copy.
type MigrationStepCmd struct {
	ID         string         `msgpack:"id"`
	Attempt    int            `msgpack:"attempt"`
	Node       string         `msgpack:"node"`
	To         MigrationState `msgpack:"to"`
	Error      string         `msgpack:"error"`
	PID        int            `msgpack:"pid"`
	StartTicks uint64         `msgpack:"start_ticks"`
	InitPID    int            `msgpack:"init_pid"` // with done: the namespace's init on the target
	At         int64          `msgpack:"at"`
	Bytes      int64          `msgpack:"bytes"`
	// Rounds and PrecopyBytes: the pre-copy rounds sent while the
	// workload ran and their bytes; StoppedAt: when the source stopped it
	// for the last (0: stopped for the whole transfer, from TransferAt).
	Rounds       int   `msgpack:"rounds,omitempty"`
	PrecopyBytes int64 `msgpack:"precopy_bytes,omitempty"`
	StoppedAt    int64 `msgpack:"stopped_at,omitempty"`
}

// NodeDrainCmd starts (Drain set) or cancels (Drain nil) a node's drain.
// Starting makes the node ineligible in the same entry; cancelling makes it
// eligible again unless KeepIneligible (or the drain's own) says otherwise.
type NodeDrainCmd struct {
	Name           string     `msgpack:"name"`
	Drain          *DrainSpec `msgpack:"drain"`
	KeepIneligible bool       `msgpack:"keep_ineligible"`
	At             int64      `msgpack:"at"`
}

// NodeDrainDoneCmd marks the drain that started at StartedAt complete; the
// FSM refuses it while the node still has work.
type NodeDrainDoneCmd struct {
	Name      string `msgpack:"name"`
	StartedAt int64  `msgpack:"started_at"`
	At        int64  `msgpack:"at"`
}

// WorkloadRescheduleCmd restarts a running workload from its command on
// another node (a drain's answer to a workload the engine cannot move):
// its desired node becomes Node; its node's agent stops the process, and
// its exit report makes it pending there, attempt+1.
type WorkloadRescheduleCmd struct {
	ID     string `msgpack:"id"`
	Node   string `msgpack:"node"`
	Reason string `msgpack:"reason"`
	At     int64  `msgpack:"at"`
}

// BalanceSetCmd sets the balancer's mode (BalanceOff, BalanceConservative
// or BalanceAggressive).
type BalanceSetCmd struct {
	Mode string `msgpack:"mode"`
	At   int64  `msgpack:"at"`
}

// CheckpointPolicyUpsertCmd records a checkpoint policy.
type CheckpointPolicyUpsertCmd struct {
	Policy CheckpointPolicy `msgpack:"policy"`
}

// CheckpointPolicyDeleteCmd removes a checkpoint policy; the checkpoints
// already taken stay until their workload goes.
type CheckpointPolicyDeleteCmd struct {
	Name string `msgpack:"name"`
}

// CheckpointTakenCmd is reported by the node running attempt Attempt of
// the workload once its checkpoint file is written; Targets are the nodes
// the leader chose for its copies. The FSM gives it the next sequence
// number and returns the Checkpoint.
type CheckpointTakenCmd struct {
	WorkloadID string   `msgpack:"workload"`
	Node       string   `msgpack:"node"`
	Attempt    int      `msgpack:"attempt"`
	At         int64    `msgpack:"at"`
	Size       int64    `msgpack:"size"`
	Targets    []string `msgpack:"targets"`
	NSPID      int      `msgpack:"ns_pid"`
	// Parent: the checkpoint an incremental one refers to (0: full).
	Parent uint64 `msgpack:"parent,omitempty"`
}

// CheckpointFailedCmd is reported by the node running attempt Attempt of
// the workload when a checkpoint could not be taken (or kept).
type CheckpointFailedCmd struct {
	WorkloadID string `msgpack:"workload"`
	Node       string `msgpack:"node"`
	Attempt    int    `msgpack:"attempt"`
	Error      string `msgpack:"error"`
	At         int64  `msgpack:"at"`
}

// CheckpointCopiedCmd is reported by a target of checkpoint Seq once the
// copy is in its data directory.
type CheckpointCopiedCmd struct {
	WorkloadID string `msgpack:"workload"`
	Seq        uint64 `msgpack:"seq"`
	Node       string `msgpack:"node"`
}

// CheckpointPruneCmd forgets checkpoints of a workload (the leader's
// retention, scheduler.PlanCheckpointPrune); every holder deletes its
// file when its replica no longer lists it.
type CheckpointPruneCmd struct {
	WorkloadID string   `msgpack:"workload"`
	Seqs       []uint64 `msgpack:"seqs"`
}

// CheckpointRequestCmd asks for one checkpoint of a running workload now
// (`pclusterctl checkpoint now`).
type CheckpointRequestCmd struct {
	WorkloadID string `msgpack:"workload"`
	At         int64  `msgpack:"at"`
}

// WorkloadRestoreCmd rolls a workload back to checkpoint Seq, restored on
// Node, which must hold a copy: a running workload is stopped first (its
// exit makes it pending on Node); an ended or lost one is brought back.
type WorkloadRestoreCmd struct {
	ID   string `msgpack:"id"`
	Seq  uint64 `msgpack:"seq"`
	Node string `msgpack:"node"`
	At   int64  `msgpack:"at"`
	// Failover: the leader's failover of a lost workload (refused unless
	// it is lost), recorded in the workload's Failover.
	Failover bool `msgpack:"failover"`
}

// CheckpointTargetCmd adds Node to the nodes a checkpoint is copied to
// (a restore on a node that holds no copy yet); a holder pushes it there.
type CheckpointTargetCmd struct {
	WorkloadID string `msgpack:"workload"`
	Seq        uint64 `msgpack:"seq"`
	Node       string `msgpack:"node"`
}

// WorkloadFailoverCmd restarts a lost workload from its command on Node
// (the failover of a workload without a usable checkpoint), as its
// restart policy allows.
type WorkloadFailoverCmd struct {
	ID   string `msgpack:"id"`
	Node string `msgpack:"node"`
	At   int64  `msgpack:"at"`
}

// Command is one command a planner proposes: the leader encodes and
// applies it.
type Command struct {
	Type    CommandType
	Payload any
}

// Encode returns the log entry for a command: its type byte, then msgpack.
func Encode(t CommandType, payload any) ([]byte, error) {
	b, err := msgpack.Marshal(payload)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", t, err)
	}
	return append([]byte{byte(t)}, b...), nil
}
