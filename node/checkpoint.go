package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/cluster/api"
	"github.com/pcluster/pcluster/loader"
	"github.com/pcluster/pcluster/migrate/capture"
	"github.com/pcluster/pcluster/migrate/stream"
	"github.com/pcluster/pcluster/scheduler"
)

// The agent's half of checkpoint policies (docs/cluster.md,
// "Checkpoints"): the agent running a workload takes a leave-running
// checkpoint of its PID namespace whenever the state says one is due
// (scheduler.CheckpointDue), keeps the file in its own data directory,
// encrypted under a key derived from the cluster key, reports it through
// the leader (which gives it a sequence number and the nodes for its
// copies) and pushes a copy to each of those nodes over the cluster's
// mutual TLS. Every agent deletes the files its replica no longer lists.

// CheckpointKeyName is the key name checkpoint files carry on their header.
const CheckpointKeyName = "pcluster-checkpoint"

// checkpointIO bounds one checkpoint report or copy.
const checkpointIO = 2 * time.Minute

// errDiskReserve marks a checkpoint refused for the disk reserve.
var errDiskReserve = errors.New("disk reserve")

// CheckpointDir is where a node keeps its checkpoint files.
func (a *Agent) CheckpointDir() string { return filepath.Join(a.cfg.DataDir, "checkpoints") }

// CheckpointPath is the file of checkpoint seq of workload id here.
func (a *Agent) CheckpointPath(id string, seq uint64) (string, error) {
	if err := scheduler.CheckWorkloadID(id); err != nil {
		return "", fmt.Errorf("checkpoint path: %w", err)
	}
	return filepath.Join(a.CheckpointDir(), scheduler.CheckpointFile(id, seq)), nil
}

func (a *Agent) checkpointKey() *stream.Key {
	return &stream.Key{Name: CheckpointKeyName, Bytes: a.cfg.CheckpointKey}
}

// ckptBusy reports whether a checkpoint of workload id is under way here.
func (a *Agent) ckptBusy(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ckpting[id]
}

// checkpoints starts the checkpoints due now (Run only, from reconcile)
// and deletes the files the state no longer lists.
func (a *Agent) checkpoints(ctx context.Context, now time.Time) {
	if a.cfg.Checkpoint == nil || len(a.cfg.CheckpointKey) == 0 {
		return
	}
	type job struct {
		w     scheduler.Workload
		pid   int
		pidns bool
	}
	var jobs []job
	a.cfg.FSM.Read(func(s *scheduler.State) {
		for id, p := range a.procs {
			w, ok := s.Workloads[id]
			if !ok || p.stopping || w.Node != a.cfg.Name || w.Attempt != p.attempt || a.ckptBusy(id) ||
				s.ActiveMigration(id) != nil {
				continue
			}
			if due, _ := scheduler.CheckpointDue(s, w, now); due {
				jobs = append(jobs, job{*w, p.pid, p.pidns})
			}
		}
	})
	for _, j := range jobs {
		a.mu.Lock()
		a.ckpting[j.w.ID] = true
		a.mu.Unlock()
		a.outWG.Add(1)
		go func() { // ends with the checkpoint and its copies; Run waits for it
			defer a.outWG.Done()
			defer func() {
				a.mu.Lock()
				delete(a.ckpting, j.w.ID)
				a.mu.Unlock()
			}()
			a.checkpoint(ctx, j.w, j.pid, j.pidns)
		}()
	}
	if now.Sub(a.ckptSwept) >= 2*time.Second {
		a.ckptSwept = now
		a.sweepCheckpoints()
		a.repairCopies(ctx, now)
	}
}

