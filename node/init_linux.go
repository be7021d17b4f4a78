package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// A workload's init. Every workload runs as a PID namespace of its own
// (spawn_linux.go): its first process, pid 1 there, is pclusterd itself
// started again as InitName, and the workload's command is its child. The
// namespace is what a migration moves (a tree freeze of the init, restored
// into a new PID namespace on the target), so the workload and every
// process of its tree keep the PIDs they saw at their start, whatever PIDs
// the target host uses. The init:
//
//   - reads the workload's spec (command, environment, directory,
//     credentials) from fd 3, starts the command as its child in a
//     process group of its own with the init's fds 0-2 (the log files),
//     and answers on fd 4 with the child's PID in the namespace or why it
//     could not start it; fds 3 and 4 are then closed, so that nothing of
//     the agent stays in the namespace;
//   - forwards the signals an operator's stop sends (SIGTERM, SIGINT,
//     SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH) to the workload's
//     process group (SIGKILL needs no forwarding: it ends the namespace);
//   - reaps every orphan that the kernel hands it, as a namespace's init
//     must;
//   - when the workload ends, writes its status ("exit N" or "signal N")
//     to the file "status" beside its stdout log and exits with the shell's
//     code for it (N, or 128+N for signal N), which ends the namespace. The
//     file tells the agent what the code cannot (an exit(143) from a
//     SIGTERM) and tells it at all when the init is not its child (an
//     agent restarted meanwhile adopted the workload). Its stdout being
//     the current node's log file (a restore points fds 0-2 at the
//     target's), the file is written where the workload runs now.
//
// The init is a Go program: the engine freezes its threads like any
// others. GOMAXPROCS=1 keeps them few, and GODEBUG turns off the runtime's
// cgroup-aware GOMAXPROCS updates, which would keep a cgroup file open
// that a restore on another host could not reopen.

// InitName is argv[0] of a workload's init: pclusterd started so is the
// init (IsInit).
const InitName = "pcluster-init"

// initEnv is the init's own environment besides the workload's identity.
var initEnv = []string{"GOMAXPROCS=1", "GODEBUG=updatemaxprocs=0,containermaxprocs=0"}

// initSignals are forwarded to the workload.
var initSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT,
	syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH}

// initSpec is what the init starts, sent by the agent on fd 3.
type initSpec struct {
	Path string   `json:"path"`
	Args []string `json:"args"`
	Env  []string `json:"env"`
	Dir  string   `json:"dir,omitempty"`
	// Cred, when set, are the workload's credentials (the init stays
	// root: it must be able to signal and reap whatever the workload
	// becomes).
	Cred *syscall.Credential `json:"cred,omitempty"`
}

// initResult is the init's answer on fd 4.
type initResult struct {
	Pid   int    `json:"pid,omitempty"` // the workload's PID in the namespace
	Error string `json:"error,omitempty"`
}

// statusFile is the name, beside the workload's stdout log, of the file
// the init writes the workload's end to.
const statusFile = "status"

// IsInit reports whether this process was started as a workload's init.
func IsInit() bool { return len(os.Args) > 0 && os.Args[0] == InitName }

// InitMain runs a workload's init and returns its exit code.
func InitMain() int {
	// The agent's pipe ends come non-blocking (os.Pipe's): made blocking,
	// they need no poller, whose epoll and eventfd would stay open in the
	// namespace.
	// Close-on-exec: the answer is written after the workload's exec,
	// which must not inherit it.
	for _, fd := range []int{3, 4} {
		syscall.SetNonblock(fd, false)
		syscall.CloseOnExec(fd)
	}
	specIn, resOut := os.NewFile(3, "spec"), os.NewFile(4, "result")
	var spec initSpec
	err := json.NewDecoder(specIn).Decode(&spec)
	specIn.Close()
	answer := func(r initResult) {
		json.NewEncoder(resOut).Encode(r)
		resOut.Close()
	}
	if err != nil {
		answer(initResult{Error: fmt.Sprintf("workload spec: %v", err)})
		return 127
	}
	// Caught before the fork: a stop that comes at once is not lost.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, initSignals...)
	pid, err := syscall.ForkExec(spec.Path, spec.Args, &syscall.ProcAttr{
		Dir: spec.Dir, Env: spec.Env, Files: []uintptr{0, 1, 2},
		Sys: &syscall.SysProcAttr{Setpgid: true, Credential: spec.Cred},
	})
	if err != nil {
		answer(initResult{Error: fmt.Sprintf("start %s: %v", spec.Path, err)})
		return 127
	}
	answer(initResult{Pid: pid})
	go func() {
		for s := range sigs {
			sig := s.(syscall.Signal)
			// The workload's process group, as a shell's job control
			// would; the workload itself if it left the group.
			if err := syscall.Kill(-pid, sig); errors.Is(err, syscall.ESRCH) {
				syscall.Kill(pid, sig)
			}
		}
	}()
	for {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			// No child left: cannot happen while the workload runs.
			return 127
		}
		if got != pid || (!ws.Exited() && !ws.Signaled()) {
			continue // an orphan reaped
		}
		code, status := ws.ExitStatus(), "exit "+strconv.Itoa(ws.ExitStatus())
		if ws.Signaled() {
			code, status = 128+int(ws.Signal()), "signal "+strconv.Itoa(int(ws.Signal()))
		}
		writeStatus(status)
		return code
	}
}

// writeStatus writes the workload's end beside its stdout log (the
// current node's: the file fd 1 is).
func writeStatus(status string) {
	out, err := os.Readlink("/proc/self/fd/1")
	if err != nil || !filepath.IsAbs(out) {
		return
	}
	path := filepath.Join(filepath.Dir(out), statusFile)
	tmp := path + ".tmp"
	if os.WriteFile(tmp, []byte(status+"\n"), 0o600) == nil {
		os.Rename(tmp, path)
	}
}

// readStatus reads the status an init wrote for workload wid: ok is false
// when there is none (the init was killed, or never ran). The file stays
// until Run has taken the exit (exited): a waiter of an agent whose Run
// has ended must leave it for the next agent.
func (a *Agent) readStatus(wid string) (code int, sig string, ok bool) {
	out, err := a.LogPath(wid, "stdout")
	if err != nil {
		return 0, "", false
	}
	path := filepath.Join(filepath.Dir(out), statusFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, "", false
	}
	kind, num, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
	n, err := strconv.Atoi(num)
	if err != nil || n < 0 || n > 255 {
		return 0, "", false
	}
	switch kind {
	case "exit":
		return n, "", true
	case "signal":
		return 128 + n, syscall.Signal(n).String(), true
	}
	return 0, "", false
}

// clearStatus removes the status of workload wid once its exit is taken,
// and any left by an earlier attempt on this node before a new init
// starts.
func (a *Agent) clearStatus(wid string) {
	if out, err := a.LogPath(wid, "stdout"); err == nil {
		os.Remove(filepath.Join(filepath.Dir(out), statusFile))
	}
}
