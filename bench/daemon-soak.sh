#!/usr/bin/env bash
# Soak: `soci-agent daemon` for LOOPS reconciles (default 1000) at a short
# interval (--interval 0.01) on a tree built by `soci-agent install --root
# --no-start --archive`, with one [prefetch] image (pin = true) that is a
# cache hit on every warm cycle (a real containerd with CRI on private paths,
# the image pushed to a loopback docker-registry), /metrics scraped and the
# status socket read every 100 loops. Each loop runs doctor's checks, the
# drift check (plan::build) and, in the background, the warm cycle.
# Prints RSS (VmRSS) after a warm-up of 50 loops and at the end (goal:
# growth under 1 MiB), and CPU time (utime + stime) per loop.
# Usage: bash bench/daemon-soak.sh [loops]
# Env: INTERVAL (0.01), SOCI_AGENT_BIN (default: the release build).
# Needs root, containerd + ctr, docker-registry, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
loops=${1:-1000}
interval=${INTERVAL:-0.01}
warmup=50

for tool in containerd ctr docker-registry curl python3 sha256sum; do
  command -v "$tool" >/dev/null || { echo "bench/daemon-soak.sh: needs $tool" >&2; exit 1; }
done
if [ -n "${SOCI_AGENT_BIN:-}" ]; then
  bin=$SOCI_AGENT_BIN
else
  source tests/agent-bin.sh
  bin=$(agent_bin)
fi
work=$(mktemp -d /tmp/soci-agent-bench-soak.XXXXXX)
source bench/lib.sh
# The agent runs from a private copy: install copies it into the tree and
# drift compares the two, so a rebuild meanwhile must not change it.
cp "$bin" "$work/soci-agent"; bin=$work/soci-agent
registry_pid= containerd_pid= daemon_pid=

cleanup() {
  for pid in $daemon_pid $containerd_pid $registry_pid; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  unmount_work
  rm -rf "$work"
}
trap cleanup EXIT

# --- a loopback registry with one small image -------------------------------------------------
start_registry
b="$work/build"; mkdir -p "$b/rootfs/data"
head -c 65536 /dev/urandom >"$b/rootfs/data/blob.bin"
tar -C "$b/rootfs" -cf "$b/layer.tar" data && gzip -1 -c "$b/layer.tar" >"$b/layer.tar.gz"
layer=$(push_blob soak/app "$b/layer.tar.gz")
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$(sha "$b/layer.tar")" >"$b/config.json"
config=$(push_blob soak/app "$b/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
  "$config" "$(stat -c %s "$b/config.json")" "$layer" "$(stat -c %s "$b/layer.tar.gz")" >"$b/manifest.json"
curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  --data-binary "@$b/manifest.json" "http://$host/v2/soak/app/manifests/1" -o /dev/null
image=$host/soak/app:1

# --- containerd with CRI on private paths -----------------------------------------------------
probe_snapshotter
c="$work/c"
start_containerd "$c"

# --- an installed node tree -------------------------------------------------------------------
rel="$work/release"; mkdir -p "$rel"
printf '#!/bin/sh\necho "soci-snapshotter-grpc version v0.15.0 soak"\n' >"$rel/soci-snapshotter-grpc"
printf '#!/bin/sh\necho "soci version v0.15.0 soak"\n' >"$rel/soci"
echo "licenses" >"$rel/THIRD_PARTY_LICENSES"; echo "notice" >"$rel/NOTICE.md"
chmod 755 "$rel/soci-snapshotter-grpc" "$rel/soci"
archive="$work/soci-snapshotter-0.15.0-linux-amd64-static.tar.gz"
tar -C "$rel" -czf "$archive" soci-snapshotter-grpc soci THIRD_PARTY_LICENSES NOTICE.md
(cd "$work" && sha256sum "$(basename "$archive")" >"$archive.sha256sum")
root="$work/root"
mkdir -p "$root/etc/containerd" "$root/usr/bin" "$root/etc/kubernetes/kubelet" "$root/etc/soci-agent"
printf 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n' >"$root/etc/os-release"
cp tests/data/containerd/debian-default/input.toml "$root/etc/containerd/config.toml"
printf '#!/bin/sh\nexec gzip "$@"\n' >"$root/usr/bin/unpigz"; chmod 755 "$root/usr/bin/unpigz"
echo '{}' >"$root/etc/kubernetes/kubelet/config.json"
"$bin" --log-level warn install --no-start --root "$root" --archive "$archive" >/dev/null
mport=$(free_port)
cat >"$root/etc/soci-agent/config.toml" <<EOF
[daemon]
metrics_address = "127.0.0.1:$mport"

[prefetch]
images = ["$image"]
pin = true
EOF

# --- the soak ---------------------------------------------------------------------------------
"$bin" --log-level warn daemon --root "$root" --interval "$interval" --state-socket "$work/d.sock" \
  --containerd-socket "$c/c.sock" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
status() { "$bin" daemon --query --state-socket "$work/d.sock" 2>/dev/null || echo '{}'; }
field() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"v": v}))' "$1"; }
reconciles() { status | field 'v.get("reconciles", 0)'; }
wait_loops() { # $1: reconciles to reach
  while :; do
    kill -0 "$daemon_pid" 2>/dev/null || { echo "daemon died:"; cat "$work/daemon.log"; exit 1; }
    n=$(reconciles); [ "$n" -ge "$1" ] && break
    sleep 0.2
  done
}
rss_kib() { awk '$1 == "VmRSS:" {print $2}' "/proc/$daemon_pid/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$daemon_pid/stat"; }
hz=$(getconf CLK_TCK)