// repairCopies pushes the checkpoints this node holds to their targets
// that do not hold them yet: a copy that failed, or a target added for a
// restore there. A copy is pushed again at most every 5 s while the state
// does not show it held (Run only: ckptPushAt is Run's).
func (a *Agent) repairCopies(ctx context.Context, now time.Time) {
	type push struct {
		cp     api.Checkpoint
		target string
	}
	var todo []push
	a.cfg.FSM.Read(func(s *scheduler.State) {
		for id, r := range s.Checkpoints {
			if a.ckptBusy(id) {
				continue
			}
			for _, c := range r.List {
				if !c.Held(a.cfg.Name) {
					continue
				}
				for _, t := range c.Targets {
					key := fmt.Sprintf("%s/%d/%s", id, c.Seq, t)
					if c.Held(t) || now.Before(a.ckptPushAt[key]) {
						continue
					}
					a.ckptPushAt[key] = now.Add(5 * time.Second)
					todo = append(todo, push{api.Checkpoint{Workload: id, Seq: c.Seq}, t})
				}
			}
		}
	})
	for key, at := range a.ckptPushAt {
		if now.Sub(at) > time.Minute {
			delete(a.ckptPushAt, key)
		}
	}
	for _, p := range todo {
		path, err := a.CheckpointPath(p.cp.Workload, p.cp.Seq)
		if err != nil {
			continue
		}
		if _, err := os.Stat(path); err != nil {
			continue // not here yet (the taker renames it once recorded)
		}
		a.outWG.Add(1)
		go func() { // ends with the push; Run waits for it
			defer a.outWG.Done()
			if err := a.pushCheckpoint(ctx, p.target, p.cp, path); err != nil {
				a.log.Info("checkpoint copy failed; will retry", "workload", p.cp.Workload, "seq", p.cp.Seq, "target", p.target, "err", err)
			}
		}()
	}
}

// checkpoint takes one checkpoint of w (pid: its namespace's init, or the
// workload itself), reports it, and pushes its copies. A failure is
// reported (the state retries it after a backoff and lists it).
func (a *Agent) checkpoint(ctx context.Context, w scheduler.Workload, pid int, pidns bool) {
	log := a.log.With("workload", w.ID, "attempt", w.Attempt)
	at := time.Now()
	tmp := filepath.Join(a.CheckpointDir(), ".taking-"+w.ID)
	// The fence never freezes a process under capture (the engine's
	// injected calls would wait on a frozen task), nor is a fenced one
	// captured (node/fence.go).
	a.mu.Lock()
	_, fenced := a.fenced[w.ID]
	if !fenced {
		a.capturing[w.ID] = true
	}
	a.mu.Unlock()
	if fenced {
		log.Info("checkpoint not taken: the workload is fenced")
		return
	}
	size, parent, err := a.writeCheckpoint(ctx, w, pid, pidns, tmp)
	a.mu.Lock()
	delete(a.capturing, w.ID)
	a.mu.Unlock()
	if err != nil {
		os.Remove(tmp)
		log.Warn("checkpoint failed", "err", err)
		a.ckptFailures.Add(1)
		_, rerr := a.reportCheckpoint(ctx, api.CheckpointReport{Kind: api.CheckpointFailed, Workload: w.ID, Attempt: w.Attempt,
			Error: err.Error(), At: time.Now()})
		if rerr != nil {
			log.Info("checkpoint failure not recorded", "err", rerr)
		}
		return
	}
	nsPid := 0
	if pidns {
		nsPid = w.NSPID
	}
	cp, err := a.reportCheckpoint(ctx, api.CheckpointReport{Kind: api.CheckpointTaken, Workload: w.ID, Attempt: w.Attempt,
		Size: size, NSPID: nsPid, Parent: parent, At: at})
	if err != nil {
		os.Remove(tmp)
		log.Info("checkpoint not recorded; file removed", "err", err)
		return
	}
	final, err := a.CheckpointPath(w.ID, cp.Seq)
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		os.Remove(tmp)
		log.Warn("checkpoint recorded but its file is lost", "seq", cp.Seq, "err", err)
		return
	}
	log.Info("checkpoint taken", "seq", cp.Seq, "parent", parent, "bytes", size, "took", time.Since(at).Round(time.Millisecond), "copies_to", cp.Targets)
	if len(cp.Targets) == 0 {
		return
	}
	// A target checks the copy against its replica, which must have come
	// as far as ours (the request names our index): ours must list it.
	if err := a.awaitCheckpoint(ctx, w.ID, cp.Seq); err != nil {
		log.Warn("checkpoint not copied", "seq", cp.Seq, "err", err)
		return
	}
	// A copy elsewhere makes the workload one a failover can restore
	// there: the fence watchdog's lease must list it first.
	var idx uint64
	a.cfg.FSM.Read(func(s *scheduler.State) { idx = s.Index })
	a.awaitLease(idx)
	for _, t := range cp.Targets {
		if err := a.pushCheckpoint(ctx, t, cp, final); err != nil {
			log.Warn("checkpoint copy failed", "seq", cp.Seq, "target", t, "err", err)
		}
	}
}

