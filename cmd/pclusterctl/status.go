package main

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/pcluster/pcluster/cluster/api"
)

type statusCmd struct{}

func (*statusCmd) name() string        { return "status" }
func (*statusCmd) synopsis() string    { return "status ID                one workload in detail" }
func (*statusCmd) flags(*flag.FlagSet) {}

func (*statusCmd) run(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usagef("status needs exactly one workload ID")
	}
	w, err := e.client.Workload(ctx, args[0])
	if err != nil {
		return err
	}
	if e.json {
		return printJSON(e.stdout, w)
	}
	fmt.Fprintf(e.stdout, "ID:        %s\nName:      %s\nCommand:   %s\nState:     %s (desired %s)\nNode:      %s (placed on %s)\n",
		w.ID, shown(w.Name), commandLine(w.Command, w.Args), shown(w.State), shown(w.Desired), dash(w.Node), shown(w.DesiredNode))
	pid := fmt.Sprint(w.PID)
	if w.NSPID > 0 && w.NSPID != w.PID {
		pid += fmt.Sprintf(" (%d in its PID namespace, whose init is %d)", w.NSPID, w.InitPID)
	}
	// A workload that never ended has no exit status (not 0).
	exit := "-"
	if !w.EndedAt.IsZero() {
		exit = strings.TrimSpace(fmt.Sprintf("%d %s", w.ExitCode, shown(w.Signal)))
	}
	fmt.Fprintf(e.stdout, "PID:       %s\nAttempt:   %d (restarts %d, policy %s)\nExit:      %s\nVIP:       %s\nMessage:   %s\nCreated:   %s\n",
		pid, w.Attempt, w.Restarts, shown(w.Restart), exit, vipWhere(w), dash(w.Message), ago(w.CreatedAt))
	if !w.StartedAt.IsZero() {
		fmt.Fprintf(e.stdout, "Started:   %s\n", ago(w.StartedAt))
	}
	if !w.EndedAt.IsZero() {
		fmt.Fprintf(e.stdout, "Ended:     %s\n", ago(w.EndedAt))
	}
	if w.MemoryMB > 0 || w.CPUMilli > 0 {
		var l []string
		if w.MemoryMB > 0 {
			l = append(l, "memory "+bytesHuman(w.MemoryMB<<20))
		}
		if w.CPUMilli > 0 {
			l = append(l, fmt.Sprintf("cpu %dm", w.CPUMilli))
		}
		fmt.Fprintf(e.stdout, "Limits:    %s\n", strings.Join(l, ", "))
	}
	if w.Fence != "" {
		fmt.Fprintf(e.stdout, "Fence:     %s\n", shown(w.Fence))
	}
	if w.Migrate != "" {
		fmt.Fprintf(e.stdout, "Migrate:   %s (the balancer leaves it where it is)\n", shown(w.Migrate))
	}
	if f := w.Failover; f != nil {
		how := "restarted from its command"
		if f.Checkpoint > 0 {
			how = fmt.Sprintf("restored from checkpoint %d, %v of work rolled back", f.Checkpoint, time.Duration(f.Age).Round(time.Millisecond))
		}
		fmt.Fprintf(e.stdout, "Failover:  %s from %s to %s: %s\n", ago(f.At), shown(f.From), shown(f.To), how)
	}
	return nil
}

// vipWhere says where a workload's VIP is: on the node running it, or on
// none (the agent adds it when the process starts and removes it when it
// ends or is frozen to move).
func vipWhere(w api.Workload) string {
	switch {
	case w.VIP == "":
		return "-"
	case w.State == "running" && w.Node != "":
		return shown(w.VIP) + " on " + shown(w.Node)
	default:
		return shown(w.VIP) + " (on no node: the workload is " + shown(w.State) + ")"
	}
}
