package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table prints rows under a header, aligned.
func table(w io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.ReplaceAll(header, " ", "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func bytesHuman(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1fG", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.0fM", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%dK", b>>10)
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return shown(s)
}

// shown returns s as it may reach a terminal: unchanged when it is valid
// UTF-8 of printable characters and spaces, else Go-quoted ("a\nb",
// "\x1b[2J"). The daemon refuses control characters in names, commands and
// cwds, but arguments and env values may hold newlines, and messages come
// from agents: nothing the daemon answers may move the cursor or fake a
// line of output.
func shown(s string) string {
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

// commandLine is a workload's command and arguments as printed, each word
// through shown.
func commandLine(cmd string, args []string) string {
	words := make([]string, 0, 1+len(args))
	for _, a := range append([]string{cmd}, args...) {
		words = append(words, shown(a))
	}
	return strings.Join(words, " ")
}
