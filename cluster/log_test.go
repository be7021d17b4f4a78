package cluster

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestLogAdapters(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	newRaftLogger(l).Warn("initial configuration", "servers", hclog.Fmt("%+v", []int{1, 2}))
	newMemberlistLogger(l).Printf("[ERR] memberlist: Failed to send ping: %s", "boom")
	out := buf.String()
	for _, want := range []string{`level=WARN msg="initial configuration" component=raft servers="[1 2]"`,
		`level=ERROR msg="Failed to send ping: boom" component=memberlist`} {
		if !strings.Contains(out, want) {
			t.Errorf("log output lacks %q:\n%s", want, out)
		}
	}
}
