package debpkg

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcluster/pcluster/node"
)

// TestPackage builds the package (with the build cache's flags: PIE and
// -trimpath would recompile everything; the archive is otherwise what
// make deb writes), checks its contents and lintian's verdict, installs
// it into a throwaway root with dpkg and runs the unit's ExecStart line
// as systemd would (docs/packaging.md, "How it is tested").
func TestPackage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: dpkg --root, mount namespaces")
	}
	for _, tool := range []string{"dpkg-deb", "dpkg", "lintian", "unshare", "setpriv", "nsenter", "bash"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (make deps installs it): %v", tool, err)
		}
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	deb, err := Build(Options{Root: root, Out: out, Version: "1.2.3+git4.abc1234", Date: "2026-12-07",
		BuildFlags: []string{"-ldflags=-s -w"}})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(deb) != "pcluster_1.2.3+git4.abc1234_amd64.deb" {
		t.Errorf("package file: got %s", filepath.Base(deb))
	}

	// Contents, owners and modes.
	listing := run(t, "dpkg-deb", "-c", deb)
	for _, want := range []string{
		"-rwxr-xr-x root/root ./usr/bin/pfreeze", "-rwxr-xr-x root/root ./usr/bin/pthaw",
		"-rwxr-xr-x root/root ./usr/bin/pclusterd", "-rwxr-xr-x root/root ./usr/bin/pclusterctl",
		"-rw-r--r-- root/root ./usr/share/man/man1/pfreeze.1.gz", "-rw-r--r-- root/root ./usr/share/man/man1/pthaw.1.gz",
		"-rw-r--r-- root/root ./usr/share/man/man1/pclusterctl.1.gz", "-rw-r--r-- root/root ./usr/share/man/man8/pclusterd.8.gz",
		"-rw-r--r-- root/root ./lib/systemd/system/pclusterd.service", "-rw-r--r-- root/root ./etc/pcluster/pclusterd.json",
		"-rw-r--r-- root/root ./usr/share/bash-completion/completions/pfreeze",
		"-rw-r--r-- root/root ./usr/share/bash-completion/completions/pclusterctl",
		"-rw-r--r-- root/root ./usr/share/doc/pcluster/copyright",
	} {
		f := strings.Fields(want)
		found := false
		for _, l := range strings.Split(listing, "\n") {
			g := strings.Fields(l)
			found = found || len(g) == 6 && g[0] == f[0] && g[1] == f[1] && g[5] == f[2]
		}
		if !found {
			t.Errorf("package lacks %q; dpkg-deb -c:\n%s", want, listing)
		}
	}
	if got := strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, "Version")); got != "1.2.3+git4.abc1234" {
		t.Errorf("Version field: got %q", got)
	}
	if got := run(t, "dpkg-deb", "-I", deb, "conffiles"); got != "/etc/pcluster/pclusterd.json\n" {
		t.Errorf("conffiles: got %q, want the config", got)
	}

	// lintian: no error (warnings are printed for the reader).
	lint := exec.Command("lintian", "--no-cfg", "--fail-on", "error", deb)
	// lintian's Perl (MLDBM) leaves mldbm-elf-* directories in its
	// TMPDIR: the test's own, removed with it.
	lint.Env = append(os.Environ(), "TMPDIR="+t.TempDir())
	lo, err := lint.CombinedOutput()
	if err != nil {
		t.Errorf("lintian: %v\n%s", err, lo)
	} else {
		t.Logf("lintian:\n%s", lo)
	}

	// Installed into a throwaway root by dpkg itself, maintainer scripts
	// included (run without chroot, with DPKG_ROOT set).
	r := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates"} {
		os.MkdirAll(filepath.Join(r, d), 0o755)
	}
	os.WriteFile(filepath.Join(r, "var/lib/dpkg/status"), nil, 0o644)
	run(t, "dpkg", "--root="+r, "--log=/dev/null", "--force-script-chrootless", "--force-depends", "-i", deb)
	key, err := os.Stat(filepath.Join(r, "etc/pcluster/cluster.key"))
	if err != nil || key.Mode().Perm() != 0o600 {
		t.Fatalf("postinst's cluster key: %v, mode %v; want a 0600 file", err, key)
	}
	tools, err := ReadTools(filepath.Join(r, "usr/bin"))
	if err != nil {
		t.Fatal(err)
	}
	checkManPages(t, r, tools)
	checkCompletion(t, r)

	unit, err := os.ReadFile(filepath.Join(r, "lib/systemd/system/pclusterd.service"))
	if err != nil {
		t.Fatal(err)
	}
	if sa, err := exec.LookPath("systemd-analyze"); err == nil {
		// verify checks that ExecStart's binary exists: the unit as
		// installed, its binary the throwaway root's. It prints what it
		// ignores (a bad line) and still exits 0: any output fails.
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "pclusterd.service"), bytes.ReplaceAll(unit, []byte("/usr/bin/"), []byte(r+"/usr/bin/")), 0o644)
		if o, err := exec.Command(sa, "verify", "--man=no", filepath.Join(dir, "pclusterd.service")).CombinedOutput(); err != nil || len(o) > 0 {
			t.Errorf("systemd-analyze verify: %v\n%s", err, o)
		}
	} else {
		t.Errorf("systemd-analyze not installed (make deps installs systemd): %v", err)
	}
	runUnit(t, r, string(unit))

	// Purge removes the key and the state with the files.
	run(t, "dpkg", "--root="+r, "--log=/dev/null", "--force-script-chrootless", "--purge", "pcluster")
	if _, err := os.Stat(filepath.Join(r, "etc/pcluster")); !os.IsNotExist(err) {
		t.Errorf("after purge: /etc/pcluster: %v, want it gone", err)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return string(out)
}

