package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps pclusterctl a thin API client: raft, memberlist and the
// process-capture engine must never be linked into it.
func TestDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	forbidden := []string{
		"github.com/hashicorp/raft",
		"github.com/hashicorp/memberlist",
		"github.com/pcluster/pcluster/migrate",
		"github.com/pcluster/pcluster/loader",
		"github.com/pcluster/pcluster/scheduler",
		"github.com/pcluster/pcluster/node",
		"github.com/pcluster/pcluster/netrehome",
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, f := range forbidden {
			if dep == f || strings.HasPrefix(dep, f+"/") {
				t.Errorf("pclusterctl depends on %s", dep)
			}
		}
	}
}
