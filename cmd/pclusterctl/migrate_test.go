package main

import (
	"slices"
	"testing"
)

// TestPhasesBetween holds that the foreground migrate prints every phase
// in order even when the state moved several steps between two reads, and
// an abort alone.
func TestPhasesBetween(t *testing.T) {
	for _, tc := range []struct {
		from, to string
		want     []string
	}{
		{"", "planned", []string{"planned"}},
		{"", "transferring", []string{"planned", "transferring"}},
		{"planned", "done", []string{"transferring", "committed", "done"}},
		{"transferring", "committed", []string{"committed"}},
		{"transferring", "aborted", []string{"aborted"}},
		{"", "aborted", []string{"aborted"}},
		{"done", "done", []string{"done"}},
	} {
		if got := phasesBetween(tc.from, tc.to); !slices.Equal(got, tc.want) {
			t.Errorf("phasesBetween(%q, %q) = %q, want %q", tc.from, tc.to, got, tc.want)
		}
	}
}