// writeCheckpoint freezes w's process (its whole namespace) without
// halting it into the file tmp, once the disk reserve allows it, and
// returns the file's size and, for an incremental checkpoint, the
// checkpoint it refers to (checkpointParent).
func (a *Agent) writeCheckpoint(ctx context.Context, w scheduler.Workload, pid int, pidns bool, tmp string) (int64, uint64, error) {
	dir := a.CheckpointDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, 0, fmt.Errorf("checkpoint of %s: %w", w.ID, err)
	}
	if err := a.checkReserve(w, pid, dir); err != nil {
		return 0, 0, err
	}
	seq, parent := a.checkpointParent(w, pidns)
	os.Remove(tmp)
	sink, err := stream.OpenSink(tmp, stream.SinkOptions{WriteTimeout: transferIO})
	if err != nil {
		return 0, 0, fmt.Errorf("checkpoint of %s: %w", w.ID, err)
	}
	err = capture.SendTo(ctx, a.tracer(), pid, sink, capture.SendOptions{Tree: pidns,
		Codec: stream.Codec{Name: stream.CompressAuto}, Cipher: stream.CipherAESGCM, Key: a.checkpointKey(), Parent: parent})
	if err != nil {
		return 0, 0, fmt.Errorf("checkpoint of %s (pid %d): %w", w.ID, pid, err)
	}
	fi, err := os.Stat(tmp)
	if err != nil {
		return 0, 0, fmt.Errorf("checkpoint of %s: %w", w.ID, err)
	}
	return fi.Size(), seq, nil
}

// checkpointParent picks the parent of w's next checkpoint: the last one,
// if this node took it of the same attempt (and the same kind, namespace
// or process) and holds it and every one it needs, and a full one is not
// due (EffectivePolicy's FullEvery). It reads the parent's page digests
// from its file (cheap for an incremental one: its own pages only). 0 and
// nil: the checkpoint is full.
func (a *Agent) checkpointParent(w scheduler.Workload, pidns bool) (uint64, *capture.Parent) {
	var seq uint64
	a.cfg.FSM.Read(func(s *scheduler.State) {
		r := s.Checkpoints[w.ID]
		if r == nil || len(r.List) == 0 {
			return
		}
		last := r.List[len(r.List)-1]
		p, _ := scheduler.EffectivePolicy(s, &w)
		chain := r.Chain(last.Seq)
		if last.Node != a.cfg.Name || last.Attempt != w.Attempt || (last.NSPID > 0) != pidns ||
			len(chain) == 0 || len(chain) >= p.FullEvery || !r.ChainHeld(last.Seq, a.cfg.Name) {
			return
		}
		seq = last.Seq
	})
	if seq == 0 {
		return 0, nil
	}
	path, err := a.CheckpointPath(w.ID, seq)
	if err != nil {
		return 0, nil
	}
	p, err := capture.OpenParent(path, []stream.Key{*a.checkpointKey()})
	if err != nil {
		a.log.Warn("checkpoint parent unreadable: taking a full checkpoint", "workload", w.ID, "parent", seq, "err", err)
		return 0, nil
	}
	return seq, p
}

