// Package procfs reads the parts of /proc/PID that describe a process to be
// frozen: its memory map, status, stat fields, threads, children and open
// file descriptors. It only parses; it never changes the process.
package procfs

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Path returns /proc/PID/name.
func Path(pid int, name string) string { return "/proc/" + strconv.Itoa(pid) + "/" + name }

// Mapping is one line of /proc/PID/smaps with its VmFlags.
type Mapping struct {
	Start, End uint64
	Perms      string // "rwxp" / "r--s" ...
	Offset     uint64
	Dev        string
	Inode      uint64
	Path       string
	VmFlags    string
}

// Readable, Writable, Exec and Shared decode Perms.
func (m *Mapping) Readable() bool { return m.Perms[0] == 'r' }
func (m *Mapping) Writable() bool { return m.Perms[1] == 'w' }
func (m *Mapping) Exec() bool     { return m.Perms[2] == 'x' }
func (m *Mapping) Shared() bool   { return m.Perms[3] == 's' }

// Maps parses /proc/PID/smaps.
func Maps(pid int) ([]Mapping, error) {
	f, err := os.Open(Path(pid, "smaps"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "VmFlags:") {
			if len(out) > 0 {
				out[len(out)-1].VmFlags = strings.TrimSpace(strings.TrimPrefix(line, "VmFlags:"))
			}
			continue
		}
		// Header lines start with a hex range; field lines with "Name:".
		dash := strings.IndexByte(line, '-')
		sp := strings.IndexByte(line, ' ')
		if dash <= 0 || sp < dash || strings.HasSuffix(line[:sp], ":") {
			continue
		}
		m, err := parseMapLine(line)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", Path(pid, "smaps"), err)
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

// MapsLayout parses /proc/PID/maps: the areas as Maps has them, without
// VmFlags. It walks no page tables (smaps does, to count each area's
// pages: tens of milliseconds for a GiB).
func MapsLayout(pid int) ([]Mapping, error) {
	b, err := os.ReadFile(Path(pid, "maps"))
	if err != nil {
		return nil, err
	}
	var out []Mapping
	for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if line == "" {
			continue
		}
		m, err := parseMapLine(line)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", Path(pid, "maps"), err)
		}
		out = append(out, m)
	}
	return out, nil
}

func parseMapLine(line string) (Mapping, error) {
	var m Mapping
	f := strings.Fields(line)
	if len(f) < 5 {
		return m, fmt.Errorf("malformed line %q", line)
	}
	lo, hi, _ := strings.Cut(f[0], "-")
	var err error
	if m.Start, err = strconv.ParseUint(lo, 16, 64); err != nil {
		return m, fmt.Errorf("malformed line %q", line)
	}
	if m.End, err = strconv.ParseUint(hi, 16, 64); err != nil {
		return m, fmt.Errorf("malformed line %q", line)
	}
	m.Perms = f[1]
	if len(m.Perms) != 4 {
		return m, fmt.Errorf("malformed line %q", line)
	}
	m.Offset, _ = strconv.ParseUint(f[2], 16, 64)
	m.Dev = f[3]
	m.Inode, _ = strconv.ParseUint(f[4], 10, 64)
	if len(f) > 5 {
		// The path is everything after the inode column, spaces included.
		idx := 0
		for i := 0; i < 5; i++ {
			idx += strings.Index(line[idx:], f[i]) + len(f[i])
		}
		m.Path = strings.TrimLeft(line[idx:], " ")
	}
	return m, nil
}

// Status parses /proc/PID/status into key → value.
func Status(pid int) (map[string]string, error) {
	return parseStatus(Path(pid, "status"))
}

func parseStatus(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out, nil
}

// ThreadStatus parses /proc/PID/task/TID/status.
func ThreadStatus(pid, tid int) (map[string]string, error) {
	return parseStatus(fmt.Sprintf("/proc/%d/task/%d/status", pid, tid))
}

// Stat returns the fields of /proc/PID/stat after the command name, so
// that StatField(f, 3) is field 3 (state) in proc(5) numbering.
func Stat(pid int) ([]string, error) {
	b, err := os.ReadFile(Path(pid, "stat"))
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("%s: malformed", Path(pid, "stat"))
	}
	return strings.Fields(string(b[i+1:])), nil
}

// StatField returns field n (1-based, proc(5) numbering, n >= 3) as uint64.
func StatField(f []string, n int) uint64 {
	if n-3 >= len(f) || n < 3 {
		return 0
	}
	v, _ := strconv.ParseUint(f[n-3], 10, 64)
	return v
}

// Tasks lists the thread ids of pid, sorted.
func Tasks(pid int) ([]int, error) {
	ents, err := os.ReadDir(Path(pid, "task"))
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		if t, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, t)
		}
	}
	sort.Ints(out)
	return out, nil
}