// checkManPages: each page is gzipped roff with its title, and lists every
// flag its binary prints for -h.
func checkManPages(t *testing.T, r string, tools map[string]Tool) {
	for _, p := range Pages {
		path := filepath.Join(r, fmt.Sprintf("usr/share/man/man%d/%s.%d.gz", p.Section, p.Name, p.Section))
		f, err := os.Open(path)
		if err != nil {
			t.Error(err)
			continue
		}
		z, err := gzip.NewReader(f)
		if err != nil {
			t.Errorf("%s: %v", path, err)
			f.Close()
			continue
		}
		b, err := io.ReadAll(z)
		f.Close()
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		roff := string(b)
		if want := fmt.Sprintf(".TH %s %d ", p.Name, p.Section); !strings.Contains(roff, want) {
			t.Errorf("%s: no %q", path, want)
		}
		for _, sh := range []string{".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH SEE ALSO"} {
			if !strings.Contains(roff, sh) {
				t.Errorf("%s: no %s", path, sh)
			}
		}
		flags := tools[p.Name].Flags
		for _, c := range tools[p.Name].Commands {
			flags = append(flags, c.Flags...)
			if !strings.Contains(roff, ".SS "+p.Name+" "+c.Name) {
				t.Errorf("%s: command %q missing", path, c.Name)
			}
		}
		if len(flags) == 0 {
			t.Errorf("%s: no flags parsed from %s -h", path, p.Name)
		}
		for _, fl := range flags {
			if want := ".TP\n\\fB-" + fl.Name + "\\fP"; !strings.Contains(roff, want) {
				t.Errorf("%s: flag -%s missing (no %q)", path, fl.Name, want)
			}
		}
	}
}

