package cluster_test

import (
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestPackageDocs checks that each package of the cluster fabric has
// exactly one package doc comment, so a reader knows which room they are in.
func TestPackageDocs(t *testing.T) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Dir(strings.TrimSpace(string(out)))
	for _, dir := range []string{"cluster", "cluster/api", "cluster/pki", "scheduler", "node", "cmd/pclusterd", "cmd/pclusterctl"} {
		pkgs, err := parser.ParseDir(token.NewFileSet(), filepath.Join(root, dir), nil, parser.ParseComments|parser.PackageClauseOnly)
		if err != nil {
			t.Fatal(err)
		}
		for name, p := range pkgs {
			if strings.HasSuffix(name, "_test") {
				continue
			}
			var docs []string
			for fn, f := range p.Files {
				if f.Doc != nil && !strings.HasSuffix(fn, "_test.go") {
					docs = append(docs, filepath.Base(fn))
				}
			}
			if len(docs) != 1 {
				t.Errorf("package %s (%s): package doc comments in %v, want exactly one", name, dir, docs)
			}
		}
	}
}