// Children lists the child processes of every thread of pid.
func Children(pid int) ([]int, error) {
	tasks, err := Tasks(pid)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, t))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out, nil
}

// FDInfo describes one open file descriptor.
type FDInfo struct {
	Fd    int
	Link  string // readlink /proc/PID/fd/N
	Pos   int64
	Flags uint32
	MntID int
	// Extra holds the lines of fdinfo beyond pos/flags/mnt_id/ino, which
	// describe eventfds, epoll registrations and the like.
	Extra []string
}

// FDs lists the open file descriptors of pid, sorted by number.
func FDs(pid int) ([]FDInfo, error) {
	dir := Path(pid, "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []FDInfo
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("fd %d: %w", fd, err)
		}
		info := FDInfo{Fd: fd, Link: link}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
		if err != nil {
			return nil, fmt.Errorf("fd %d: %w", fd, err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, _ := strings.Cut(line, ":")
			v = strings.TrimSpace(v)
			switch k {
			case "pos":
				info.Pos, _ = strconv.ParseInt(v, 10, 64)
			case "flags":
				f, _ := strconv.ParseUint(v, 8, 32)
				info.Flags = uint32(f)
			case "mnt_id":
				info.MntID, _ = strconv.Atoi(v)
			case "ino", "":
			default:
				info.Extra = append(info.Extra, line)
			}
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Fd < out[j].Fd })
	return out, nil
}

// Hex parses a hexadecimal /proc field such as CapEff.
func Hex(s string) uint64 {
	v, _ := strconv.ParseUint(s, 16, 64)
	return v
}

// Rlimit is one line of /proc/PID/limits.
type Rlimit struct{ Cur, Max uint64 }

// Limits parses /proc/PID/limits; entry i is resource i (RLIMIT_CPU = 0).
// Reading them with prlimit(2) would need CAP_SYS_RESOURCE for another
// user's process; /proc only needs ptrace access.
func Limits(pid int) ([]Rlimit, error) {
	b, err := os.ReadFile(Path(pid, "limits"))
	if err != nil {
		return nil, err
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) < 2 {
		return nil, fmt.Errorf("%s: malformed", Path(pid, "limits"))
	}
	var out []Rlimit
	for _, line := range lines[1:] {
		// "%-25s %-20s %-20s %-10s": the name has spaces, the columns are fixed.
		if len(line) < 68 {
			return nil, fmt.Errorf("%s: malformed line %q", Path(pid, "limits"), line)
		}
		cur, err1 := parseLimit(line[26:47])
		max, err2 := parseLimit(line[47:68])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%s: malformed line %q", Path(pid, "limits"), line)
		}
		out = append(out, Rlimit{Cur: cur, Max: max})
	}
	return out, nil
}

func parseLimit(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if s == "unlimited" {
		return ^uint64(0), nil
	}
	return strconv.ParseUint(s, 10, 64)
}

// NSIDs parses a line of /proc/PID/status that lists an id in every PID
// namespace from the procfs's own down to the process's (NSpid, NStgid,
// NSpgid, NSsid): the first is the number here, the last the innermost.
// An id that a namespace cannot see (a group led from outside it) is 0.
func NSIDs(st map[string]string, key string) ([]int, error) {
	f := strings.Fields(st[key])
	if len(f) == 0 {
		return nil, fmt.Errorf("status: no %s", key)
	}
	out := make([]int, len(f))
	for i, s := range f {
		v, err := strconv.Atoi(s)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("status: malformed %s: %q", key, st[key])
		}
		out[i] = v
	}
	return out, nil
}

// PidNS returns the PID namespace of pid, as its ns/pid link reads
// ("pid:[4026531836]").
func PidNS(pid int) (string, error) {
	return os.Readlink(Path(pid, "ns/pid"))
}

// UnescapeMount undoes the octal escapes of a path in
// /proc/PID/mountinfo (\040 for a space).
func UnescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Reader returns the thread through which pid's state is read from /proc
// (maps, fds, cwd, auxv, namespaces) and its memory reached: pid itself,
// or, when its main thread has ended (pthread_exit) while others run on,
// its first live thread. The exited main thread is a zombie whose /proc
// entries are empty or unreadable (the memory, fd table and fs it shared
// are no longer its own), while every thread's /proc/TID shows the
// process's. 0 when pid has no live thread.
func Reader(pid int) int {
	if threadAlive(pid, pid) {
		return pid
	}
	tasks, err := Tasks(pid)
	if err != nil {
		return 0
	}
	for _, t := range tasks {
		if t != pid && threadAlive(pid, t) {
			return t
		}
	}
	return 0
}

// threadAlive reports whether thread tid of pid exists and is not a
// zombie or dead.
func threadAlive(pid, tid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}
