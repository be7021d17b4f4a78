package loader

import (
	"fmt"

	"github.com/pcluster/pcluster/migrate/image"
)

// credsOf returns the credentials thread tk gets: its own when it had
// credentials of its own (image.Thread.Creds), else its process's.
func (p *Process) credsOf(tk *task) image.Creds {
	if tk.img.Creds != nil {
		return *tk.img.Creds
	}
	return p.proc.Creds
}

// checkThreadCreds refuses, for pthaw run by an ordinary user, a process
// with a thread of credentials of its own: checkCreds vouches for the
// process's alone, and only root's pthaw gives a thread other ids.
func checkThreadCreds(pr *image.Process, threads []*image.Thread) error {
	if _, _, user := forUser(); !user {
		return nil
	}
	for _, t := range threads {
		if t.Creds != nil {
			return fmt.Errorf("process %d: thread %d has credentials of its own (uid %s): only root's pthaw restores those", pr.Pid, t.Tid, joinIDs(t.Creds.Uid[:]))
		}
	}
	return nil
}
