package debpkg

import (
	"fmt"
	"sort"
	"strings"
)

// Completion returns a bash completion script for t, generated from its
// flags and commands: the command words (pclusterctl node drain), then
// the flags of the command typed (or the top-level ones); a value of a
// -pid flag completes PIDs, a number or duration nothing, anything else
// file names. A tool with an Ask command completes from the cluster: a
// command whose synopsis ends in an ID argument takes workload IDs and
// names, one ending in NODE (and a -node flag) node names, each the
// output of `TOOL ASK [-address A] [-key-file F] workloads|nodes PREFIX`
// with the -address and -key-file already typed (nothing when it fails).
func Completion(t Tool) string {
	fn := "_" + strings.ReplaceAll(t.Name, "-", "_")
	var b strings.Builder
	fmt.Fprintf(&b, "# bash completion for %s: generated from its -h output by internal/debpkg (make deb).\n", t.Name)
	fmt.Fprintf(&b, "%s() {\n", fn)
	b.WriteString("    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}\n")
	b.WriteString("    local typed=\" ${COMP_WORDS[*]:1:COMP_CWORD-1} \" cmd= flags= c\n")
	// Longest command names first, so "node drain" wins over "drain".
	cmds := append([]Command(nil), t.Commands...)
	sort.SliceStable(cmds, func(i, j int) bool {
		return len(strings.Fields(cmds[i].Name)) > len(strings.Fields(cmds[j].Name))
	})
	if len(cmds) > 0 {
		var names []string
		for _, c := range cmds {
			names = append(names, fmt.Sprintf("%q", c.Name))
		}
		fmt.Fprintf(&b, "    for c in %s; do\n", strings.Join(names, " "))
		b.WriteString("        if [[ $typed == \" $c \"* ]]; then cmd=$c; break; fi\n    done\n")
	}
	all := append([]Flag(nil), t.Flags...)
	b.WriteString("    case $cmd in\n")
	// No command yet: the next command word after what was typed.
	b.WriteString("    \"\")\n        case $typed in\n")
	for _, prefix := range commandPrefixes(t.Commands) {
		words := nextWords(t.Commands, prefix)
		top := ""
		if prefix == "" {
			top = flagWords(t.Flags)
		}
		fmt.Fprintf(&b, "        %q) flags=%q ;;\n", " "+prefix+" ", strings.TrimSpace(strings.Join(words, " ")+" "+top))
	}
	fmt.Fprintf(&b, "        *) flags=%q ;;\n", flagWords(t.Flags))
	b.WriteString("        esac ;;\n")
	for _, c := range t.Commands {
		fmt.Fprintf(&b, "    %q) flags=%q ;;\n", c.Name, flagWords(c.Flags))
		all = append(all, c.Flags...)
	}
	b.WriteString("    esac\n")
	// A flag's value.
	byKind := map[string][]string{}
	seen := map[string]bool{}
	for _, f := range all {
		if f.Arg == "" || seen[f.Name] {
			continue
		}
		seen[f.Name] = true
		kind := "file"
		switch {
		case f.Name == "pid":
			kind = "pid"
		case f.Name == "node" && t.Ask != "":
			kind = "node"
		case f.Arg == "int" || f.Arg == "duration" || f.Arg == "N" || f.Arg == "uint":
			kind = "none"
		}
		byKind[kind] = append(byKind[kind], "-"+f.Name)
	}
	b.WriteString("    case $prev in\n")
	if v := byKind["node"]; len(v) > 0 {
		fmt.Fprintf(&b, "    %s) COMPREPLY=($(compgen -W \"$(%s_ask nodes)\" -- \"$cur\")); return ;;\n", strings.Join(v, "|"), fn)
	}
	if v := byKind["pid"]; len(v) > 0 {
		fmt.Fprintf(&b, "    %s) COMPREPLY=($(compgen -W \"$(ps -eo pid=)\" -- \"$cur\")); return ;;\n", strings.Join(v, "|"))
	}
	if v := byKind["none"]; len(v) > 0 {
		fmt.Fprintf(&b, "    %s) COMPREPLY=(); return ;;\n", strings.Join(v, "|"))
	}
	if v := byKind["file"]; len(v) > 0 {
		fmt.Fprintf(&b, "    %s) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n", strings.Join(v, "|"))
	}
	b.WriteString("    esac\n")
	if t.Ask != "" {
		// A command's argument, unless a flag is being typed.
		args := map[string][]string{}
		for _, c := range t.Commands {
			if kind := argKind(c.Synopsis); kind != "" {
				args[kind] = append(args[kind], fmt.Sprintf("%q", c.Name))
			}
		}
		b.WriteString("    if [[ $cur != -* ]]; then\n        case $cmd in\n")
		for _, kind := range []string{"workloads", "nodes"} {
			if len(args[kind]) > 0 {
				fmt.Fprintf(&b, "        %s) COMPREPLY=($(compgen -W \"$(%s_ask %s)\" -- \"$cur\")); return ;;\n",
					strings.Join(args[kind], "|"), fn, kind)
			}
		}
		b.WriteString("        esac\n    fi\n")
	}
	b.WriteString("    COMPREPLY=($(compgen -W \"$flags\" -- \"$cur\"))\n}\n")
	if t.Ask != "" {
		// The cluster's words, asked of the node the command line names.
		fmt.Fprintf(&b, "%s_ask() {\n", fn)
		b.WriteString("    local i j v w a=()\n")
		b.WriteString("    for ((i = 1; i < COMP_CWORD; i++)); do\n        w=${COMP_WORDS[i]}\n")
		b.WriteString("        case $w in\n")
		// bash splits "-address=h:p" into -address = h : p
		// (COMP_WORDBREAKS): the value is put back together.
		b.WriteString("        -address|--address|-key-file|--key-file)\n")
		b.WriteString("            j=$((i + 1)); v=${COMP_WORDS[j]}\n")
		b.WriteString("            if [[ $v == = ]]; then j=$((j + 1)); v=${COMP_WORDS[j]}; fi\n")
		b.WriteString("            if [[ ${COMP_WORDS[j+1]} == : ]]; then v+=:${COMP_WORDS[j+2]}; fi\n")
		b.WriteString("            a+=(\"$w=$v\") ;;\n")
		b.WriteString("        -address=*|--address=*|-key-file=*|--key-file=*) a+=(\"$w\") ;;\n")
		b.WriteString("        esac\n    done\n")
		fmt.Fprintf(&b, "    \"${COMP_WORDS[0]}\" %s \"${a[@]}\" \"$1\" \"$cur\" 2>/dev/null\n}\n", t.Ask)
	}
	fmt.Fprintf(&b, "complete -o default -F %s %s\n", fn, t.Name)
	return b.String()
}

