package netrehome

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Capability numbers (linux/capability.h).
const (
	capNetAdmin = 12
	capNetRaw   = 13
)

// Capable says whether this process may carry VIPs: adding addresses
// needs CAP_NET_ADMIN and sending ARP needs CAP_NET_RAW, both effective.
// It returns "" when it may, else the reason.
func Capable() string {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return fmt.Sprintf("capabilities unknown: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "CapEff:")
		if !ok {
			continue
		}
		eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			return fmt.Sprintf("capabilities unknown: CapEff %q: %v", v, err)
		}
		var missing []string
		if eff&(1<<capNetAdmin) == 0 {
			missing = append(missing, "CAP_NET_ADMIN")
		}
		if eff&(1<<capNetRaw) == 0 {
			missing = append(missing, "CAP_NET_RAW")
		}
		if len(missing) > 0 {
			return "lacks " + strings.Join(missing, " and ")
		}
		return ""
	}
	return "capabilities unknown: no CapEff in /proc/self/status"
}
