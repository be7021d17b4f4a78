package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestNodeDrainUsage: contradictory or empty drain flags are bad usage
// (exit 2, one line), refused before any daemon is asked, under both
// names of the command.
func TestNodeDrainUsage(t *testing.T) {
	for _, args := range [][]string{
		{"node", "drain"},
		{"drain", "a", "b"},
		{"drain", "-force", "-no-deadline", "a"},
		{"node", "drain", "-deadline", "1h", "-force", "a"},
		{"drain", "-disable", "-force", "a"},
		{"drain", "-disable", "-max-parallel", "2", "a"},
		{"drain", "-deadline", "0s", "a"},
		{"drain", "-max-parallel", "0", "a"},
	} {
		var out, errb bytes.Buffer
		// An address nothing listens on: usage is checked first.
		full := append([]string{}, args...)
		code := realMain(context.Background(), withAddress(full, "/nonexistent/pclusterd.sock"), &out, &errb)
		if code != exitUsage || strings.Count(errb.String(), "\n") != 1 {
			t.Errorf("pclusterctl %q: exit %d, stderr %q; want %d and one line", args, code, errb.String(), exitUsage)
		}
	}
}

// withAddress puts -address after the command words.
func withAddress(args []string, addr string) []string {
	n := 1
	if args[0] == "node" {
		n = 2
	}
	return append(append(append([]string{}, args[:n]...), "-address", addr), args[n:]...)
}
