#!/usr/bin/env bash
# The pcluster demo (make demo): the seed's A.1.2 — a counting process is
# frozen to a snapshot file, halted, and thawed from the file; it carries on
# counting from where it stopped, with the same PID. Then it moves again,
# over TCP (loopback here, another host in real life), compressed and
# encrypted, with the -halt handshake. Then a single-node cluster
# (pclusterd -dev) runs a workload through pclusterctl. Last, a 3-node
# cluster, each pclusterd on a test "host" of its own (a network namespace,
# 198.19.0.0/24), drains a node: its counter moves to another node and
# goes on counting there, with no gap, as `pclusterctl logs` shows.
# Everything it starts is removed at the end or on Ctrl-C: processes,
# network namespaces, directories.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The target gets only stdin/stdout/stderr: a pipe some parent leaked to us
# beyond fd 2 would be one pfreeze refuses to carry.
for fd in $(ls /proc/$$/fd); do
	if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
bin=${PCLUSTER_BIN:-bin}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pcluster-demo.XXXXXX")
pid=""
thaw=""
daemon=""
daemons=""
devdir=""
lab="pcldemo$$"
hosts="a b c"
cleanup() {
	trap - EXIT INT TERM HUP
	[ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
	[ -n "$thaw" ] && kill "$thaw" 2>/dev/null || true
	[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
	# The 3-node cluster's daemons, then its workloads (they outlive
	# pclusterd by design): every process running our countforever.
	for d in $daemons; do kill "$d" 2>/dev/null || true; done
	for _ in $(seq 50); do
		alive=""
		for d in $daemons; do kill -0 "$d" 2>/dev/null && alive=1; done
		[ -z "$alive" ] && break
		sleep 0.1
	done
	for d in $daemons; do kill -9 "$d" 2>/dev/null || true; done
	for exe in /proc/[0-9]*/exe; do
		if [ "$(readlink "$exe" 2>/dev/null)" = "$tmp/countforever" ]; then
			p=${exe#/proc/}
			kill -9 "${p%/exe}" 2>/dev/null || true
		fi
	done
	wait 2>/dev/null || true
	# Their cgroups outlive them too (workloads outlive pclusterd).
	for h in $hosts; do
		"$bin/pclusterd" remove-cgroups -node "$h" -data-dir "$tmp/$h" 2>/dev/null || true
	done
	[ -n "$devdir" ] && "$bin/pclusterd" remove-cgroups -node demo -data-dir "$devdir" 2>/dev/null || true
	for h in $hosts sw; do
		[ -e "/run/netns/$lab-$h" ] && ip netns del "$lab-$h" 2>/dev/null || true
	done
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

gcc -O2 -o "$tmp/countforever" internal/fixture/src/countforever.c
echo "== start countforever (one number every 200 ms)"
"$tmp/countforever" 200 &
pid=$!
sleep 1.1
echo "== pfreeze -pid $pid -halt -dest snapshot"
"$bin/pfreeze" -pid "$pid" -halt -dest "$tmp/snapshot"
wait "$pid" 2>/dev/null || true
echo "   snapshot: $(stat -c %s "$tmp/snapshot") bytes; pid $pid is gone: $(kill -0 "$pid" 2>/dev/null && echo no || echo yes)"
echo "== pthaw -debug -src snapshot (first lines)"
"$bin/pthaw" -debug -src "$tmp/snapshot" > "$tmp/describe"
head -4 "$tmp/describe"
echo "== pthaw -src snapshot: the same process carries on"
"$bin/pthaw" -src "$tmp/snapshot" &
thaw=$!
sleep 1.1
echo "   restored pid: $(cat /proc/$thaw/task/*/children | tr -d ' ') (was $pid)"
pid=$(cat /proc/$thaw/task/*/children | tr -d ' ')
old=$thaw

# A migration: pthaw listens, pfreeze sends. The stream is compressed
# (auto: snappy where the link is slow enough) and sealed with AES-256-GCM;
# the original is killed only once pthaw has built the copy.
mkdir -m 700 "$tmp/keys"
(umask 077; head -c 32 /dev/urandom > "$tmp/keys/demo.key")
echo "== pthaw -src tcp:127.0.0.1:0 -keydir keys  (another host in real life)"
"$bin/pthaw" -src tcp:127.0.0.1:0 -keydir "$tmp/keys" 2> "$tmp/thaw.err" &
thaw=$!
port=""
for _ in $(seq 100); do
	port=$(sed -n 's/^pthaw: listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/thaw.err")
	[ -n "$port" ] && break
	sleep 0.05
done
echo "== pfreeze -pid $pid -halt -dest tcp:127.0.0.1:$port -compress auto -encrypt aes-gcm:keys/demo.key"
"$bin/pfreeze" -pid "$pid" -halt -dest "tcp:127.0.0.1:$port" -compress auto -encrypt "aes-gcm:$tmp/keys/demo.key"
sleep 1.1
# The first pthaw ends with its process, which pfreeze -halt killed once
# the new copy was built; the copy took the freed PID back.
echo "   moved pid: $(cat /proc/$thaw/task/*/children | tr -d ' ') (was $pid); the first copy has ended: $(kill -0 "$old" 2>/dev/null && echo no || echo yes)"
wait "$old" 2>/dev/null || true
kill "$thaw"
wait "$thaw" 2>/dev/null || true
thaw=""
pid=""

# The cluster's embedded default: a single-node pclusterd -dev, driven by
# pclusterctl through its local socket.
sock="$tmp/pclusterd.sock"
echo "== pclusterd -dev (single-node cluster, data in a temporary directory)"
TMPDIR="$tmp" "$bin/pclusterd" -dev -node demo -socket "$sock" -log-level error &
daemon=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
for d in "$tmp"/pclusterd-dev-*; do [ -d "$d" ] && devdir=$d; done
ctl() { cmd=$1; shift; "$bin/pclusterctl" "$cmd" -address "$sock" "$@"; }
# Up once the replicated state lists the node (gossip may list it first).
for _ in $(seq 100); do ctl node status demo >/dev/null 2>&1 && break; sleep 0.1; done
echo "== pclusterctl members"
ctl members
echo "== pclusterctl run -name counter -- countforever 500"
id=$(ctl run -json -name counter -- "$tmp/countforever" 500 | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1)
sleep 1.5
echo "== pclusterctl ps"
ctl ps
echo "== pclusterctl logs $id"
ctl logs "$id" | tail -3
echo "== pclusterctl stop $id"
ctl stop "$id"
kill "$daemon"
wait "$daemon" 2>/dev/null || true
daemon=""

# A 3-node cluster: each pclusterd in its own network namespace (a test
# "host"), the three joined by a bridge in a fourth, on 198.19.0.0/24 (the
# benchmarking range of RFC 2544: nothing real lives there).
echo "== three hosts: network namespaces $lab-a, -b, -c on a bridge, 198.19.0.1-3"
ip netns add "$lab-sw"
ip -n "$lab-sw" link add br0 type bridge
ip -n "$lab-sw" link set br0 up
i=0
for h in $hosts; do
	i=$((i + 1))
	ip netns add "$lab-$h"
	ip -n "$lab-sw" link add "p$h" type veth peer name eth0 netns "$lab-$h"
	ip -n "$lab-sw" link set "p$h" master br0 up
	ip -n "$lab-$h" addr add "198.19.0.$i/24" dev eth0
	ip -n "$lab-$h" link set eth0 up
	ip -n "$lab-$h" link set lo up
done
"$bin/pclusterd" keygen -out "$tmp/cluster" >/dev/null
echo "== pclusterd on each (gossip, raft and the TLS API on 198.19.0.N:7946-7948; -bootstrap-expect 3)"
i=0
for h in $hosts; do
	i=$((i + 1))
	join=""
	[ "$h" != a ] && join="-join 198.19.0.1:7946"
	# nsenter joins the network namespace only: one file system, as
	# separate hosts with their own data directories.
	# shellcheck disable=SC2086
	nsenter --net="/run/netns/$lab-$h" -- "$bin/pclusterd" -node "$h" -bind "198.19.0.$i:7946" \
		-data-dir "$tmp/$h" -socket "$tmp/$h.sock" -key-file "$tmp/cluster/cluster.key" \
		-bootstrap-expect 3 $join -log-level error 2>> "$tmp/$h.log" &
	daemons="$daemons $!"
done
on() { h=$1 cmd=$2; shift 2; "$bin/pclusterctl" "$cmd" -address "$tmp/$h.sock" "$@"; }
for _ in $(seq 300); do
	[ "$(on a members 2>/dev/null | grep -c alive)" = 3 ] && on a members 2>/dev/null | grep -q leader &&
		on a node status a >/dev/null 2>&1 && on a node status b >/dev/null 2>&1 &&
		on a node status c >/dev/null 2>&1 && break
	sleep 0.1
done
echo "== pclusterctl members"
on a members
echo "== pclusterctl run -node a -name counter -- countforever 200"
id=$(on a run -json -node a -name counter -- "$tmp/countforever" 200 | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1)
sleep 2
echo "== pclusterctl logs $id (on a)"
on b logs "$id" | tail -3
echo "== pclusterctl ps"
on b ps
echo "== pclusterctl drain a"
on b drain a
echo "== pclusterctl ps"
on b ps
sleep 1.5
new=$(on b status -json "$id" 2>/dev/null | sed -n 's/.*"node": *"\([^"]*\)".*/\1/p' | head -1)
echo "== pclusterctl logs $id (now on $new): the same process goes on counting"
on b logs "$id" | head -3
# The old node's log ends where the new one's begins: read both (the
# demo is the observer here; no node reads another's files).
last=$(tail -1 "$tmp/a/workloads/$id/stdout.log")
first=$(on b logs "$id" | head -1)
if [ "$first" = $((last + 1)) ]; then
	echo "   a's log ends at $last, $new's begins at $first: no gap, no repeat"
else
	echo "   a's log ends at $last, $new's begins at $first: NOT continuous" >&2
	exit 1
fi
on b stop "$id" >/dev/null
echo "== done"
