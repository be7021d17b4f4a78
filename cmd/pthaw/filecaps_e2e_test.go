package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcluster/pcluster/internal/fixture"
)

// The setcap lines README and docs/pfreeze.md give an ordinary user, and
// that these tests give the copies of the binaries they run as one.
const (
	pfreezeCaps     = "cap_checkpoint_restore+ep"
	pfreezeYamaCaps = "cap_sys_ptrace,cap_checkpoint_restore+ep" // Yama ptrace_scope 1
	pthawCaps       = "cap_checkpoint_restore+ep"
	pthawPIDNSCaps  = "cap_sys_admin,cap_checkpoint_restore+ep" // -pidns
)

// The ordinary user the tests run pfreeze and pthaw as, and another one.
const (
	userID  = 1000
	otherID = 1001
)

// capTools skips the test without setcap and setpriv and returns setpriv.
func capTools(t *testing.T) string {
	t.Helper()
	needRoot(t)
	_, err1 := exec.LookPath("setcap")
	setpriv, err2 := exec.LookPath("setpriv")
	if err1 != nil || err2 != nil {
		t.Skip("setcap (libcap2-bin) or setpriv (util-linux) not installed")
	}
	return setpriv
}

// userDir returns a temporary directory every user may reach and write.
func userDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o777)
	return dir
}

// capBinary copies binDir's program name into a directory of its own under
// dir and gives the copy caps with setcap; caps "" leaves it without.
func capBinary(t *testing.T, dir, name, caps string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(binDir, name))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := os.MkdirTemp(dir, name+"-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(sub, 0o755)
	path := filepath.Join(sub, name)
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if caps != "" {
		if out, err := exec.Command("setcap", caps, path).CombinedOutput(); err != nil {
			t.Skipf("setcap %s: %v: %s", caps, err, out)
		}
	}
	return path
}

// as returns setpriv's arguments to run a program as uid and gid with no
// supplementary groups.
func as(uid, gid int) []string {
	return []string{"--reuid", strconv.Itoa(uid), "--regid", strconv.Itoa(gid), "--clear-groups"}
}

// fixtureAs builds the fixture program name where every user may run it.
func fixtureAs(t *testing.T, name string) string {
	t.Helper()
	bin := fixture.Build(t, name)
	os.Chmod(filepath.Dir(bin), 0o755)
	return bin
}

// runAs runs a program with setpriv's arguments user and returns its
// stderr and whether it exited 0 (runAsOut).
func runAs(t *testing.T, setpriv string, user []string, args ...string) (string, bool) {
	t.Helper()
	_, stderr, ok := runAsOut(t, setpriv, user, args...)
	return stderr, ok
}

