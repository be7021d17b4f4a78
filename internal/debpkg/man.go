package debpkg

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"

	"github.com/cpuguy83/go-md2man/v2/md2man"
)

// Part is one piece of a doc that goes into a man page: the section under
// Heading (a markdown heading line such as "## pthaw"; "" for the text
// before the file's first "## ") up to the next heading of the same or a
// higher level.
type Part struct {
	Doc     string // path from the repository root
	Heading string
}

// Page is one man page. Its NAME line is the command's Go package comment
// ("Command pfreeze captures ..."), its SYNOPSIS the fenced block that
// opens its first part, its DESCRIPTION the parts, its OPTIONS (and
// COMMANDS) the binary's own -h output.
type Page struct {
	Name    string
	Section int
	Parts   []Part
}

// Pages are the man pages the package carries.
var Pages = []Page{
	{Name: "pfreeze", Section: 1, Parts: []Part{{"docs/pfreeze.md", "## pfreeze"}}},
	{Name: "pthaw", Section: 1, Parts: []Part{{"docs/pfreeze.md", "## pthaw"}}},
	{Name: "pclusterctl", Section: 1, Parts: []Part{{"docs/pclusterctl.md", ""}, {"docs/pclusterctl.md", "## Reaching a node"},
		{"docs/pclusterctl.md", "## Commands"}, {"docs/pclusterctl.md", "## Exit codes"}}},
	{Name: "pclusterd", Section: 8, Parts: []Part{{"docs/cluster.md", ""}, {"docs/cluster.md", "## Running"},
		{"docs/cluster.md", "## Drain"}, {"docs/packaging.md", "## The unit"}, {"docs/packaging.md", "## Files"}}},
}

// section returns the lines under heading in doc (see Part).
func section(doc, heading string) (string, error) {
	lines := strings.Split(doc, "\n")
	start, level := -1, 2
	if heading == "" {
		// The text after the title, before the first "## ".
		start, level = 0, 2
		if len(lines) > 0 && strings.HasPrefix(lines[0], "# ") {
			start = 1
		}
	} else {
		level = strings.Index(heading, " ")
		for i, l := range lines {
			if l == heading {
				start = i + 1
				break
			}
		}
		if start < 0 {
			return "", fmt.Errorf("no heading %q", heading)
		}
	}
	fence := false
	end := len(lines)
	for i := start; i < len(lines); i++ {
		l := lines[i]
		if strings.HasPrefix(l, "```") {
			fence = !fence
		}
		if !fence && strings.HasPrefix(l, "#") {
			if n := strings.Index(l, " "); n > 0 && n <= level && strings.Trim(l[:n], "#") == "" {
				end = i
				break
			}
		}
	}
	return strings.Join(lines[start:end], "\n"), nil
}

// splitSynopsis takes the fenced block that opens text out of it.
func splitSynopsis(text string) (synopsis, rest string) {
	t := strings.TrimLeft(text, "\n")
	if !strings.HasPrefix(t, "```") {
		return "", text
	}
	nl := strings.Index(t, "\n")
	end := strings.Index(t[nl+1:], "\n```")
	if nl < 0 || end < 0 {
		return "", text
	}
	body := t[nl+1 : nl+1+end]
	rest = t[nl+1+end+4:]
	if i := strings.Index(rest, "\n"); i >= 0 {
		rest = rest[i+1:]
	} else {
		rest = ""
	}
	return body, rest
}

// summary returns the package comment of cmd/NAME after "Command NAME ",
// up to its first full stop: "captures a running process to a snapshot
// stream".
func summary(root, name string) (string, error) {
	f, err := parser.ParseFile(token.NewFileSet(), filepath.Join(root, "cmd", name, "main.go"), nil, parser.PackageClauseOnly|parser.ParseComments)
	if err != nil {
		return "", err
	}
	if f.Doc == nil {
		return "", fmt.Errorf("cmd/%s: no package comment", name)
	}
	s := strings.Join(strings.Fields(f.Doc.Text()), " ")
	s, ok := strings.CutPrefix(s, "Command "+name+" ")
	if !ok {
		return "", fmt.Errorf("cmd/%s: the package comment does not start with %q", name, "Command "+name)
	}
	s = strings.TrimPrefix(s, "is ")
	if i := strings.Index(s, ". "); i >= 0 {
		s = s[:i]
	}
	return strings.TrimSuffix(s, "."), nil
}

