// Package web holds pclusterd's status page: plain HTML, CSS and a little
// JavaScript, embedded in the binary (no build step). The page reads
// /ui/state for the tables and follows /ui/events (server-sent events from
// the cluster's event stream) to refresh them as things happen; the
// handlers are in package cluster (webui.go).
package web

import (
	"embed"
	"io/fs"
)

//go:embed static
var static embed.FS

// Files returns the page's files: index.html, style.css, app.js.
func Files() fs.FS {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree always has it
	}
	return sub
}