// argKind is what a command's last argument names, from its synopsis:
// "workloads" for an ID ("status ID", "migrate ... ID|NAME"), "nodes"
// for a NODE ("node drain ... NODE", "node status [NODE]"), else "".
func argKind(synopsis string) string {
	f := strings.Fields(synopsis)
	if len(f) < 2 {
		return ""
	}
	last := strings.Trim(f[len(f)-1], "[]")
	switch {
	case last == "ID" || strings.HasPrefix(last, "ID|"):
		return "workloads"
	case last == "NODE":
		return "nodes"
	}
	return ""
}

func flagWords(flags []Flag) string {
	var w []string
	for _, f := range flags {
		w = append(w, "-"+f.Name)
	}
	return strings.Join(w, " ")
}

// commandPrefixes are the proper prefixes of the command names, "" first:
// for pclusterctl "", "node".
func commandPrefixes(cmds []Command) []string {
	seen := map[string]bool{"": true}
	out := []string{""}
	for _, c := range cmds {
		w := strings.Fields(c.Name)
		for i := 1; i < len(w); i++ {
			p := strings.Join(w[:i], " ")
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	return out
}

// nextWords are the words that may follow prefix in a command name.
func nextWords(cmds []Command, prefix string) []string {
	n := len(strings.Fields(prefix))
	seen := map[string]bool{}
	var out []string
	for _, c := range cmds {
		w := strings.Fields(c.Name)
		if len(w) > n && strings.Join(w[:n], " ") == prefix && !seen[w[n]] {
			seen[w[n]] = true
			out = append(out, w[n])
		}
	}
	sort.Strings(out)
	return out
}