// escape makes flag usage text literal markdown.
func escape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune("\\`*_[]<>#|", r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// writeFlags writes flags as a definition list (md2man: .TP).
func writeFlags(b *bytes.Buffer, flags []Flag) {
	for _, f := range flags {
		fmt.Fprintf(b, "**-%s**", escape(f.Name))
		if f.Arg != "" {
			fmt.Fprintf(b, " *%s*", escape(f.Arg))
		}
		fmt.Fprintf(b, "\n: %s\n\n", escape(f.Usage))
	}
}

// Markdown assembles page p from the docs under root and the tool's flags.
func (p Page) Markdown(root string, t Tool, version, date string) ([]byte, error) {
	sum, err := summary(root, p.Name)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	manual := "User Commands"
	if p.Section == 8 {
		manual = "System Administration"
	}
	fmt.Fprintf(&b, "%s %d %q %q %q\n===\n\n", p.Name, p.Section, date, "pcluster "+version, manual)
	fmt.Fprintf(&b, "# NAME\n%s - %s\n\n", p.Name, escape(sum))
	var desc strings.Builder
	for i, part := range p.Parts {
		doc, err := os.ReadFile(filepath.Join(root, part.Doc))
		if err != nil {
			return nil, err
		}
		text, err := section(string(doc), part.Heading)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", part.Doc, err)
		}
		if i == 0 {
			syn, rest := splitSynopsis(text)
			if syn == "" {
				return nil, fmt.Errorf("%s %q: does not open with a fenced synopsis block", part.Doc, part.Heading)
			}
			fmt.Fprintf(&b, "# SYNOPSIS\n```\n%s\n```\n\n", syn)
			text = rest
		}
		if part.Heading != "" && i > 0 {
			fmt.Fprintf(&desc, "\n# %s\n", strings.ToUpper(strings.TrimLeft(part.Heading, "# ")))
		}
		desc.WriteString(text)
		desc.WriteString("\n")
	}
	fmt.Fprintf(&b, "# DESCRIPTION\n%s\n", desc.String())
	common := commonFlags(t.Commands)
	if len(t.Flags) > 0 || len(common) > 0 {
		b.WriteString("# OPTIONS\n")
		writeFlags(&b, t.Flags)
		if len(t.Flags) == 0 {
			b.WriteString("Every command takes:\n\n")
			writeFlags(&b, common)
		}
	}
	if len(t.Commands) > 0 {
		b.WriteString("# COMMAND FLAGS\n")
		for _, c := range t.Commands {
			fmt.Fprintf(&b, "### %s %s\n%s\n\n", p.Name, escape(c.Synopsis), escape(c.Summary))
			var own []Flag
			for _, f := range c.Flags {
				if !hasFlag(common, f.Name) {
					own = append(own, f)
				}
			}
			writeFlags(&b, own)
		}
	}
	b.WriteString("# SEE ALSO\n")
	var see []string
	for _, q := range Pages {
		if q.Name != p.Name {
			see = append(see, fmt.Sprintf("**%s**(%d)", q.Name, q.Section))
		}
	}
	b.WriteString(strings.Join(see, ", ") + "\n")
	return b.Bytes(), nil
}

// commonFlags are the flags every command has (pclusterctl's -address,
// -key-file, -json); none when there is only one command.
func commonFlags(cmds []Command) []Flag {
	if len(cmds) < 2 {
		return nil
	}
	var common []Flag
	for _, f := range cmds[0].Flags {
		all := true
		for _, c := range cmds[1:] {
			all = all && hasFlag(c.Flags, f.Name)
		}
		if all {
			common = append(common, f)
		}
	}
	return common
}

func hasFlag(flags []Flag, name string) bool {
	for _, f := range flags {
		if f.Name == name {
			return true
		}
	}
	return false
}

// Roff renders page p as a gzipped man page (maximum compression, no
// name or time in the gzip header, as Debian policy 12.1 asks).
func (p Page) Roff(root string, t Tool, version, date string) ([]byte, error) {
	md, err := p.Markdown(root, t, version, date)
	if err != nil {
		return nil, fmt.Errorf("man page %s(%d): %w", p.Name, p.Section, err)
	}
	var z bytes.Buffer
	w, _ := gzip.NewWriterLevel(&z, gzip.BestCompression)
	w.Write(md2man.Render(md))
	if err := w.Close(); err != nil {
		return nil, err
	}
	return z.Bytes(), nil
}