// checkCompletion completes in bash with the installed scripts.
func checkCompletion(t *testing.T, r string) {
	for _, c := range []struct {
		words []string // the last one is being completed
		want  string
	}{
		{[]string{"pfreeze", "-ha"}, "-halt"},
		{[]string{"pfreeze", "-pid", "1", "-de"}, "-debug -dest"},
		{[]string{"pthaw", "-pid"}, "-pidns"},
		{[]string{"pclusterctl", "mi"}, "migrate migrations"},
		{[]string{"pclusterctl", "node", "d"}, "drain"},
		{[]string{"pclusterctl", "node", "drain", "-max"}, "-max-parallel"},
		{[]string{"pclusterctl", "ps", "-j"}, "-json"},
		{[]string{"pclusterctl", "ps", "-addr"}, "-address"},
		{[]string{"pclusterd", "key"}, "keygen"},
		{[]string{"pclusterd", "-drain-o"}, "-drain-on-shutdown"},
	} {
		script := fmt.Sprintf("source %s; COMP_WORDS=(%s); COMP_CWORD=%d; _%s; printf '%%s\\n' \"${COMPREPLY[@]}\" | sort | tr '\\n' ' '",
			filepath.Join(r, "usr/share/bash-completion/completions", c.words[0]), strings.Join(c.words, " "), len(c.words)-1, c.words[0])
		out, err := exec.Command("bash", "-c", script).CombinedOutput()
		if got := strings.TrimSpace(string(out)); err != nil || got != c.want {
			t.Errorf("completing %q: got %q (%v), want %q", strings.Join(c.words, " "), got, err, c.want)
		}
	}
}

// unitValue returns the value of key= in the unit text.
func unitValue(t *testing.T, unit, key string) string {
	for _, l := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(l, key+"="); ok {
			return v
		}
	}
	t.Fatalf("unit has no %s=", key)
	return ""
}

