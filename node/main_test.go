package node

import (
	"os"
	"testing"

	"github.com/pcluster/pcluster/internal/fixture"
)

// TestMain runs this test binary as a workload's init when the agent
// under test starts it so (spawn re-executes /proc/self/exe), as
// pclusterd's main does.
func TestMain(m *testing.M) {
	if IsInit() {
		os.Exit(InitMain())
	}
	if IsWatchdog() {
		os.Exit(WatchdogMain())
	}
	fixture.KeepFDsFromTargets()
	os.Exit(m.Run())
}
