package node

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// A workload's log files on a node hold the output of every attempt that
// ran here, appended (a workload that moves away and comes back appends to
// the file it left). So that a reader can follow a workload across nodes
// without printing a line twice or skipping one, the agent records where
// each attempt's output begins here, when it opens the files for it and
// before the process runs: workloads/ID/starts, one line per attempt,
// "ATTEMPT STDOUT-OFFSET STDERR-OFFSET".

const startsFile = "starts"

// markLogStart records that attempt's output begins at the current ends of
// stdout and stderr. A failure is logged: the logs themselves still work.
func (a *Agent) markLogStart(id string, attempt int, stdout, stderr *os.File) {
	var offs [2]int64
	for i, f := range []*os.File{stdout, stderr} {
		fi, err := f.Stat()
		if err != nil {
			a.log.Warn("record where the log starts", "workload", id, "attempt", attempt, "err", err)
			return
		}
		offs[i] = fi.Size()
	}
	p := filepath.Join(filepath.Dir(stdout.Name()), startsFile)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err == nil {
		_, err = fmt.Fprintf(f, "%d %d %d\n", attempt, offs[0], offs[1])
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		a.log.Warn("record where the log starts", "workload", id, "attempt", attempt, "err", err)
	}
}

// LogStart returns the offset in the workload's stream log ("stdout" or
// "stderr") here where attempt's output begins, and whether that attempt
// opened its logs here. The first record of an attempt counts: a restore
// that failed and was tried again opened them at the same end.
func (a *Agent) LogStart(id string, attempt int, stream string) (int64, bool, error) {
	p, err := a.LogPath(id, stream)
	if err != nil {
		return 0, false, err
	}
	f, err := os.Open(filepath.Join(filepath.Dir(p), startsFile))
	if os.IsNotExist(err) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("log start of %s: %w", id, err)
	}
	defer f.Close()
	col := 1
	if stream == "stderr" {
		col = 2
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 3 || fs[0] != strconv.Itoa(attempt) {
			continue
		}
		off, err := strconv.ParseInt(fs[col], 10, 64)
		if err != nil || off < 0 {
			return 0, false, fmt.Errorf("log start of %s: %s: bad line %q", id, f.Name(), sc.Text())
		}
		return off, true, nil
	}
	return 0, false, sc.Err()
}
