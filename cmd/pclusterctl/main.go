// Command pclusterctl is the operator CLI. It talks to pclusterd only
// through the API client package (cluster/api).
//
// Exit codes: 0 success, 1 the cluster refused or failed the request,
// 2 bad usage, 3 not found, 4 no daemon or no leader reachable,
// 5 authentication failed (not the cluster's key).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"

	"github.com/pcluster/pcluster/cluster/api"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitNotFound    = 3
	exitUnavailable = 4
	exitAuth        = 5
)

// command is one noun-verb; each lives in its own file.
type command interface {
	name() string // "members", "node status", ...
	synopsis() string
	flags(fs *flag.FlagSet)
	run(ctx context.Context, e *env, args []string) error
}

var commands = []command{&membersCmd{}, &nodeStatusCmd{}, &nodeEligibilityCmd{}, &runCmd{}, &psCmd{}, &statusCmd{}, &stopCmd{}, &logsCmd{},
	&migrateCmd{}, &migrationsCmd{}, &nodeDrainCmd{}, &nodeDrainCmd{short: true}, &eventsCmd{}, &balanceStatusCmd{}, &balanceSetCmd{}}

// env is what every command gets: the client and the output settings.
type env struct {
	client *api.Client
	json   bool
	stdout io.Writer
}

// usageError is bad input; it exits 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := realMain(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func realMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd, rest := lookup(args)
	if cmd == nil {
		if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" {
			usage(stderr)
			return exitUsage
		}
		fmt.Fprintf(stderr, "pclusterctl: unknown command %q (run pclusterctl help)\n", strings.Join(args, " "))
		return exitUsage
	}
	fs := flag.NewFlagSet("pclusterctl "+cmd.name(), flag.ContinueOnError)
	address := fs.String("address", "", "pclusterd socket path or host:port (default $"+api.EnvAddress+" or "+api.DefaultSocket+")")
	keyFile := fs.String("key-file", "", "cluster key file, for a host:port address (default $"+api.EnvKeyFile+")")
	asJSON := fs.Bool("json", false, "print JSON")
	cmd.flags(fs)
	fs.SetOutput(io.Discard) // one line for a bad flag, from us; the list only for -h
	if err := fs.Parse(rest); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "usage: pclusterctl %s\n\n", cmd.synopsis())
			fs.SetOutput(stderr)
			fs.PrintDefaults()
			return exitOK
		}
		fmt.Fprintf(stderr, "pclusterctl %s: %v\n", cmd.name(), err)
		return exitUsage
	}
	client, err := api.NewFromEnv(*address, *keyFile)
	if err != nil {
		fmt.Fprintln(stderr, "pclusterctl:", err)
		return exitUsage
	}
	err = cmd.run(ctx, &env{client: client, json: *asJSON, stdout: stdout}, fs.Args())
	if err == nil {
		return exitOK
	}
	fmt.Fprintf(stderr, "pclusterctl %s: %v\n", cmd.name(), err)
	var ue usageError
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case api.IsNotFound(err):
		return exitNotFound
	case api.IsAuth(err):
		return exitAuth
	case api.IsUnavailable(err):
		return exitUnavailable
	}
	return exitFailed
}

// lookup finds the longest command name that prefixes args.
func lookup(args []string) (command, []string) {
	var best command
	bestLen := 0
	for _, c := range commands {
		words := strings.Fields(c.name())
		if len(words) <= len(args) && len(words) > bestLen && strings.Join(args[:len(words)], " ") == c.name() {
			best, bestLen = c, len(words)
		}
	}
	if best == nil {
		return nil, nil
	}
	return best, args[bestLen:]
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: pclusterctl COMMAND [flags] [args]")
	fmt.Fprintln(w, "\ncommands:")
	cs := append([]command{}, commands...)
	sort.Slice(cs, func(i, j int) bool { return cs[i].name() < cs[j].name() })
	for _, c := range cs {
		fmt.Fprintf(w, "  %s\n", c.synopsis())
	}
	fmt.Fprintln(w, "\nevery command takes -address, -key-file and -json; pclusterctl COMMAND -h for its flags")
}
