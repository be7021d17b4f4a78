#!/usr/bin/env bash
# The pcluster demo (make demo): the seed's A.1.2 — a counting process is
# frozen to a snapshot file, halted, and thawed from the file; it carries on
# counting from where it stopped, with the same PID. Then it moves again,
# over TCP (loopback here, another host in real life), compressed and
# encrypted, with the -halt handshake. Then a single-node cluster
# (pclusterd -dev) runs a workload through pclusterctl.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The target gets only stdin/stdout/stderr: a pipe some parent leaked to us
# beyond fd 2 would be one pfreeze refuses to carry.
for fd in $(ls /proc/$$/fd); do
	if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
bin=bin
tmp=$(mktemp -d /tmp/pcluster-demo.XXXXXX)
pid=""
thaw=""
daemon=""
cleanup() {
	[ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
	[ -n "$thaw" ] && kill "$thaw" 2>/dev/null || true
	[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT

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
"$bin/pclusterd" -dev -socket "$sock" -log-level error &
daemon=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
ctl() { cmd=$1; shift; "$bin/pclusterctl" "$cmd" -address "$sock" "$@"; }
for _ in $(seq 100); do ctl members >/dev/null 2>&1 && break; sleep 0.1; done
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
echo "== done"