// runUnit runs the unit's ExecStart as systemd would: root, only the
// bounding set's capabilities, the state and runtime directories made,
// here in private mount and network namespaces so that /etc/pcluster,
// /var/lib/pcluster and /run/pcluster are the throwaway root's and the
// ports are free. The node must answer pclusterctl on the unit's socket
// and run a workload, which survives SIGTERM to pclusterd alone
// (KillMode=process).
func runUnit(t *testing.T, r, unit string) {
	// The node (named after the host) leaves its workload cgroups behind,
	// as workloads outlive pclusterd: removed once the test is over,
	// unless they were there before it (a real installation's).
	if host, err := os.Hostname(); err == nil {
		if base, err := node.CgroupBase(host, "/var/lib/pcluster"); err == nil {
			if _, err := os.Stat(base); errors.Is(err, fs.ErrNotExist) {
				t.Cleanup(func() {
					if err := node.RemoveCgroups(host, "/var/lib/pcluster"); err != nil {
						t.Errorf("the unit's node: %v", err)
					}
				})
			}
		}
	}
	if got := unitValue(t, unit, "KillMode"); got != "process" {
		t.Errorf("KillMode=%s, want process", got)
	}
	exec1 := strings.Fields(unitValue(t, unit, "ExecStart"))
	if exec1[0] != "/usr/bin/pclusterd" {
		t.Fatalf("ExecStart runs %s", exec1[0])
	}
	var caps []string
	var mask uint64
	for _, c := range strings.Fields(unitValue(t, unit, "CapabilityBoundingSet")) {
		name := strings.ToLower(strings.TrimPrefix(c, "CAP_"))
		caps = append(caps, "+"+name)
		n, ok := capNumbers[name]
		if !ok {
			t.Fatalf("CapabilityBoundingSet: unknown %s", c)
		}
		mask |= 1 << n
	}
	tmp := t.TempDir()
	sh := fmt.Sprintf(`set -e
ip link set lo up
mkdir %[1]s/upper %[1]s/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=%[1]s/upper,workdir=%[1]s/work /etc
mkdir /etc/pcluster
mount --bind %[2]s/etc/pcluster /etc/pcluster
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mkdir -m 0700 /var/lib/pcluster
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -m 0755 /run/pcluster
exec setpriv --inh-caps=-all --bounding-set=-all,%[3]s %[2]s%[4]s "$@"`, tmp, r, strings.Join(caps, ","), exec1[0])
	var logs bytes.Buffer
	d := exec.Command("unshare", append([]string{"--mount", "--net", "--propagation", "private", "sh", "-c", sh, "sh"}, exec1[1:]...)...)
	d.Stdout, d.Stderr = &logs, &logs
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- d.Wait() }()
	var workload int
	defer func() {
		d.Process.Signal(syscall.SIGKILL)
		<-exited
		if workload > 0 {
			unix.Kill(workload, syscall.SIGKILL)
		}
		if t.Failed() {
			t.Logf("pclusterd's output:\n%s", logs.String())
		}
	}()
	ctl := func(args ...string) (string, error) {
		a := append([]string{"--mount=/proc/" + strconv.Itoa(d.Process.Pid) + "/ns/mnt", r + "/usr/bin/pclusterctl"}, args...)
		out, err := exec.Command("nsenter", a...).CombinedOutput()
		return string(out), err
	}
	// Up when members names it alive and leader (or pclusterd gave up).
	var members string
	for {
		out, err := ctl("members")
		if err == nil && strings.Contains(out, "alive") && strings.Contains(out, "leader") {
			members = out
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("pclusterd exited: %v; last pclusterctl members: %s", err, out)
		case <-time.After(200 * time.Millisecond):
		}
	}
	t.Logf("pclusterctl members:\n%s", members)
	// Only the bounding set's capabilities.
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.Process.Pid))
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			if got, _ := strconv.ParseUint(strings.TrimSpace(v), 16, 64); got&^mask != 0 {
				t.Errorf("pclusterd's effective capabilities %x: %x not in the unit's bounding set %x", got, got&^mask, mask)
			}
		}
	}

	out, err := ctl("run", "-json", "--", "sleep", "600")
	if err != nil {
		t.Fatalf("pclusterctl run: %v\n%s", err, out)
	}
	var w struct{ ID string }
	if err := json.Unmarshal([]byte(out), &w); err != nil || w.ID == "" {
		t.Fatalf("pclusterctl run -json: %q: %v", out, err)
	}
	for workload == 0 {
		out, err := ctl("status", "-json", w.ID)
		var st struct {
			State, Message string
			PID, Restarts  int
		}
		if err == nil && json.Unmarshal([]byte(out), &st) == nil {
			if st.State == "running" && st.PID > 0 {
				workload = st.PID
				break
			}
			// A start that failed (a capability the unit lacks) ends
			// the workload or restarts it: either way it is over.
			if (st.State != "pending" && st.State != "running") || st.Restarts > 0 {
				t.Fatalf("workload under the unit's capabilities: %s (restarts %d): %s", st.State, st.Restarts, st.Message)
			}
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("pclusterd exited: %v; last status: %s", err, out)
		case <-time.After(200 * time.Millisecond):
		}
	}
	// systemctl stop with KillMode=process: SIGTERM to pclusterd alone.
	d.Process.Signal(syscall.SIGTERM)
	if err := <-exited; err != nil {
		t.Errorf("pclusterd after SIGTERM: %v, want a clean exit", err)
	}
	exited <- nil
	if err := unix.Kill(workload, 0); err != nil {
		t.Errorf("workload pid %d after pclusterd stopped: %v, want it running (KillMode=process)", workload, err)
	}
}

// capNumbers are the capabilities a unit may name (linux/capability.h).
var capNumbers = map[string]uint{
	"chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4, "kill": 5, "setgid": 6,
	"setuid": 7, "setpcap": 8, "linux_immutable": 9, "net_bind_service": 10, "net_broadcast": 11,
	"net_admin": 12, "net_raw": 13, "ipc_lock": 14, "ipc_owner": 15, "sys_module": 16, "sys_rawio": 17,
	"sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20, "sys_admin": 21, "sys_boot": 22, "sys_nice": 23,
	"sys_resource": 24, "sys_time": 25, "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29,
	"audit_control": 30, "setfcap": 31, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
	"block_suspend": 36, "audit_read": 37, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
