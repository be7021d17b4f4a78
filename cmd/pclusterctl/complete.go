package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

// completeCommand is the hidden command the bash completion runs to
// complete a workload or node argument (internal/debpkg/completion.go):
//
//	pclusterctl __complete [-address A] [-key-file F] workloads|nodes [PREFIX]
//
// It prints the workload IDs and names, or the node names, that start
// with PREFIX, one a line, from the contacted node's replica (a stale read:
// no leader round trip) within completeTimeout. It is not in the help: on
// any error it prints nothing and exits 1, so that a tab press never
// prints an error into the command line being typed.
const completeCommand = "__complete"

// completeTimeout bounds a completion: a tab press must not hang on a
// node that does not answer.
const completeTimeout = 2 * time.Second

func complete(ctx context.Context, args []string, stdout io.Writer) int {
	fs := flag.NewFlagSet("pclusterctl "+completeCommand, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	address := fs.String("address", "", "")
	keyFile := fs.String("key-file", "", "")
	if fs.Parse(args) != nil || fs.NArg() < 1 || fs.NArg() > 2 {
		return exitUsage
	}
	what, prefix := fs.Arg(0), fs.Arg(1)
	client, err := api.NewFromEnv(*address, *keyFile)
	if err != nil {
		return exitUsage
	}
	client.Stale = true
	client.Wait = 0
	ctx, cancel := context.WithTimeout(ctx, completeTimeout)
	defer cancel()
	var words []string
	switch what {
	case "workloads":
		ws, err := client.Workloads(ctx)
		if err != nil {
			return exitFailed
		}
		for _, w := range ws {
			words = append(words, w.ID, w.Name)
		}
	case "nodes":
		ns, err := client.Nodes(ctx)
		if err != nil {
			return exitFailed
		}
		for _, n := range ns {
			words = append(words, n.Name)
		}
	default:
		return exitUsage
	}
	sort.Strings(words)
	last := ""
	for _, w := range words {
		// A word that would not survive the shell's word list (a name
		// with a space or a control character) is left out.
		if w == "" || w == last || !strings.HasPrefix(w, prefix) || shown(w) != w || strings.ContainsAny(w, " '\"\\$`") {
			continue
		}
		last = w
		fmt.Fprintln(stdout, w)
	}
	return exitOK
}
