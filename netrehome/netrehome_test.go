package netrehome

import (
	"net/netip"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // "" when refused
	}{
		{"198.18.0.50/24", "198.18.0.50/24"},
		{"198.18.0.50", "198.18.0.50/32"},
		{"10.1.2.3/8", "10.1.2.3/8"},
		{"198.18.0.0/24", ""},   // network address
		{"198.18.0.255/24", ""}, // broadcast
		{"198.18.0.50/33", ""},
		{"127.0.0.5", ""},
		{"224.0.0.1", ""},
		{"0.0.0.0", ""},
		{"169.254.1.1", ""},
		{"fd00::5/64", ""}, // IPv6: not yet
		{"::ffff:198.18.0.50", ""},
		{"web", ""},
		{"", ""},
	} {
		got, err := Parse(tc.in)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("Parse(%q) = %v, want an error", tc.in, got)
		case tc.want != "" && err != nil:
			t.Errorf("Parse(%q): %v, want %s", tc.in, err, tc.want)
		case tc.want != "" && got != netip.MustParsePrefix(tc.want):
			t.Errorf("Parse(%q) = %v, want %s", tc.in, got, tc.want)
		}
	}
}
