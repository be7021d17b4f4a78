package node

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pcluster/pcluster/migrate/procfs"
	"github.com/pcluster/pcluster/scheduler"
)

// initAnswer bounds the wait for a new init's answer (it only forks and
// execs the workload).
const initAnswer = 30 * time.Second

// spawned is a workload started by spawn.
type spawned struct {
	pid     int // the program, on this host (0 if it ended at once)
	nsPid   int // the program, in its namespace
	initPid int // the namespace's init, our child
	ticks   uint64
}

// spawn starts workload w as a PID namespace of its own: our child is its
// init (init_linux.go, this same binary), in a new session, which starts
// the command (pid 6-8 or so there: the init's runtime threads come
// first), its output appended to its log files.
// A goroutine waits for the init and ends with it.
func (a *Agent) spawn(w scheduler.Workload) (spawned, error) {
	var s spawned
	outPath, _ := a.LogPath(w.ID, "stdout")
	errPath, _ := a.LogPath(w.ID, "stderr")
	if err := os.MkdirAll(filepath.Dir(outPath), 0o700); err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	a.clearStatus(w.ID)
	stdout, err := os.OpenFile(outPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	defer stdout.Close()
	stderr, err := os.OpenFile(errPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	defer stderr.Close()
	a.markLogStart(w.ID, w.Attempt, stdout, stderr)

	ids := []string{"PCLUSTER_WORKLOAD_ID=" + w.ID, "PCLUSTER_NODE=" + a.cfg.Name}
	env := []string{"PATH=" + DefaultPath}
	env = append(env, w.Env...)
	env = append(env, ids...)
	path := w.Command
	if !strings.Contains(path, "/") {
		p, err := lookPath(path, env)
		if err != nil {
			return s, fmt.Errorf("start %s: %w", w.ID, err)
		}
		path = p
	}
	cred, err := credential(w, a.cfg.Name)
	if err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	spec, err := json.Marshal(initSpec{Path: path, Args: append([]string{w.Command}, w.Args...), Env: env, Dir: w.Cwd, Cred: cred})
	if err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	specR, specW, err := os.Pipe()
	if err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	defer specR.Close()
	defer specW.Close()
	resR, resW, err := os.Pipe()
	if err != nil {
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	defer resR.Close()
	defer resW.Close()

	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{InitName, w.ID}
	cmd.Env = append(ids, initEnv...)
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.ExtraFiles = []*os.File{specR, resW} // fds 3 and 4
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: syscall.CLONE_NEWPID}
	if a.cg != nil {
		// The init, and so the whole namespace, is born in the workload's
		// own cgroup (clone3 CLONE_INTO_CGROUP): what holds it frozen
		// while it moves.
		cgf, err := a.cg.open(w.ID, w.Attempt)
		if err != nil {
			return s, fmt.Errorf("start %s: %w", w.ID, err)
		}
		defer cgf.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cgf.Fd())
	}
	if err := cmd.Start(); err != nil {
		return s, fmt.Errorf("start %s: init in a new pid namespace: %w", w.ID, err)
	}
	s.initPid = cmd.Process.Pid
	s.ticks, _ = startTicks(s.initPid)
	specR.Close()
	resW.Close()
	// The spec fits the pipe's buffer unless the environment is huge: the
	// write is bounded like the answer.
	specW.SetWriteDeadline(time.Now().Add(initAnswer))
	_, werr := specW.Write(spec)
	specW.Close()
	var res initResult
	resR.SetReadDeadline(time.Now().Add(initAnswer))
	derr := json.NewDecoder(resR).Decode(&res)
	if werr != nil || derr != nil || res.Error != "" || res.Pid <= 0 {
		cmd.Process.Kill()
		cmd.Wait()
		switch {
		case res.Error != "":
			err = fmt.Errorf("%s", res.Error)
		case werr != nil:
			err = fmt.Errorf("send the spec to its init: %w", werr)
		default:
			err = fmt.Errorf("no answer from its init (pid %d): %v", s.initPid, derr)
		}
		return s, fmt.Errorf("start %s: %w", w.ID, err)
	}
	s.nsPid = res.Pid
	s.pid = nsChild(s.initPid, s.nsPid)
	a.mu.Lock()
	a.procs[w.ID] = &proc{id: w.ID, attempt: w.Attempt, pid: s.initPid, pidns: true}
	a.mu.Unlock()
	// The waiter ends when the init does, not with Run: workloads outlive
	// the agent, and Run must not wait for them. It waits only once the
	// init has exited: a wait before would consume the stops of a
	// migration's freeze (waitExited says why).
	go func() {
		waitExited(s.initPid)
		err := cmd.Wait()
		ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
		if _, ok := err.(*exec.ExitError); ok {
			err = nil
		}
		ev := a.initExit(w.ID, w.Attempt, ws, err)
		// If Run has ended the exit is not reported; the next agent on
		// this node finds the process gone and says so.
		select {
		case a.exits <- ev:
		case <-a.done:
		}
	}()
	return s, nil
}

// initExit makes the exit event of a workload whose init, our child,
// ended with ws: the workload's own status from the init's status file,
// else the init's (killed by SIGKILL, say, with its namespace).
func (a *Agent) initExit(wid string, attempt int, ws syscall.WaitStatus, err error) exitEvent {
	ev := exitOf(wid, attempt, ws, err)
	if code, sig, ok := a.readStatus(wid); ok {
		ev.code, ev.signal, ev.msg = code, sig, ""
	}
	return ev
}

// nsChild returns our PID of the child of initPid (ours) that is nsPid in
// its namespace, or 0 when there is none (it ended already).
func nsChild(initPid, nsPid int) int {
	kids, _ := procfs.Children(initPid)
	for _, pid := range kids {
		st, err := procfs.Status(pid)
		if err != nil {
			continue
		}
		if ids, err := procfs.NSIDs(st, "NSpid"); err == nil && ids[len(ids)-1] == nsPid {
			return pid
		}
	}
	return 0
}

// isNSInit reports whether pid is the init (PID 1) of a PID namespace of
// its own.
func isNSInit(pid int) bool {
	st, err := procfs.Status(pid)
	if err != nil {
		return false
	}
	ids, err := procfs.NSIDs(st, "NSpid")
	return err == nil && len(ids) > 1 && ids[len(ids)-1] == 1
}
