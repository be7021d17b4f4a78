package cluster

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// memberlistWriter turns memberlist's "[LEVEL] memberlist: msg" lines into
// slog records.
type memberlistWriter struct{ l *slog.Logger }

func (w memberlistWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	lvl := slog.LevelInfo
	for prefix, l := range map[string]slog.Level{"[DEBUG]": slog.LevelDebug, "[TRACE]": slog.LevelDebug - 4,
		"[INFO]": slog.LevelInfo, "[WARN]": slog.LevelWarn, "[ERR]": slog.LevelError, "[ERROR]": slog.LevelError} {
		if rest, ok := strings.CutPrefix(line, prefix); ok {
			lvl, line = l, strings.TrimSpace(rest)
			break
		}
	}
	line = strings.TrimPrefix(line, "memberlist: ")
	w.l.Log(context.Background(), lvl, line)
	return len(p), nil
}

func newMemberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(memberlistWriter{l.With("component", "memberlist")}, "", 0)
}

// hclogAdapter sends raft's hclog output to slog.
type hclogAdapter struct {
	l    *slog.Logger
	name string
	args []any
}

func newRaftLogger(l *slog.Logger) hclog.Logger {
	return &hclogAdapter{l: l.With("component", "raft"), name: "raft"}
}

func slogLevel(l hclog.Level) slog.Level {
	switch l {
	case hclog.Trace:
		return slog.LevelDebug - 4
	case hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	}
	return slog.LevelInfo
}

func (h *hclogAdapter) Log(level hclog.Level, msg string, args ...any) {
	for i, a := range args {
		// hclog.Fmt values are printf calls hclog would have made.
		if f, ok := a.(hclog.Format); ok && len(f) > 0 {
			if format, ok := f[0].(string); ok {
				args[i] = fmt.Sprintf(format, f[1:]...)
			}
		}
	}
	h.l.Log(context.Background(), slogLevel(level), msg, args...)
}
func (h *hclogAdapter) Trace(msg string, args ...any) { h.Log(hclog.Trace, msg, args...) }
func (h *hclogAdapter) Debug(msg string, args ...any) { h.Log(hclog.Debug, msg, args...) }
func (h *hclogAdapter) Info(msg string, args ...any)  { h.Log(hclog.Info, msg, args...) }
func (h *hclogAdapter) Warn(msg string, args ...any)  { h.Log(hclog.Warn, msg, args...) }
func (h *hclogAdapter) Error(msg string, args ...any) { h.Log(hclog.Error, msg, args...) }
func (h *hclogAdapter) enabled(l slog.Level) bool {
	return h.l.Enabled(context.Background(), l)
}
func (h *hclogAdapter) IsTrace() bool         { return h.enabled(slog.LevelDebug - 4) }
func (h *hclogAdapter) IsDebug() bool         { return h.enabled(slog.LevelDebug) }
func (h *hclogAdapter) IsInfo() bool          { return h.enabled(slog.LevelInfo) }
func (h *hclogAdapter) IsWarn() bool          { return h.enabled(slog.LevelWarn) }
func (h *hclogAdapter) IsError() bool         { return h.enabled(slog.LevelError) }
func (h *hclogAdapter) ImpliedArgs() []any    { return h.args }
func (h *hclogAdapter) Name() string          { return h.name }
func (h *hclogAdapter) SetLevel(hclog.Level)  {}
func (h *hclogAdapter) GetLevel() hclog.Level { return hclog.Info }
func (h *hclogAdapter) With(args ...any) hclog.Logger {
	return &hclogAdapter{l: h.l.With(args...), name: h.name, args: append(append([]any{}, h.args...), args...)}
}
func (h *hclogAdapter) Named(name string) hclog.Logger {
	return &hclogAdapter{l: h.l.With("sub", name), name: h.name + "." + name, args: h.args}
}
func (h *hclogAdapter) ResetNamed(name string) hclog.Logger {
	return &hclogAdapter{l: h.l, name: name, args: h.args}
}
func (h *hclogAdapter) StandardLogger(*hclog.StandardLoggerOptions) *log.Logger {
	return log.New(h.StandardWriter(nil), "", 0)
}
func (h *hclogAdapter) StandardWriter(*hclog.StandardLoggerOptions) io.Writer {
	return writerFunc(func(p []byte) (int, error) {
		h.l.Info(string(bytes.TrimSpace(p)))
		return len(p), nil
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