// runAsOut runs a program with setpriv's arguments user and returns its
// stdout, its stderr and whether it exited 0. They are files, not pipes:
// a process it wrongly restored and left running would hold a pipe open.
// A program still running after waitFor (a pfreeze waiting for a receiver
// it should never have contacted) is killed: it failed.
func runAsOut(t *testing.T, setpriv string, user []string, args ...string) (string, string, bool) {
	t.Helper()
	tmp := t.TempDir()
	var files [2]*os.File
	for i := range files {
		f, err := os.CreateTemp(tmp, "out")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[i] = f
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	cmd := exec.CommandContext(ctx, setpriv, append(user, args...)...)
	cmd.Stdout, cmd.Stderr = files[0], files[1]
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	var out [2]string
	for i, f := range files {
		b, rerr := os.ReadFile(f.Name())
		if rerr != nil {
			t.Fatal(rerr)
		}
		out[i] = string(b)
	}
	return out[0], out[1], err == nil
}

// oneLine fails the test unless stderr is exactly one line matching rx.
func oneLine(t *testing.T, what, stderr, rx string) {
	t.Helper()
	if !regexp.MustCompile(rx).MatchString(stderr) || strings.Count(stderr, "\n") != 1 || !strings.HasSuffix(stderr, "\n") {
		t.Errorf("%s: stderr %q, want one line matching %q", what, stderr, rx)
	}
}

// capsOf returns the credential lines of pid's /proc status.
func capsOf(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// wantUserCreds fails the test unless pid runs as the ordinary user with
// no capability in any set and no supplementary group.
func wantUserCreds(t *testing.T, what string, pid int) {
	t.Helper()
	st := capsOf(t, pid)
	ids := fmt.Sprintf("%d\t%d\t%d\t%d", userID, userID, userID, userID)
	want := map[string]string{"Uid": ids, "Gid": ids, "Groups": "",
		"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000", "CapAmb": "0000000000000000"}
	for k, v := range want {
		if st[k] != v {
			t.Errorf("%s (pid %d): %s %q, want %q", what, pid, k, st[k], v)
		}
	}
}

// TestFileCapabilities runs pfreeze and pthaw as an ordinary user, with
// only the capabilities the documented setcap lines give them, on that
// user's own process: it moves with its PID, and comes back with the
// user's credentials and no capability (pthaw's are not passed on).
// Without capabilities pfreeze says in one line what it needs.
func TestFileCapabilities(t *testing.T) {
	setpriv := capTools(t)
	dir := userDir(t)
	pfreeze := capBinary(t, dir, "pfreeze", pfreezeCaps)
	pthaw := capBinary(t, dir, "pthaw", pthawCaps)
	user := as(userID, userID)
	bin := fixtureAs(t, "countforever")

	p := fixture.Start(t, setpriv, append(user, bin, "10")...)
	p.Lines.Expect(t, `^2$`, waitFor)

	// Without capabilities: one line naming the one it lacks.
	stderr, ok := runAs(t, setpriv, user, capBinary(t, dir, "pfreeze", ""), "-pid", strconv.Itoa(p.Pid()), "-dest", filepath.Join(dir, "nocaps"))
	if ok {
		t.Fatal("pfreeze without capabilities froze a process")
	}
	oneLine(t, "pfreeze without capabilities", stderr, `needs CAP_CHECKPOINT_RESTORE`)

	// The line for a host with Yama's ptrace_scope 1 works as well.
	yama := capBinary(t, dir, "pfreeze", pfreezeYamaCaps)
	if stderr, ok := runAs(t, setpriv, user, yama, "-pid", strconv.Itoa(p.Pid()), "-dest", filepath.Join(dir, "checkpoint")); !ok {
		t.Fatalf("pfreeze (%s) on the user's process: %s", pfreezeYamaCaps, stderr)
	}
	// -virtpid (the PID is taken: the original runs) needs a seccomp
	// filter that only CAP_SYS_ADMIN in the process could load: one line.
	stdout, stderr, ok := runAsOut(t, setpriv, user, pthaw, "-virtpid", "-src", filepath.Join(dir, "checkpoint"))
	if ok {
		t.Errorf("pthaw -virtpid as an ordinary user restored the process: %s", stdout)
	}
	oneLine(t, "pthaw -virtpid", stderr, `install seccomp filter: .* needs CAP_SYS_ADMIN\)\n$`)

	snap := filepath.Join(dir, "snap")
	if stderr, ok := runAs(t, setpriv, user, pfreeze, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap); !ok {
		t.Fatalf("pfreeze (%s) on the user's process: %s", pfreezeCaps, stderr)
	}
	<-p.Exited()
	f, err := os.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	th := startThawCmd(t, &thawed{cmd: exec.Command(setpriv, append(user, pthaw)...)}, f)
	th.out.Expect(t, `^\d+$`, waitFor)
	pid := th.restoredPid(t)
	if pid != p.Pid() {
		t.Errorf("restored pid %d, want %d: %s", pid, p.Pid(), th.stderr.String())
	}
	wantUserCreds(t, "restored process", pid)
}

// TestFileCapabilitiesPIDNamespace restores a user's process with -pidns
// by a pthaw given CAP_SYS_ADMIN too: neither the process nor the init
// left behind in the namespace keeps any of pthaw's capabilities. Without
// CAP_SYS_ADMIN pthaw says in one line that it needs it.
func TestFileCapabilitiesPIDNamespace(t *testing.T) {
	setpriv := capTools(t)
	dir := userDir(t)
	user := as(userID, userID)
	p := fixture.Start(t, setpriv, append(user, fixtureAs(t, "countforever"), "10")...)
	p.Lines.Expect(t, `^2$`, waitFor)
	snap := filepath.Join(dir, "snap")
	if stderr, ok := runAs(t, setpriv, user, capBinary(t, dir, "pfreeze", pfreezeCaps), "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap); !ok {
		t.Fatalf("pfreeze: %s", stderr)
	}
	<-p.Exited()
	// Without CAP_SYS_ADMIN: one line saying so.
	stderr, ok := runAs(t, setpriv, user, capBinary(t, dir, "pthaw", pthawCaps), "-pidns", "-detach", "-src", snap)
	if ok {
		fixture.KillAtCleanup(t, p.Pid())
		t.Fatal("pthaw -pidns without CAP_SYS_ADMIN restored the process")
	}
	oneLine(t, "pthaw -pidns without CAP_SYS_ADMIN", stderr, `needs CAP_SYS_ADMIN`)
	f, err := os.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	pthaw := capBinary(t, dir, "pthaw", pthawPIDNSCaps)
	th := startThawCmd(t, &thawed{cmd: exec.Command(setpriv, append(user, pthaw, "-pidns")...)}, f)
	th.out.Expect(t, `^\d+$`, waitFor)
	init := th.restoredPid(t)
	kids, err := fixture.Children(init)
	if err != nil || len(kids) != 1 {
		t.Fatalf("init %d of the new namespace has children %v (%v), want the restored process: %s", init, kids, err, th.stderr.String())
	}
	wantUserCreds(t, "init of the new PID namespace", init)
	wantUserCreds(t, "restored process", kids[0])
}

// waitInEpoll waits until pid (the epollwait fixture) sleeps in
// epoll_wait, where any stop and resume makes it print EINTR.
func waitInEpoll(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
		if f := strings.Fields(string(b)); len(f) > 0 && (f[0] == "232" || f[0] == "281") {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("pid %d does not wait in epoll_wait", pid)
}

// TestFileCapabilitiesRefuseFreeze runs pfreeze as an ordinary user, with
// each documented setcap line, on processes that user may not trace: the
// kernel's own rule for a caller without CAP_SYS_PTRACE (same real,
// effective and saved uids and gids, dumpable, no capability the user
// lacks) decides, before anything is seized. Each is refused in one line
// naming the pid and why, and is never even stopped: it sleeps in
// epoll_wait, which any stop would interrupt, and then answers as before.
func TestFileCapabilitiesRefuseFreeze(t *testing.T) {
	setpriv := capTools(t)
	dir := userDir(t)
	bin := fixtureAs(t, "epollwait")
	type target struct {
		name string
		argv []string // how to start epollwait
		want string   // the refusal, %d the pid
	}
	targets := []target{
		{"root's process", []string{bin}, `pid %d runs as uid 0/0/0/0 `},
		{"another user's process", append(as(otherID, otherID), bin), fmt.Sprintf(`pid %%d runs as uid %d/%d/%d/%d `, otherID, otherID, otherID, otherID)},
		{"the user's process in another group", append(as(userID, otherID), bin), fmt.Sprintf(`pid %%d runs as gid %d/%d/%d/%d `, otherID, otherID, otherID, otherID)},
		{"the user's process with a capability",
			append(as(userID, userID), "--inh-caps", "+checkpoint_restore", "--ambient-caps", "+checkpoint_restore", bin), `pid %d holds capabilities 0x10000000000`},
		{"the user's process not dumpable", append(as(userID, userID), bin, "nodump"), `pid %d is not dumpable`},
	}
	var procs []*fixture.Proc
	for _, tg := range targets {
		argv := tg.argv
		if argv[0] != bin {
			argv = append([]string{setpriv}, argv...)
		}
		p := fixture.Start(t, argv[0], argv[1:]...)
		p.Lines.Expect(t, `^ready$`, waitFor)
		waitInEpoll(t, p.Pid())
		procs = append(procs, p)
	}
	// A receiver nobody may connect to: a refusal comes before the sink.
	sock := filepath.Join(dir, "sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	os.Chmod(sock, 0o777)
	user := as(userID, userID)
	for _, caps := range []string{pfreezeCaps, pfreezeYamaCaps} {
		pfreeze := capBinary(t, dir, "pfreeze", caps)
		for i, tg := range targets {
			pid := strconv.Itoa(procs[i].Pid())
			for _, args := range [][]string{{"-pid", pid, "-halt", "-dest", filepath.Join(dir, "snap")}, {"-tree", "-pid", pid, "-dest", filepath.Join(dir, "snap")},
				{"-pid", pid, "-halt", "-dest", "unix:" + sock}} {
				stderr, ok := runAs(t, setpriv, user, append([]string{pfreeze}, args...)...)
				what := fmt.Sprintf("pfreeze (%s) %v on %s", caps, args, tg.name)
				if ok {
					t.Errorf("%s: froze it", what)
					continue
				}
				oneLine(t, what, stderr, `^pfreeze: freeze \d+: `+fmt.Sprintf(tg.want, procs[i].Pid()))
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "snap")); err == nil {
		t.Errorf("a refused pfreeze left its snapshot")
	}
	// A connection made would be queued by now: pfreeze has exited.
	ln.(*net.UnixListener).SetDeadline(time.Now())
	if c, err := ln.Accept(); err == nil {
		c.Close()
		t.Errorf("a refused pfreeze connected to its receiver")
	}
	for i, tg := range targets {
		p := procs[i]
		p.WriteLine("probe")
		line, err := p.Lines.Next(waitFor)
		if err != nil || line != "got 1: probe" {
			t.Errorf("%s (pid %d) said %q (%v) after the refusals, want %q: it was stopped", tg.name, p.Pid(), line, err, "got 1: probe")
		}
	}
}

// TestFileCapabilitiesRefuseThaw gives pthaw, run as an ordinary user with
// the documented capabilities, snapshots (made by root) of processes
// whose credentials are not that user's: root's, another user's, the
// user's with another group, with a supplementary group the user is not
// in, or with a capability; and a process without no_new_privs to a pthaw
// running with it. Each is refused in one line before anything is built:
// no process has the saved PID.
func TestFileCapabilitiesRefuseThaw(t *testing.T) {
	setpriv := capTools(t)
	dir := userDir(t)
	bin := fixtureAs(t, "countforever")
	pthaw := capBinary(t, dir, "pthaw", pthawCaps)
	snaps := []struct {
		name string
		argv []string // how to start countforever, after setpriv
		want string   // the refusal, %d the saved pid
		nnp  bool     // pthaw runs with no_new_privs
	}{
		{"root's process", []string{"--clear-groups"}, `process %d was uid 0/0/0/0 `, false},
		{"another user's process", as(otherID, otherID), fmt.Sprintf(`process %%d was uid %d/%d/%d/%d `, otherID, otherID, otherID, otherID), false},
		{"the user's process in another group", as(userID, otherID), fmt.Sprintf(`process %%d was gid %d/%d/%d/%d `, otherID, otherID, otherID, otherID), false},
		{"the user's process with another supplementary group",
			[]string{"--reuid", strconv.Itoa(userID), "--regid", strconv.Itoa(userID), "--groups", strconv.Itoa(otherID)}, fmt.Sprintf(`process %%d was in group %d,`, otherID), false},
		{"the user's process with a capability",
			append(as(userID, userID), "--inh-caps", "+checkpoint_restore", "--ambient-caps", "+checkpoint_restore"), `process %d held effective capabilities 0x10000000000:`, false},
		{"the user's process without no_new_privs, by a pthaw with it", as(userID, userID), `process %d did not have no_new_privs, which uid 1000 running pthaw has`, true},
	}
	for i, s := range snaps {
		p := fixture.Start(t, setpriv, append(s.argv, bin, "10")...)
		p.Lines.Expect(t, `^2$`, waitFor)
		snap := filepath.Join(dir, fmt.Sprintf("snap%d", i))
		freeze(t, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap)
		<-p.Exited()
		os.Chmod(snap, 0o644)
		user := as(userID, userID)
		if s.nnp {
			user = append(user, "--no-new-privs")
		}
		stdout, stderr, ok := runAsOut(t, setpriv, user, pthaw, "-detach", "-src", snap)
		if ok {
			if pid, err := strconv.Atoi(strings.TrimSpace(stdout)); err == nil {
				fixture.KillAtCleanup(t, pid)
			}
			t.Errorf("pthaw restored %s: %s", s.name, stderr)
			continue
		}
		oneLine(t, "pthaw on "+s.name, stderr, `^pthaw: thaw: `+fmt.Sprintf(s.want, p.Pid()))
		if fixture.Alive(p.Pid()) {
			fixture.KillAtCleanup(t, p.Pid())
			t.Errorf("pid %d exists after pthaw refused %s", p.Pid(), s.name)
		}
	}
}

// TestFileCapabilitiesRlimit restores, as an ordinary user, a process of
// that user whose hard limit on open files is above the user's (pthaw's)
// own, with a pthaw given CAP_SYS_RESOURCE as well: the limit is lowered
// to the user's, not raised by pthaw's capability, and pthaw says so. It
// needs CAP_SYS_RESOURCE in the bounding set, or the file capability is
// void and nothing is tested.
func TestFileCapabilitiesRlimit(t *testing.T) {
	setpriv := capTools(t)
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("prlimit (util-linux) not installed")
	}
	const capSysResource = 24
	if bnd, _ := strconv.ParseUint(capsOf(t, os.Getpid())["CapBnd"], 16, 64); bnd&(1<<capSysResource) == 0 {
		t.Skip("CAP_SYS_RESOURCE is not in the bounding set: a file capability cannot give it (exec fails)")
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Max < 2048 {
		t.Skipf("hard limit on open files %d (%v): too low to lower", lim.Max, err)
	}
	low := strconv.FormatUint(lim.Max/2, 10)
	dir := userDir(t)
	user := as(userID, userID)
	p := fixture.Start(t, setpriv, append(user, fixtureAs(t, "countforever"), "10")...)
	p.Lines.Expect(t, `^2$`, waitFor)
	snap := filepath.Join(dir, "snap")
	if stderr, ok := runAs(t, setpriv, user, capBinary(t, dir, "pfreeze", pfreezeCaps), "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap); !ok {
		t.Fatalf("pfreeze: %s", stderr)
	}
	<-p.Exited()
	f, err := os.Open(snap)
	if err != nil {
		t.Fatal(err)
	}
	pthaw := capBinary(t, dir, "pthaw", "cap_sys_resource,cap_checkpoint_restore+ep")
	th := startThawCmd(t, &thawed{cmd: exec.Command(prlimit, append([]string{"--nofile=" + low + ":" + low, setpriv}, append(user, pthaw)...)...)}, f)
	th.out.Expect(t, `^\d+$`, waitFor)
	pid := th.restoredPid(t)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^Max open files\s+(\d+)\s+(\d+)`).FindStringSubmatch(string(b))
	if m == nil || m[2] != low {
		t.Errorf("restored process's open files limits %q, want hard %s (the user's): %s", m, low, b)
	}
	th.said(t, fmt.Sprintf(`hard limit %d lowered to %s`, lim.Max, low))
	wantUserCreds(t, "restored process", pid)
}

// TestFileCapabilitiesRefuseTree freezes and thaws, as an ordinary user, a
// tree whose root is the user's but whose child is root's (as when the
// user runs a set-uid program): pfreeze -tree refuses it in one line
// naming the child, leaving the tree running, and pthaw refuses root's
// snapshot of it at the child's record, leaving no process behind.
func TestFileCapabilitiesRefuseTree(t *testing.T) {
	setpriv := capTools(t)
	dir := userDir(t)
	user := as(userID, userID)
	script := `"$0" 1000 >/dev/null & exec "$1" --reuid ` + strconv.Itoa(userID) + ` --regid ` + strconv.Itoa(userID) + ` --clear-groups "$0" 10`
	p := fixture.StartGroup(t, "/bin/sh", "-c", script, fixtureAs(t, "countforever"), setpriv)
	p.Lines.Expect(t, `^2$`, waitFor)
	kids, err := fixture.Children(p.Pid())
	if err != nil || len(kids) != 1 {
		t.Fatalf("children of %d: %v (%v), want one", p.Pid(), kids, err)
	}
	child := kids[0]
	if uid := capsOf(t, child)["Uid"]; uid != "0\t0\t0\t0" {
		t.Fatalf("child %d runs as uid %q, want root", child, uid)
	}

	pfreeze := capBinary(t, dir, "pfreeze", pfreezeYamaCaps)
	stderr, ok := runAs(t, setpriv, user, pfreeze, "-tree", "-halt", "-pid", strconv.Itoa(p.Pid()), "-dest", filepath.Join(dir, "refused"))
	if ok {
		t.Fatal("pfreeze -tree froze a tree holding root's process")
	}
	oneLine(t, "pfreeze -tree", stderr, fmt.Sprintf(`^pfreeze: freeze %d: pid %d runs as uid 0/0/0/0 `, p.Pid(), child))
	// The user's own process was stopped and resumed: it counts on.
	p.Lines.Drain()
	p.Lines.Expect(t, `^\d+$`, waitFor)
	if !fixture.Alive(child) {
		t.Fatalf("root's child %d is gone after the refusal", child)
	}

	snap := filepath.Join(dir, "snap")
	freeze(t, "-tree", "-halt", "-pid", strconv.Itoa(p.Pid()), "-dest", snap)
	<-p.Exited()
	os.Chmod(snap, 0o644)
	stderr, ok = runAs(t, setpriv, user, capBinary(t, dir, "pthaw", pthawCaps), "-detach", "-src", snap)
	for _, pid := range []int{p.Pid(), child} {
		if fixture.Alive(pid) {
			fixture.KillAtCleanup(t, pid)
			t.Errorf("pid %d exists after pthaw's refusal", pid)
		}
	}
	if ok {
		t.Fatal("pthaw restored a tree holding root's process")
	}
	oneLine(t, "pthaw", stderr, fmt.Sprintf(`^pthaw: thaw: pid %d: process %d was uid 0/0/0/0 `, child, child))
}

// TestFileCapabilitiesMemfd moves an ordinary user's process holding a
// sealed memfd, a mapped-only memfd and a deleted file (fixture memfds)
// by pfreeze and pthaw run as that user with the documented capabilities:
// nothing in it is root's, so it comes back whole, its files the user's
// with their modes. A user's process that holds a memfd root made (handed
// to it across setuid and exec) comes back too: the copy is a file
// nobody else holds, made by and given to the user, with its mode and
// contents.
func TestFileCapabilitiesMemfd(t *testing.T) {
	setpriv := capTools(t)
	dir := userDir(t)
	pfreeze := capBinary(t, dir, "pfreeze", pfreezeCaps)
	pthaw := capBinary(t, dir, "pthaw", pthawCaps)
	user := as(userID, userID)
	moved := func(t *testing.T, p *fixture.Proc) *thawed {
		t.Helper()
		snap := filepath.Join(dir, t.Name()[strings.LastIndex(t.Name(), "/")+1:])
		if stderr, ok := runAs(t, setpriv, user, pfreeze, "-pid", strconv.Itoa(p.Pid()), "-halt", "-dest", snap); !ok {
			t.Fatalf("pfreeze (%s) on the user's process: %s", pfreezeCaps, stderr)
		}
		<-p.Exited()
		th := thawCmd(t, exec.Command(setpriv, append(user, pthaw, "-src", snap)...))
		if pid := th.restoredPid(t); pid != p.Pid() {
			t.Errorf("restored pid %d, want %d", pid, p.Pid())
		}
		wantUserCreds(t, "restored process", p.Pid())
		return th
	}

	t.Run("own", func(t *testing.T) {
		p := fixture.Start(t, setpriv, append(user, fixtureAs(t, "memfds"), dir)...)
		p.Lines.Expect(t, `^ready$`, waitFor)
		th := moved(t, p)
		fmt.Fprintln(th.stdin, "check")
		th.out.Expect(t, `^memfd link=/memfd:pcluster-memfd \(deleted\) seals=6 size=12288 grow=EPERM head=hello memfd shared=yes mode=642$`, waitFor)
		th.out.Expect(t, `^maponly only in the map$`, waitFor)
		th.out.Expect(t, fmt.Sprintf(`^deleted data=deleted contents shared=yes private=Deleted contents owner=%d:%d mode=640$`, userID, userID), waitFor)
	})

	t.Run("roots", func(t *testing.T) {
		// fd 7: a memfd of root's that others may read (the user's
		// pfreeze reads it), with contents; then the user's credentials
		// and the user's program.
		script := `import os, sys
fd = os.memfd_create("pcluster-root", 0)
os.write(fd, b"made by root")
os.fchmod(fd, 0o604)
os.dup2(fd, 7)
os.close(fd)
os.setgroups([])
os.setresgid(` + strconv.Itoa(userID) + `, ` + strconv.Itoa(userID) + `, ` + strconv.Itoa(userID) + `)
os.setresuid(` + strconv.Itoa(userID) + `, ` + strconv.Itoa(userID) + `, ` + strconv.Itoa(userID) + `)
os.execv(sys.argv[1], [sys.argv[1], "10"])
`
		p := fixture.Start(t, fixture.Python(t), "-c", script, fixtureAs(t, "countforever"))
		p.Lines.Expect(t, `^\d+$`, waitFor)
		var st syscall.Stat_t
		if err := syscall.Stat(fmt.Sprintf("/proc/%d/fd/7", p.Pid()), &st); err != nil || st.Uid != 0 {
			t.Fatalf("the original's fd 7: owner %d (%v), want root's memfd", st.Uid, err)
		}
		th := moved(t, p)
		th.out.Expect(t, `^\d+$`, waitFor)
		fd7 := fmt.Sprintf("/proc/%d/fd/7", p.Pid())
		if link, _ := os.Readlink(fd7); link != "/memfd:pcluster-root (deleted)" {
			t.Errorf("restored fd 7 is %q, want the memfd", link)
		}
		if b, err := os.ReadFile(fd7); err != nil || string(b) != "made by root" {
			t.Errorf("restored memfd holds %q (%v), want %q", b, err, "made by root")
		}
		if err := syscall.Stat(fd7, &st); err != nil || st.Uid != userID || st.Gid != userID || st.Mode&0o7777 != 0o604 {
			t.Errorf("restored memfd: owner %d:%d mode %#o (%v), want %d:%d mode 0604", st.Uid, st.Gid, st.Mode&0o7777, err, userID, userID)
		}
	})
}
