package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestBadTreeReaped restores damaged snapshots of the forkserver tree,
// damaged where every member's stub has been forked (at the end: the
// whole tree is built, then refused) and half-way: each must fail with
// one line, and when pthaw has exited nothing of that restore may exist
// anywhere, not even a zombie. The members' parents are other members,
// stubs stopped by pthaw, so the members are reaped only if pthaw sees to
// it; left to init, they stay zombies under PID 1 for as long as it
// pleases. The test is no subreaper: what pthaw leaves goes where it
// would go. pthaw runs in a session of its own, which every member
// inherits, so whatever remains of the restore is found by its session.
func TestBadTreeReaped(t *testing.T) {
	needRoot(t)
	p, _, good := forkserverSnapshot(t)
	hdr := bytes.IndexByte(good, '\n') + 1
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)-1] ^= 1
	cases := []struct {
		name string
		data []byte
	}{
		{"truncated before the end", good[:len(good)-1]},
		{"last byte flipped", flipped},
		{"truncated half-way", good[:hdr+(len(good)-hdr)/2]},
	}
	dir := t.TempDir()
	for _, flag := range []string{"", "-virtpid"} {
		for i, c := range cases {
			t.Run(strings.TrimPrefix(flag+" ", " ")+c.name, func(t *testing.T) {
				path := filepath.Join(dir, fmt.Sprintf("snap%s%d", flag, i))
				if err := os.WriteFile(path, c.data, 0o600); err != nil {
					t.Fatal(err)
				}
				args := []string{"-src", path}
				if flag != "" {
					args = append([]string{flag}, args...)
				}
				cmd := exec.Command(filepath.Join(binDir, "pthaw"), args...)
				cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				if err := cmd.Run(); err == nil {
					t.Fatalf("pthaw %v accepted a damaged snapshot", args)
				}
				if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "pthaw: ") {
					t.Errorf("stderr %q, want one line starting with \"pthaw: \"", msg)
				}
				for _, q := range inSession(cmd.Process.Pid) {
					t.Errorf("pid %d (%s, state %c, parent %d) of the failed restore left behind", q.pid, q.comm, q.state, q.ppid)
					unix.Kill(q.pid, unix.SIGKILL)
					if q.ppid == os.Getpid() {
						var ws unix.WaitStatus
						unix.Wait4(q.pid, &ws, 0, nil)
					}
				}
			})
		}
	}
	forkTick(t, p.Lines) // the original carries on
}

type procInfo struct {
	pid, ppid int
	state     byte
	comm      string
}

// inSession lists the processes, zombies included, of session sid.
func inSession(sid int) []procInfo {
	var out []procInfo
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		i, j := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
		if i < 0 || j < i {
			continue
		}
		f := strings.Fields(string(b[j+1:]))
		if len(f) < 4 || f[3] != strconv.Itoa(sid) {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		out = append(out, procInfo{pid: pid, ppid: ppid, state: f[0][0], comm: string(b[i+1 : j])})
	}
	return out
}