// checkReserve refuses a checkpoint that could leave less than the
// configured reserve free on dir's filesystem. Its size is guessed as the
// largest earlier checkpoint of the workload, else the resident memory of
// its processes (compression only makes it smaller).
func (a *Agent) checkReserve(w scheduler.Workload, pid int, dir string) error {
	if a.cfg.CheckpointReserve == 0 {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("checkpoint of %s: free space of %s: %w", w.ID, dir, err)
	}
	free := st.Bavail * uint64(st.Bsize)
	var need int64
	a.cfg.FSM.Read(func(s *scheduler.State) {
		if r := s.Checkpoints[w.ID]; r != nil {
			for _, c := range r.List {
				need = max(need, c.Size)
			}
		}
	})
	if need == 0 {
		need = rss(pid)
		if w.PID > 0 && w.PID != pid {
			need += rss(w.PID)
		}
	}
	if free < a.cfg.CheckpointReserve+uint64(need) {
		return fmt.Errorf("checkpoint of %s refused: %w: %s free on %s, the checkpoint needs about %s and %s must stay free",
			w.ID, errDiskReserve, mib(int64(free)), dir, mib(need), mib(int64(a.cfg.CheckpointReserve)))
	}
	return nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// rss returns the resident bytes of pid, 0 if unknown.
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// reportCheckpoint delivers a report through the leader, retrying while
// the cluster cannot answer; a refusal (4xx) is returned as is.
func (a *Agent) reportCheckpoint(ctx context.Context, r api.CheckpointReport) (api.Checkpoint, error) {
	r.Node = a.cfg.Name
	ctx, cancel := context.WithTimeout(ctx, checkpointIO)
	defer cancel()
	for {
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		cp, err := a.cfg.Checkpoint(rctx, r)
		rcancel()
		var ae *api.Error
		if err == nil || errors.As(err, &ae) && ae.Status >= 400 && ae.Status < 500 {
			return cp, err
		}
		select {
		case <-ctx.Done():
			return cp, fmt.Errorf("checkpoint report %s of %s: %w (last: %v)", r.Kind, r.Workload, context.Cause(ctx), err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// awaitCheckpoint returns once this node's replica lists checkpoint seq
// of workload id.
func (a *Agent) awaitCheckpoint(ctx context.Context, id string, seq uint64) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		changed := a.cfg.FSM.Changed()
		found := false
		a.cfg.FSM.Read(func(s *scheduler.State) {
			if r := s.Checkpoints[id]; r != nil {
				found = r.Find(seq) != nil || r.Seq >= seq
			}
		})
		if found {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("checkpoint %d of %s: not in this node's replica: %w", seq, id, context.Cause(ctx))
		}
	}
}

// pushCheckpoint sends the file of cp to node target.
func (a *Agent) pushCheckpoint(ctx context.Context, target string, cp api.Checkpoint, path string) error {
	if a.cfg.PushCheckpoint == nil {
		return errors.New("no way to reach other nodes")
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("checkpoint %d of %s: %w", cp.Seq, cp.Workload, err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(ctx, checkpointIO)
	defer cancel()
	return a.cfg.PushCheckpoint(ctx, target, cp, f)
}

// CheckIncomingCheckpoint says whether this node takes a copy of
// checkpoint seq of workload id: its replica must list it with this node
// among the targets chosen by the leader.
func (a *Agent) CheckIncomingCheckpoint(id string, seq uint64) error {
	_, err := a.incomingCheckpoint(id, seq)
	return err
}

// incomingCheckpoint is CheckIncomingCheckpoint, returning the size the
// state records for the file.
func (a *Agent) incomingCheckpoint(id string, seq uint64) (int64, error) {
	var err error
	var size int64
	a.cfg.FSM.Read(func(s *scheduler.State) {
		r := s.Checkpoints[id]
		var cp *scheduler.Checkpoint
		if r != nil {
			cp = r.Find(seq)
		}
		switch {
		case cp == nil:
			err = fmt.Errorf("checkpoint %d of workload %s: %w", seq, id, scheduler.ErrNotFound)
		case !strings.Contains(","+strings.Join(cp.Targets, ",")+",", ","+a.cfg.Name+","):
			err = fmt.Errorf("checkpoint %d of workload %s goes to %v, not to this node (%s): %w", seq, id, cp.Targets, a.cfg.Name, scheduler.ErrRefused)
		default:
			size = cp.Size
		}
	})
	return size, err
}

// ReceiveCheckpoint stores the copy of checkpoint seq of workload id read
// from r (a mutual-TLS request from the node that took it): it is written
// under a temporary name, verified (every chunk authenticated under the
// checkpoint key, to the end), then named and reported.
func (a *Agent) ReceiveCheckpoint(ctx context.Context, id string, seq uint64, r io.Reader) error {
	size, err := a.incomingCheckpoint(id, seq)
	if err != nil {
		return err
	}
	final, err := a.CheckpointPath(id, seq)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(a.CheckpointDir(), 0o700); err != nil {
		return fmt.Errorf("checkpoint %d of %s: %w", seq, id, err)
	}
	f, err := os.CreateTemp(a.CheckpointDir(), ".copy-"+id+"-*")
	if err != nil {
		return fmt.Errorf("checkpoint %d of %s: %w", seq, id, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	// Exactly the size the state records: no peer fills this disk.
	n, err := io.Copy(f, io.LimitReader(r, size+1))
	if err == nil && n != size {
		err = fmt.Errorf("%d bytes received, the state records %d", n, size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = a.verifyCheckpoint(tmp)
	}
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		return fmt.Errorf("checkpoint %d of %s: copy: %w", seq, id, err)
	}
	if _, err := a.reportCheckpoint(ctx, api.CheckpointReport{Kind: api.CheckpointCopied, Workload: id, Seq: seq, At: time.Now()}); err != nil {
		os.Remove(final)
		return fmt.Errorf("checkpoint %d of %s: copy not recorded: %w", seq, id, err)
	}
	a.log.Info("checkpoint copy stored", "workload", id, "seq", seq)
	return nil
}

// verifyCheckpoint reads a checkpoint file to its end through the
// stream's authentication under the checkpoint key.
func (a *Agent) verifyCheckpoint(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	body, _, err := stream.NewReader(f, stream.ReaderOptions{Keys: []stream.Key{*a.checkpointKey()}, RequireEncryption: true})
	if err != nil {
		return err
	}
	defer body.Close()
	_, err = io.Copy(io.Discard, body)
	return err
}

// sweepCheckpoints deletes the checkpoint files of this node that the
// state no longer lists (pruned by the retention, or their workload
// collected), and the unfinished files an earlier agent left.
func (a *Agent) sweepCheckpoints() {
	ents, err := os.ReadDir(a.CheckpointDir())
	if err != nil {
		return
	}
	keep := map[string]bool{}
	a.cfg.FSM.Read(func(s *scheduler.State) {
		for id, r := range s.Checkpoints {
			for _, c := range r.List {
				keep[scheduler.CheckpointFile(id, c.Seq)] = true
			}
		}
	})
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			// An unfinished copy or checkpoint: an earlier agent's if
			// older than this one, else one under way (a copy being
			// received creates the directory, and so comes before the
			// first sweep that reads it).
			if info, err := e.Info(); err == nil && info.ModTime().Before(a.born) {
				os.Remove(filepath.Join(a.CheckpointDir(), name))
			}
			continue
		}
		if !strings.HasSuffix(name, ".ckpt") || keep[name] {
			continue
		}
		if err := os.Remove(filepath.Join(a.CheckpointDir(), name)); err == nil {
			a.log.Info("checkpoint file deleted: no longer in the state", "file", name)
		}
	}
}

// restore starts attempt w.Attempt of w here from its checkpoint
// w.Restore.Seq (Run only, for a pending workload the state restores):
// the target side of a migration, reading the file in this node's data
// directory. A failure leaves no half-built process and is reported as
// the attempt's end.
func (a *Agent) restore(ctx context.Context, w scheduler.Workload) {
	a.started[w.ID] = w.Attempt
	log := a.log.With("workload", w.ID, "attempt", w.Attempt, "checkpoint", w.Restore.Seq)
	pid, watched, initPid, err := a.buildFromCheckpoint(ctx, w, log)
	if err != nil {
		log.Warn("restore from checkpoint failed", "err", err)
		now := time.Now()
		a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, At: now})
		a.queue(api.Report{Kind: api.ReportExited, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, ExitCode: -1,
			Message: scheduler.CutMessage(err.Error()), At: now})
		return
	}
	a.arrived(arrival{wid: w.ID, attempt: w.Attempt, pid: watched, pidns: initPid > 0})
	ticks, _ := startTicks(watched)
	log.Info("workload restored from its checkpoint", "pid", pid, "init", initPid)
	a.queue(api.Report{Kind: api.ReportStarted, ID: w.ID, Node: a.cfg.Name, Attempt: w.Attempt, PID: pid, StartTicks: ticks,
		NSPID: w.Restore.NSPID, InitPID: initPid, At: time.Now()})
}

// buildFromCheckpoint builds and starts the process of w's checkpoint:
// pid is the program, watched our child (its namespace's init, initPid,
// when the checkpoint holds a namespace).
func (a *Agent) buildFromCheckpoint(ctx context.Context, w scheduler.Workload, log interface{ Info(string, ...any) }) (pid, watched, initPid int, err error) {
	path, err := a.CheckpointPath(w.ID, w.Restore.Seq)
	if err != nil {
		return 0, 0, 0, err
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("checkpoint %d of %s: %w", w.Restore.Seq, w.ID, err)
	}
	defer f.Close()
	stdio, err := a.logFiles(w.ID)
	if err != nil {
		return 0, 0, 0, err
	}
	defer func() {
		for _, f := range stdio {
			f.Close()
		}
	}()
	body, h, err := stream.NewReader(f, stream.ReaderOptions{Keys: []stream.Key{*a.checkpointKey()}, RequireEncryption: true})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("checkpoint %d of %s: %w", w.Restore.Seq, w.ID, err)
	}
	defer body.Close()
	dec := loader.NewDecoder(body, h)
	// An incremental checkpoint reads the ones it needs, from this
	// node's files only.
	var chain []string
	a.cfg.FSM.Read(func(s *scheduler.State) {
		if r := s.Checkpoints[w.ID]; r != nil {
			for _, c := range r.Chain(w.Restore.Seq) {
				if p, err := a.CheckpointPath(w.ID, c.Seq); err == nil && c.Seq != w.Restore.Seq {
					chain = append(chain, p)
				}
			}
		}
	})
	defer loader.FollowParents(dec, chain, []stream.Key{*a.checkpointKey()}).Close()
	pidns := w.Restore.NSPID > 0
	p, err := loader.Build(ctx, a.tracer(), dec, loader.Options{Detach: true, Stdio: stdio, StdioFiles: true,
		PIDNamespace: pidns, Notice: func(s string) { log.Info("restore: " + s) }})
	if err == nil {
		if err = dec.ExpectEOF(); err != nil {
			p.Abort()
		}
	}
	if err != nil {
		return 0, 0, 0, fmt.Errorf("checkpoint %d of %s: %w", w.Restore.Seq, w.ID, err)
	}
	if a.cg != nil {
		if err := a.cg.place(w.ID, w.Attempt, p.Pids()...); err != nil {
			a.log.Warn("restored process left outside its cgroup", "workload", w.ID, "err", err)
		}
	}
	if w.VIP != "" {
		if err := a.vips.add(w.ID, w.VIP); err != nil {
			a.log.Warn("virtual IP not added before the start", "workload", w.ID, "err", err)
		}
	}
	a.clearStatus(w.ID)
	if err := p.Start(); err != nil {
		return 0, 0, 0, fmt.Errorf("checkpoint %d of %s: restored process did not start: %w", w.Restore.Seq, w.ID, err)
	}
	pid, watched = p.Pid(), p.WaitPid()
	if pidns {
		initPid = watched
		if pid = nsChild(initPid, w.Restore.NSPID); pid == 0 {
			pid = initPid // ended already: its end is on its way
		}
	}
	return pid, watched, initPid, nil
}

// CheckpointFailures counts the checkpoints this agent failed to take.
func (a *Agent) CheckpointFailures() int64 { return a.ckptFailures.Load() }
