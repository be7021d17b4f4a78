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
		files, _ := filepath.Glob(filepath.Join(root, dir, "*.go"))
		var docs []string
		for _, fn := range files {
			if strings.HasSuffix(fn, "_test.go") {
				continue
			}
			f, err := parser.ParseFile(token.NewFileSet(), fn, nil, parser.ParseComments|parser.PackageClauseOnly)
			if err != nil {
				t.Fatal(err)
			}
			if f.Doc != nil {
				docs = append(docs, filepath.Base(fn))
			}
		}
		if len(docs) != 1 {
			t.Errorf("%s: package doc comments in %v, want exactly one", dir, docs)
		}
	}
}
