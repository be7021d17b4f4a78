package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// zdtmFakeTest is a zdtm-like static test: it daemonizes, writes its
// pidfile, waits for SIGTERM and then writes its verdict to its .out file
// (PASS, or FAIL when started as "failer").
const zdtmFakeTest = `#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t done;
static void term(int s) { (void)s; done = 1; }

int main(int argc, char **argv) {
	const char *name = argv[1];
	char tmp[256], pid[256], out[256];
	if (argc < 2 || fork() != 0)
		return 0;
	setsid();
	signal(SIGTERM, term);
	snprintf(tmp, sizeof tmp, "%s.pid.tmp", name);
	snprintf(pid, sizeof pid, "%s.pid", name);
	snprintf(out, sizeof out, "%s.out", name);
	FILE *f = fopen(tmp, "w");
	fprintf(f, "%d\n", getpid());
	fclose(f);
	rename(tmp, pid);
	while (!done)
		pause();
	f = fopen(out, "w");
	fputs(strcmp(name, "failer") == 0 ? "FAIL: failer fails on purpose\n" : "PASS\n", f);
	fclose(f);
	return 0;
}
`

// zdtmFakeMakefile builds the fake test as zdtm's static Makefile builds
// its tests, and starts one as "make NAME.pid" does: it returns once the
// daemonized test has written its pidfile.
const zdtmFakeMakefile = `passer failer: fake.c
	gcc -O1 -o $@ fake.c
%.pid: %
	./$* $* </dev/null >/dev/null 2>&1
	while [ ! -f $@ ]; do sleep 0.05; done
`

// TestZdtmVerdict runs TestZdtm (in a child test binary) on a fake zdtm
// tree whose test pcluster moves, with a CRIU that fails every dump: make
// zdtm must exit 0 then, with CRIU's failure in the table, and non-zero
// when the test fails under pcluster.
func TestZdtmVerdict(t *testing.T) {
	needRoot(t)
	if os.Getenv("ZDTM") != "" {
		t.Skip("running inside TestZdtm's child")
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("needs gcc (make deps)")
	}
	dir := t.TempDir()
	for path, text := range map[string]string{
		"lib/Makefile":    "all:\n",
		"static/Makefile": zdtmFakeMakefile,
		"static/fake.c":   zdtmFakeTest,
		"criu":            "#!/bin/sh\necho \"Error (criu/cr-dump.c:1): fake criu fails every $1\" >&2\nexit 1\n",
	} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, path)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, path), []byte(text), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	run := func(test string) (string, string, error) {
		report := filepath.Join(dir, test+".md")
		cmd := exec.Command(os.Args[0], "-test.run", "^TestZdtm$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "ZDTM="+dir, "CRIU="+filepath.Join(dir, "criu"),
			"ZDTM_TESTS="+test, "ZDTM_REPORT="+report)
		out, err := cmd.CombinedOutput()
		table, _ := os.ReadFile(report)
		return string(out), string(table), err
	}

	out, table, err := run("passer")
	if err != nil {
		t.Errorf("TestZdtm with only CRIU failing: %v, want exit 0\n%s", err, out)
	}
	if want := "| passer | pass | criu dump: Error (criu/cr-dump.c:1): fake criu fails every dump |"; !strings.Contains(table, want) {
		t.Errorf("report:\n%s\nwant the row %q", table, want)
	}

	out, table, err = run("failer")
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Errorf("TestZdtm with pcluster failing: %v, want a non-zero exit\n%s", err, out)
	}
	if want := "| failer | check: FAIL: failer fails on purpose |"; !strings.Contains(table, want) {
		t.Errorf("report:\n%s\nwant a row starting %q", table, want)
	}
}
