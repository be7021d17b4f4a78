package procfs

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// Mount is one line of /proc/PID/mountinfo, its paths unescaped.
type Mount struct {
	Dev      string   // major:minor
	Root     string   // the mount's root within its filesystem
	Point    string   // mount point, as the process sees it
	Opts     string   // per-mount options (rw,nosuid,...)
	Optional []string // shared:N, master:N, propagate_from:N, unbindable
	FSType   string
	Source   string
	Super    string // filesystem options
}

// Mountinfo reads a mountinfo file (/proc/PID/mountinfo), in its order:
// every mount after the one it is mounted on.
func Mountinfo(file string) ([]Mount, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		sep := -1
		for i := 6; i < len(fs); i++ {
			if fs[i] == "-" {
				sep = i
				break
			}
		}
		if len(fs) < 10 || sep < 0 || sep+3 >= len(fs) {
			return nil, fmt.Errorf("%s: malformed line %q", file, sc.Text())
		}
		out = append(out, Mount{Dev: fs[2], Root: UnescapeMount(fs[3]), Point: UnescapeMount(fs[4]), Opts: fs[5],
			Optional: fs[6:sep], FSType: fs[sep+1], Source: UnescapeMount(fs[sep+2]), Super: fs[sep+3]})
	}
	return out, sc.Err()
}
