// Package debpkg builds pcluster's Debian package: the four binaries, man
// pages and bash completions generated from the docs and from the
// binaries' own flag definitions (their -h output, so neither can drift
// from the flags), the systemd unit and the default config. `make deb`
// runs it through debpkg/mkdeb; dpkg-deb writes the archive.
package debpkg

import (
	"bufio"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
)

// Flag is one flag as the flag package prints it for -h.
type Flag struct {
	Name  string // without the dash
	Arg   string // the value's placeholder ("string", "duration", "file"); "" for a bool
	Usage string // the usage text, with " (default X)" when the flag package adds it
}

// ParseDefaults reads the output of flag.PrintDefaults:
//
//	-name type
//	  	usage, continued
//	  	on further lines (default X)
//	-x	short bool usage
//
// and returns the flags in order. Other lines (a "usage:" header) are
// skipped.
func ParseDefaults(help string) []Flag {
	var flags []Flag
	sc := bufio.NewScanner(strings.NewReader(help))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "  -"):
			head, usage, _ := strings.Cut(line[3:], "\t")
			name, arg, _ := strings.Cut(head, " ")
			flags = append(flags, Flag{Name: name, Arg: arg, Usage: strings.TrimSpace(usage)})
		case strings.HasPrefix(line, "    \t") && len(flags) > 0:
			f := &flags[len(flags)-1]
			f.Usage = strings.TrimSpace(f.Usage + " " + strings.TrimSpace(line))
		}
	}
	return flags
}

// Command is one pclusterctl command as its help lists it.
type Command struct {
	Name     string // "node drain"
	Synopsis string // "node drain [-deadline 1h|...] NODE"
	Summary  string // "move every workload off NODE"
	Flags    []Flag // its own flags (ParseDefaults of "pclusterctl NAME -h")
}

// commandLine is "  SYNOPSIS   summary": two or more spaces part them.
var commandLine = regexp.MustCompile(`^  (\S.*?)\s{2,}(\S.*)$`)

// ParseCommands reads the command list of "pclusterctl help": the lines
// after "commands:" up to the first blank line. A command's name is the
// leading lower-case words of its synopsis.
func ParseCommands(help string) []Command {
	var cmds []Command
	in := false
	sc := bufio.NewScanner(strings.NewReader(help))
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "commands:" {
			in = true
			continue
		}
		if !in {
			continue
		}
		if strings.TrimSpace(line) == "" {
			break
		}
		m := commandLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		var words []string
		for _, w := range strings.Fields(m[1]) {
			if !isWord(w) {
				break
			}
			words = append(words, w)
		}
		if len(words) > 0 {
			cmds = append(cmds, Command{Name: strings.Join(words, " "), Synopsis: m[1], Summary: m[2]})
		}
	}
	return cmds
}

func isWord(w string) bool {
	for _, r := range w {
		if (r < 'a' || r > 'z') && r != '-' {
			return false
		}
	}
	return w != "" && w[0] != '-'
}

// helpOutput runs bin with args and returns what it printed (stdout and
// stderr: the flag package prints to stderr). -h exits 0; "pclusterctl
// help" exits 2 (usage): both are accepted when something was printed.
func helpOutput(bin string, args ...string) (string, error) {
	out, err := exec.Command(bin, args...).CombinedOutput()
	if len(out) == 0 {
		return "", fmt.Errorf("%s %s printed no help: %v", bin, strings.Join(args, " "), err)
	}
	if ee, ok := err.(*exec.ExitError); err != nil && (!ok || ee.ExitCode() > 2) {
		return "", fmt.Errorf("%s %s: %w", bin, strings.Join(args, " "), err)
	}
	return string(out), nil
}

// Tool is what the package documents of one binary: its flags and, for
// pclusterctl and pclusterd, its commands with theirs.
type Tool struct {
	Name     string
	Flags    []Flag    // top-level flags
	Commands []Command // subcommands ("keygen"; pclusterctl's nouns and verbs)
	// Ask is the hidden command that lists the cluster's workloads or
	// nodes for the completion ("__complete": `pclusterctl __complete
	// workloads|nodes PREFIX`); "" for a tool that has none.
	Ask string
}

// ReadTools asks the four binaries in binDir for their flags and commands.
func ReadTools(binDir string) (map[string]Tool, error) {
	tools := map[string]Tool{}
	for _, name := range []string{"pfreeze", "pthaw", "pclusterd"} {
		h, err := helpOutput(binDir+"/"+name, "-h")
		if err != nil {
			return nil, err
		}
		tools[name] = Tool{Name: name, Flags: ParseDefaults(h)}
	}
	h, err := helpOutput(binDir+"/pclusterd", "keygen", "-h")
	if err != nil {
		return nil, err
	}
	d := tools["pclusterd"]
	d.Commands = []Command{{Name: "keygen", Synopsis: "keygen [-out DIR]", Summary: "write a new cluster key and its CA", Flags: ParseDefaults(h)}}
	tools["pclusterd"] = d

	h, err = helpOutput(binDir+"/pclusterctl", "help")
	if err != nil {
		return nil, err
	}
	ctl := Tool{Name: "pclusterctl", Commands: ParseCommands(h), Ask: "__complete"}
	if len(ctl.Commands) == 0 {
		return nil, fmt.Errorf("pclusterctl help: no commands found in %q", h)
	}
	for i, c := range ctl.Commands {
		h, err := helpOutput(binDir+"/pclusterctl", append(strings.Fields(c.Name), "-h")...)
		if err != nil {
			return nil, err
		}
		ctl.Commands[i].Flags = ParseDefaults(h)
	}
	tools["pclusterctl"] = ctl
	return tools, nil
}
