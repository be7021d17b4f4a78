// Package demo holds demo.sh, the script `make demo` runs: a process
// frozen and thawed, moved over TCP, run by a single-node cluster, and
// moved off a node of a 3-node cluster by a drain. Its tests run the
// script and check that it shows what it says and leaves nothing behind,
// also when it is interrupted.
package demo
