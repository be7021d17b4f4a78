package debpkg

import (
	"fmt"
	"os/exec"
	"regexp"
	"strings"
)

// describeRE is `git describe --tags --long` output: TAG-N-gSHA.
var describeRE = regexp.MustCompile(`^v?([0-9][0-9A-Za-z.+~]*)-([0-9]+)-g([0-9a-f]+)$`)

// Version turns what git says about the commit into a Debian version
// (Debian policy 5.6.12: starts with a digit; only alphanumerics and
// . + ~; no hyphen, as the package has no Debian revision):
//
//	describe "v1.2.0-0-gabc1234"  -> 1.2.0
//	describe "v1.2.0-5-gabc1234"  -> 1.2.0+git5.abc1234  (after 1.2.0)
//	no tag: count 123, sha abc1234 -> 0.0.0~git123.abc1234 (before any 0.0.0 release)
//
// dirty appends ".dirty" (a build of uncommitted changes). A tag that does
// not start with a digit once its "v" is dropped is ignored.
func Version(describe string, count int, sha string, dirty bool) string {
	var v string
	if m := describeRE.FindStringSubmatch(describe); m != nil {
		v = m[1]
		if m[2] != "0" {
			v += "+git" + m[2] + "." + m[3]
		}
	} else {
		v = fmt.Sprintf("0.0.0~git%d.%s", count, sha)
	}
	if dirty {
		v += ".dirty"
	}
	return v
}

// GitVersion is Version for the work tree at dir, and the commit's date
// (YYYY-MM-DD, for the man pages and the changelog: the same commit gives
// the same package). Without git or a repository it is 0.0.0~unknown.
func GitVersion(dir string) (version, date string) {
	git := func(args ...string) string {
		out, err := exec.Command("git", append([]string{"-C", dir}, args...)...).Output()
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(out))
	}
	sha := git("rev-parse", "--short=7", "HEAD")
	if sha == "" {
		return "0.0.0~unknown", "1970-01-01"
	}
	count := 0
	fmt.Sscan(git("rev-list", "--count", "HEAD"), &count)
	dirty := git("status", "--porcelain", "--untracked-files=no") != ""
	return Version(git("describe", "--tags", "--long", "--match", "[v0-9]*"), count, sha, dirty), git("log", "-1", "--format=%cs")
}
