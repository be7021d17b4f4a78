package stream

import (
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/term"
)

// progressEvery bounds how often the progress line is redrawn.
const progressEvery = 250 * time.Millisecond

// progress draws one status line ("label  12.0 MiB  310.2 MiB/s  40%  ETA
// 0:03") on stderr, and only when stderr is a terminal: logs and pipes never
// see it. It is driven by the reads or writes it counts: no goroutine.
type progress struct {
	out   io.Writer // nil: draw nothing
	label string
	total int64 // 0: unknown
	n     int64
	start time.Time
	last  time.Time
	drawn bool
	now   func() time.Time
}

func newProgress(label string, total int64) progress {
	var out io.Writer
	if term.IsTerminal(int(os.Stderr.Fd())) {
		out = os.Stderr
	}
	return progress{out: out, label: label, total: total, now: time.Now}
}

func (p *progress) add(n int) {
	if p.out == nil || n <= 0 {
		return
	}
	now := p.now()
	if p.start.IsZero() {
		p.start = now
	}
	p.n += int64(n)
	if now.Sub(p.last) >= progressEvery {
		p.last = now
		p.draw(now, false)
	}
}

func (p *progress) draw(now time.Time, final bool) {
	line := fmt.Sprintf("%s  %s", p.label, formatBytes(float64(p.n)))
	if el := now.Sub(p.start).Seconds(); el > 0 {
		rate := float64(p.n) / el
		line += fmt.Sprintf("  %s/s", formatBytes(rate))
		if p.total > 0 {
			line += fmt.Sprintf("  %d%%", min(100, p.n*100/p.total))
			if !final && rate > 0 && p.n < p.total {
				eta := time.Duration(float64(p.total-p.n) / rate * float64(time.Second))
				line += "  ETA " + formatETA(eta)
			}
		}
	}
	end := ""
	if final {
		end = "\n"
	}
	fmt.Fprintf(p.out, "\r\033[K%s%s", line, end)
	p.drawn = true
}

// finish draws the final line and moves to the next line.
func (p *progress) finish() {
	if p.out == nil || (!p.drawn && p.n == 0) {
		return
	}
	p.draw(p.now(), true)
	p.out = nil
}

func formatBytes(b float64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%.0f B", b)
	}
	div, exp := float64(unit), 0
	for n := b / unit; n >= unit && exp < 4; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", b/div, "KMGTP"[exp])
}

func formatETA(d time.Duration) string {
	s := int64(d.Round(time.Second).Seconds())
	if s >= 3600 {
		return fmt.Sprintf("%d:%02d:%02d", s/3600, s/60%60, s%60)
	}
	return fmt.Sprintf("%d:%02d", s/60, s%60)
}

// ProgressWriter counts what passes through it and draws a progress line on
// stderr when stderr is a terminal. total is the expected byte count, or 0
// when unknown (then no ETA). Wrapping a Sink keeps its handshake working:
// pass the ProgressWriter to NewWriter.
type ProgressWriter struct {
	w io.Writer
	p progress
}

// NewProgressWriter wraps w.
func NewProgressWriter(w io.Writer, label string, total int64) *ProgressWriter {
	return &ProgressWriter{w: w, p: newProgress(label, total)}
}

func (pw *ProgressWriter) Write(b []byte) (int, error) {
	n, err := pw.w.Write(b)
	pw.p.add(n)
	return n, err
}

// Finish draws the final line. It does not close the wrapped writer.
func (pw *ProgressWriter) Finish() { pw.p.finish() }

// String names the wrapped writer when it has a name.
func (pw *ProgressWriter) String() string {
	if s, ok := pw.w.(fmt.Stringer); ok {
		return s.String()
	}
	return "progress"
}

func (pw *ProgressWriter) link(k []byte, encrypted bool) error {
	if l, ok := pw.w.(linker); ok {
		return l.link(k, encrypted)
	}
	return nil
}

func (pw *ProgressWriter) bodyDone() {
	if d, ok := pw.w.(bodyDoner); ok {
		d.bodyDone()
	}
}

// ProgressReader is the reading counterpart of ProgressWriter.
type ProgressReader struct {
	r io.Reader
	p progress
}

// NewProgressReader wraps r.
func NewProgressReader(r io.Reader, label string, total int64) *ProgressReader {
	return &ProgressReader{r: r, p: newProgress(label, total)}
}

func (pr *ProgressReader) Read(b []byte) (int, error) {
	n, err := pr.r.Read(b)
	pr.p.add(n)
	return n, err
}

// Finish draws the final line.
func (pr *ProgressReader) Finish() { pr.p.finish() }

// String names the wrapped reader when it has a name.
func (pr *ProgressReader) String() string {
	if s, ok := pr.r.(fmt.Stringer); ok {
		return s.String()
	}
	return "progress"
}

func (pr *ProgressReader) link(k []byte, encrypted bool) error {
	if l, ok := pr.r.(linker); ok {
		return l.link(k, encrypted)
	}
	return nil
}

func (pr *ProgressReader) bodyEOF() {
	if e, ok := pr.r.(bodyEnder); ok {
		e.bodyEOF()
	}
}

func (pw *ProgressWriter) peerNonce() []byte {
	if n, ok := pw.w.(peerNoncer); ok {
		return n.peerNonce()
	}
	return nil
}

func (pr *ProgressReader) peerNonce() []byte {
	if n, ok := pr.r.(peerNoncer); ok {
		return n.peerNonce()
	}
	return nil
}
