package debpkg

import (
	"os"
	"reflect"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

func TestMain(m *testing.M) {
	fixture.KeepFDsFromTargets()
	os.Exit(m.Run())
}

func TestParseDefaults(t *testing.T) {
	help := "usage of pclusterd:\n" +
		"  -bind host:port\n    \tgossip host:port; raft uses port+1\n    \tcontinued (default 0.0.0.0:7946)\n" +
		"  -dev\n    \trun a complete single-node cluster\n" +
		"  -x\tshort usage\n" +
		"  -pid int\n    \tPID of the process to freeze (default -1)\n"
	want := []Flag{
		{"bind", "host:port", "gossip host:port; raft uses port+1 continued (default 0.0.0.0:7946)"},
		{"dev", "", "run a complete single-node cluster"},
		{"x", "", "short usage"},
		{"pid", "int", "PID of the process to freeze (default -1)"},
	}
	if got := ParseDefaults(help); !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func TestParseCommands(t *testing.T) {
	help := "usage: pclusterctl COMMAND [flags] [args]\n\ncommands:\n" +
		"  members                  list nodes as gossip and raft see them\n" +
		"  node eligibility -enable|-disable NODE   whether new workloads may be placed on NODE\n" +
		"  run [flags] -- CMD ARGS…  start a workload on the chosen node\n" +
		"\nevery command takes -address\n  not a command    at all\n"
	want := []Command{
		{Name: "members", Synopsis: "members", Summary: "list nodes as gossip and raft see them"},
		{Name: "node eligibility", Synopsis: "node eligibility -enable|-disable NODE", Summary: "whether new workloads may be placed on NODE"},
		{Name: "run", Synopsis: "run [flags] -- CMD ARGS…", Summary: "start a workload on the chosen node"},
	}
	if got := ParseCommands(help); !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

func TestVersion(t *testing.T) {
	for _, c := range []struct {
		describe string
		count    int
		sha      string
		dirty    bool
		want     string
	}{
		{"v1.2.0-0-gabc1234", 9, "abc1234", false, "1.2.0"},
		{"v1.2.0-5-gabc1234", 9, "abc1234", false, "1.2.0+git5.abc1234"},
		{"1.2.0-5-gabc1234", 9, "abc1234", true, "1.2.0+git5.abc1234.dirty"},
		{"v2.0.0-rc1-0-gabc1234", 9, "abc1234", false, "0.0.0~git9.abc1234"}, // a hyphen is no Debian upstream version
		{"", 311, "64452a9", false, "0.0.0~git311.64452a9"},
		{"", 311, "64452a9", true, "0.0.0~git311.64452a9.dirty"},
		{"release-3-gabc1234", 4, "abc1234", false, "0.0.0~git4.abc1234"},
	} {
		if got := Version(c.describe, c.count, c.sha, c.dirty); got != c.want {
			t.Errorf("Version(%q, %d, %q, %v) = %q, want %q", c.describe, c.count, c.sha, c.dirty, got, c.want)
		}
	}
}

func TestSection(t *testing.T) {
	doc := "# title\n\nintro\n\n## a\n\n```\nsyn\n# not a heading\n```\ntext a\n### a.1\nsub\n## b\nbody b\n"
	for _, c := range []struct{ heading, want string }{
		{"", "\nintro\n"},
		{"## a", "\n```\nsyn\n# not a heading\n```\ntext a\n### a.1\nsub"},
		{"## b", "body b\n"},
	} {
		got, err := section(doc, c.heading)
		if err != nil || got != c.want {
			t.Errorf("section %q: got %q, %v; want %q", c.heading, got, err, c.want)
		}
	}
	if _, err := section(doc, "## c"); err == nil {
		t.Errorf("missing heading: no error")
	}
	syn, rest := splitSynopsis("\n```\nsyn\n# x\n```\ntext a\n")
	if syn != "syn\n# x" || rest != "text a\n" {
		t.Errorf("splitSynopsis: got %q, %q", syn, rest)
	}
}
