package debpkg

import (
	"bytes"
	"compress/gzip"
	"crypto/md5"
	"embed"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// files are the package's hand-written parts: the unit, the default
// config, the maintainer scripts, the copyright file.
//
//go:embed files
var files embed.FS

// Maintainer is the control file's Maintainer field.
const Maintainer = "pcluster developers <pcluster@users.noreply.github.com>"

// Conffiles are the package's configuration files: dpkg keeps an
// operator's edits to them across upgrades.
var Conffiles = []string{"/etc/pcluster/pclusterd.json"}

// layout maps files/ names to where they are installed, with their mode.
var layout = []struct {
	src, dst string
	mode     fs.FileMode
}{
	{"pclusterd.service", "lib/systemd/system/pclusterd.service", 0o644},
	{"pclusterd.json", "etc/pcluster/pclusterd.json", 0o644},
	{"copyright", "usr/share/doc/pcluster/copyright", 0o644},
	{"postinst", "DEBIAN/postinst", 0o755},
	{"postrm", "DEBIAN/postrm", 0o755},
}

// Options say what to build and where.
type Options struct {
	Root    string // the repository: cmd/, docs/
	Out     string // directory the .deb is written to
	Version string // Debian version (GitVersion)
	Date    string // YYYY-MM-DD of the commit: the man pages' and the changelog's date
	// BuildFlags are go build's flags; nil means ReleaseBuildFlags.
	BuildFlags []string
}

// ReleaseBuildFlags build the binaries as Debian wants them: PIE
// (lintian's hardening-no-pie), stripped (unstripped-binary-or-object),
// without the build machine's paths (-trimpath).
var ReleaseBuildFlags = []string{"-buildmode=pie", "-trimpath", "-ldflags=-s -w"}

// Build compiles the four binaries, generates the man pages and bash
// completions from them and the docs, and writes
// Out/pcluster_VERSION_amd64.deb with dpkg-deb. It returns the path.
func Build(o Options) (string, error) {
	stage, err := os.MkdirTemp("", "pcluster-deb-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(stage)
	if err := os.Chmod(stage, 0o755); err != nil {
		return "", err
	}
	bin := filepath.Join(stage, "usr/bin")
	flags := o.BuildFlags
	if flags == nil {
		flags = ReleaseBuildFlags
	}
	build := exec.Command("go", append(append([]string{"build"}, flags...), "-o", bin+"/", "./cmd/...")...)
	build.Dir = o.Root
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %w\n%s", err, out)
	}
	tools, err := ReadTools(bin)
	if err != nil {
		return "", err
	}
	write := func(rel string, data []byte, mode fs.FileMode) error {
		p := filepath.Join(stage, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, data, mode); err != nil {
			return err
		}
		return os.Chmod(p, mode) // not the umask's
	}
	for _, p := range Pages {
		roff, err := p.Roff(o.Root, tools[p.Name], o.Version, o.Date)
		if err != nil {
			return "", err
		}
		if err := write(fmt.Sprintf("usr/share/man/man%d/%s.%d.gz", p.Section, p.Name, p.Section), roff, 0o644); err != nil {
			return "", err
		}
	}
	for name, t := range tools {
		if err := write("usr/share/bash-completion/completions/"+name, []byte(Completion(t)), 0o644); err != nil {
			return "", err
		}
	}
	for _, f := range layout {
		data, err := files.ReadFile("files/" + f.src)
		if err != nil {
			return "", err
		}
		if err := write(f.dst, data, f.mode); err != nil {
			return "", err
		}
	}
	cl, err := changelog(o.Version, o.Date)
	if err != nil {
		return "", err
	}
	if err := write("usr/share/doc/pcluster/changelog.gz", cl, 0o644); err != nil {
		return "", err
	}
	if err := write("DEBIAN/conffiles", []byte(strings.Join(Conffiles, "\n")+"\n"), 0o644); err != nil {
		return "", err
	}
	sums, size, err := md5sums(stage)
	if err != nil {
		return "", err
	}
	if err := write("DEBIAN/md5sums", sums, 0o644); err != nil {
		return "", err
	}
	if err := write("DEBIAN/control", []byte(control(o.Version, size)), 0o644); err != nil {
		return "", err
	}
	// Directories dpkg-deb creates from MkdirAll are 0755 whatever the
	// umask was: set them so.
	filepath.WalkDir(stage, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o755)
		}
		return nil
	})
	deb := filepath.Join(o.Out, fmt.Sprintf("pcluster_%s_amd64.deb", o.Version))
	out, err := exec.Command("dpkg-deb", "--root-owner-group", "-Zxz", "--build", stage, deb).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("dpkg-deb: %w\n%s", err, out)
	}
	return deb, nil
}

// control is the DEBIAN/control file; size is the Installed-Size in KiB.
func control(version string, size int64) string {
	return fmt.Sprintf(`Package: pcluster
Version: %s
Architecture: amd64
Maintainer: %s
Installed-Size: %d
Depends: libc6 (>= 2.34)
Section: admin
Priority: optional
Description: move running Linux processes between hosts
 pfreeze stops a running process and writes its complete state
 (registers, memory, files, signals, credentials) as a byte stream; pthaw
 turns that stream back into the same running process, here or on another
 host, with the same PID when it is free.
 .
 pclusterd, on every host, keeps a gossip membership and a raft-replicated
 scheduler state, runs the workloads placed on its host and moves them to
 other hosts (migration, drain); pclusterctl is the operator's CLI.
`, version, Maintainer, size)
}

// changelog is the package's changelog (Debian policy 12.7), gzipped.
func changelog(version, date string) ([]byte, error) {
	t, err := time.Parse("2006-01-02", date)
	if err != nil {
		return nil, fmt.Errorf("changelog date %q: %w", date, err)
	}
	text := fmt.Sprintf("pcluster (%s) unstable; urgency=medium\n\n  * Built from the pcluster repository (see git log for the changes).\n\n -- %s  %s\n",
		version, Maintainer, t.Format("Mon, 02 Jan 2006 15:04:05 -0700"))
	var z bytes.Buffer
	w, _ := gzip.NewWriterLevel(&z, gzip.BestCompression)
	w.Write([]byte(text))
	if err := w.Close(); err != nil {
		return nil, err
	}
	return z.Bytes(), nil
}

// md5sums lists every file outside DEBIAN/ (dpkg --verify uses it) and
// returns their total size in KiB.
func md5sums(stage string) ([]byte, int64, error) {
	var lines []string
	var size int64
	err := filepath.WalkDir(stage, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(stage, p)
		if rel == "DEBIAN" && d.IsDir() {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		size += int64(len(data))
		lines = append(lines, fmt.Sprintf("%x  %s", md5.Sum(data), rel))
		return nil
	})
	sort.Strings(lines)
	return []byte(strings.Join(lines, "\n") + "\n"), (size + 1023) / 1024, err
}