wait_loops "$warmup"
n0=$(reconciles) rss0=$(rss_kib) cpu0=$(cpu_ticks) t0=$(date +%s.%N)
target=$((n0 + loops)) next=$((n0 + 100))
while :; do
  n=$(reconciles)
  [ "$n" -ge "$target" ] && break
  if [ "$n" -ge "$next" ]; then
    curl -fsS "http://127.0.0.1:$mport/metrics" >/dev/null
    next=$((next + 100))
  fi
  kill -0 "$daemon_pid" 2>/dev/null || { echo "daemon died:"; cat "$work/daemon.log"; exit 1; }
  sleep 0.1
done
n1=$(reconciles) rss1=$(rss_kib) cpu1=$(cpu_ticks) t1=$(date +%s.%N)
final=$(status)
pulls=$(echo "$final" | field 'v["images"][0]["pulls"]')
state=$(echo "$final" | field 'v["images"][0]["state"]')
fails=$(echo "$final" | field "[c[\"id\"] for c in v[\"checks\"] if c[\"verdict\"] == \"fail\"]")
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=

python3 - "$n0" "$n1" "$rss0" "$rss1" "$cpu0" "$cpu1" "$hz" "$t0" "$t1" "$pulls" "$state" "$fails" <<'EOF'
import sys
n0, n1, rss0, rss1, cpu0, cpu1, hz = map(int, sys.argv[1:8])
t0, t1 = float(sys.argv[8]), float(sys.argv[9])
pulls, state, fails = sys.argv[10], sys.argv[11], sys.argv[12]
loops = n1 - n0
print(f"loops: {loops} reconciles in {t1 - t0:.1f} s ({(t1 - t0) / loops * 1000:.1f} ms each, wall)")
print(f"image: {state} (pulls since start: {pulls}); failing checks at the end: {fails} (no SOCI serves this containerd)")
print(f"RSS: {rss0 / 1024:.1f} MiB after warm-up -> {rss1 / 1024:.1f} MiB after {loops} loops "
      f"(growth {(rss1 - rss0) / 1024:+.2f} MiB; goal < 1 MiB)")
print(f"CPU: {(cpu1 - cpu0) / hz:.2f} s for {loops} loops = {(cpu1 - cpu0) / hz / loops * 1000:.1f} ms per loop")
EOF
