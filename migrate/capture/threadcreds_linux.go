package capture

import "github.com/pcluster/pcluster/migrate/image"

// credKeys are the /proc/PID/status fields of a thread's credentials.
var credKeys = []string{"Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"}

// threadCreds returns a thread's own credentials (from its status tst)
// when they differ from its process's (st), or nil: credentials are per
// thread in the kernel, and a thread that changed its ids by a raw
// setresuid (glibc's setuid changes every thread's) keeps its own. The
// process's securebits are read by injection through the main thread;
// a thread's own, when it has credentials of its own, through it.
func threadCreds(st, tst map[string]string) (*image.Creds, error) {
	for _, k := range credKeys {
		if tst[k] != st[k] {
			var c image.Creds
			if err := parseCreds(tst, &c); err != nil {
				return nil, err
			}
			return &c, nil
		}
	}
	return nil, nil
}
