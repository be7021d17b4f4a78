// Command mkdeb builds pcluster's Debian package (make deb):
//
//	go run ./internal/debpkg/mkdeb [-out DIR]
//
// It prints the path of pcluster_VERSION_amd64.deb.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/pcluster/pcluster/internal/debpkg"
)

func main() {
	out := flag.String("out", ".", "`directory` to write the .deb into")
	flag.Parse()
	version, date := debpkg.GitVersion(".")
	deb, err := debpkg.Build(debpkg.Options{Root: ".", Out: *out, Version: version, Date: date})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkdeb:", err)
		os.Exit(1)
	}
	fmt.Println(deb)
}
