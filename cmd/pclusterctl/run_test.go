package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pcluster/pcluster/cluster/api"
)

// standIn serves the API on a unix socket: POST /v1/workloads records the
// request, GET /v1/workloads lists wl alone, any other request answers wl.
func standIn(t *testing.T, wl api.Workload) (string, *api.RunRequest) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := new(api.RunRequest)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			*got = api.RunRequest{}
			json.NewDecoder(r.Body).Decode(got)
		}
		if r.Method == http.MethodGet && r.URL.Path == api.PathWorkloads {
			json.NewEncoder(w).Encode([]api.Workload{wl})
			return
		}
		json.NewEncoder(w).Encode(wl)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock, got
}

// TestRunUIDOrName: a -uid/-gid value of digits (with an optional sign) is
// a number, which the daemon range-checks; anything else is a name, even
// one that starts with a digit ("3com").
func TestRunUIDOrName(t *testing.T) {
	sock, got := standIn(t, api.Workload{ID: "w1", DesiredNode: "a"})
	num := func(n int64) *int64 { return &n }
	for _, tc := range []struct {
		args        []string
		uid, gid    *int64
		user, group string
	}{
		{[]string{"-uid", "3com"}, nil, nil, "3com", ""},
		{[]string{"-uid", "1001", "-gid", "0100"}, num(1001), num(100), "", ""},
		{[]string{"-uid", "bob", "-gid", "2wheel"}, nil, nil, "bob", "2wheel"},
		{[]string{"-uid", "-7"}, num(-7), nil, "", ""},
		{[]string{"-gid", "+5"}, nil, num(5), "", ""},
		{[]string{"-uid", "4294967296"}, num(4294967296), nil, "", ""},
	} {
		var out, errb bytes.Buffer
		args := append(append([]string{"run", "-address", sock}, tc.args...), "--", "/bin/true")
		if code := realMain(context.Background(), args, &out, &errb); code != 0 {
			t.Errorf("run %v: exit %d: %s", tc.args, code, errb.String())
			continue
		}
		eq := func(a, b *int64) bool { return a == nil && b == nil || a != nil && b != nil && *a == *b }
		if !eq(got.UID, tc.uid) || !eq(got.GID, tc.gid) || got.User != tc.user || got.Group != tc.group {
			t.Errorf("run %v: sent uid %v gid %v user %q group %q; want uid %v gid %v user %q group %q", tc.args,
				fmtID(got.UID), fmtID(got.GID), got.User, got.Group, fmtID(tc.uid), fmtID(tc.gid), tc.user, tc.group)
		}
	}
	var out, errb bytes.Buffer
	if code := realMain(context.Background(), []string{"run", "-address", sock, "-uid", "99999999999999999999", "--", "/bin/true"}, &out, &errb); code != 2 ||
		!strings.Contains(errb.String(), "-uid 99999999999999999999: not a number in 0..4294967294") {
		t.Errorf("run -uid 99999999999999999999: exit %d %q, want 2 naming the flag", code, errb.String())
	}
}

func fmtID(p *int64) any {
	if p == nil {
		return "none"
	}
	return *p
}

// TestStatusQuotesControl: what the daemon answers is printed so that it
// cannot reach the terminal as control characters: an argument with a
// newline or an ESC, a message with an escape sequence, are Go-quoted.
func TestStatusQuotesControl(t *testing.T) {
	wl := api.Workload{ID: "w1", Name: "n", Command: "sh", Args: []string{"-c", "echo a\necho b", "\x1b[2J"}, State: "failed",
		Desired: "running", DesiredNode: "a", Node: "a", Message: "exec: \x1b]0;pwned\x07", Restart: "never"}
	sock, _ := standIn(t, wl)
	for _, cmd := range []string{"status", "ps"} {
		var out, errb bytes.Buffer
		args := []string{cmd, "-address", sock, "w1"}
		if cmd == "ps" {
			args = []string{cmd, "-a", "-address", sock}
		}
		if code := realMain(context.Background(), args, &out, &errb); code != 0 {
			t.Fatalf("%s: exit %d: %s", cmd, code, errb.String())
		}
		if strings.ContainsAny(out.String(), "\x1b\x07") {
			t.Errorf("%s printed control characters:\n%q", cmd, out.String())
		}
		if cmd == "status" {
			for _, want := range []string{`Command:   sh -c "echo a\necho b" "\x1b[2J"` + "\n", `Message:   "exec: \x1b]0;pwned\a"` + "\n"} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("status lacks %q:\n%s", want, out.String())
				}
			}
		}
	}
}

// TestPIDs: a workload that runs as a PID namespace of its own shows its
// program's PID on its host and, after a slash (ps) or in words (status),
// the PID the program has in its namespace; one whose PIDs are the same
// shows one number.
func TestPIDs(t *testing.T) {
	for _, tc := range []struct {
		pid, nsPid, init int
		ps, status       string
	}{
		{4173, 2, 4170, " 4173/2 ", "PID:       4173 (2 in its PID namespace, whose init is 4170)\n"},
		{4173, 0, 0, " 4173 ", "PID:       4173\n"},
	} {
		wl := api.Workload{ID: "w1", Name: "n", Command: "sleep", State: "running", Desired: "running", DesiredNode: "a",
			Node: "a", Restart: "never", PID: tc.pid, NSPID: tc.nsPid, InitPID: tc.init}
		sock, _ := standIn(t, wl)
		for _, cmd := range []string{"status", "ps"} {
			var out, errb bytes.Buffer
			args := []string{cmd, "-address", sock, "w1"}
			want := tc.status
			if cmd == "ps" {
				args, want = []string{cmd, "-address", sock}, tc.ps
			}
			if code := realMain(context.Background(), args, &out, &errb); code != 0 {
				t.Fatalf("%s: exit %d: %s", cmd, code, errb.String())
			}
			if !strings.Contains(out.String(), want) {
				t.Errorf("%s with pid %d, ns pid %d: lacks %q:\n%s", cmd, tc.pid, tc.nsPid, want, out.String())
			}
		}
	}
}
