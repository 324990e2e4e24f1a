#!/usr/bin/env bash
# Benchmark: `soci-agent prefetch --concurrency 4` (CRI PullImage) vs
# `ctr -n k8s.io images pull` of the same images one after another, from a
# loopback docker-registry, each side on a fresh containerd (private root,
# state and socket; CRI snapshotter overlayfs, or native where overlay mounts
# fail). Images: 8 x ~64 MiB in 4 random (incompressible) gzip layers.
# Prints both wall times and the ratio (goal <= 0.5).
# Usage: bash bench/prefetch.sh [runs]   (default 1 run per side; the median is used)
# Env: IMAGES (8), LAYERS (4), LAYER_MIB (16), CONCURRENCY (4).
# Needs root, containerd + ctr, docker-registry, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
images=${IMAGES:-8} layers=${LAYERS:-4} layer_mib=${LAYER_MIB:-16} concurrency=${CONCURRENCY:-4}

for tool in containerd ctr docker-registry curl python3 sha256sum; do
  command -v "$tool" >/dev/null || { echo "bench/prefetch.sh: needs $tool" >&2; exit 1; }
done
source tests/agent-bin.sh
bin=$(agent_bin)
bin=$(realpath "$bin")
work=$(mktemp -d /tmp/soci-agent-bench-prefetch.XXXXXX)
source bench/lib.sh
registry_pid= containerd_pid=

stop_containerd() {
  if [ -n "$containerd_pid" ]; then
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
    containerd_pid=
  fi
  # Anything containerd left mounted under the work dir.
  unmount_work
}
cleanup() {
  stop_containerd
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

start_registry

echo "building and pushing $images images x $layers layers x $layer_mib MiB ..." >&2
refs=()
tmp="$work/build"
mkdir -p "$tmp"
for i in $(seq "$images"); do
  repo="bench/app$i"
  layers_json= diff_ids=
  for l in $(seq "$layers"); do
    rm -rf "$tmp/rootfs" && mkdir -p "$tmp/rootfs/data"
    head -c $((layer_mib * 1048576)) /dev/urandom >"$tmp/rootfs/data/layer$l.bin"
    tar -C "$tmp/rootfs" -cf "$tmp/layer.tar" data
    gzip -1 -c "$tmp/layer.tar" >"$tmp/layer.tar.gz"
    diff_ids+="${diff_ids:+,}\"sha256:$(sha "$tmp/layer.tar")\""
    digest=$(push_blob "$repo" "$tmp/layer.tar.gz")
    size=$(stat -c %s "$tmp/layer.tar.gz")
    layers_json+="${layers_json:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$digest\",\"size\":$size}"
  done
  printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "$diff_ids" >"$tmp/config.json"
  config_digest=$(push_blob "$repo" "$tmp/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
    "$config_digest" "$(stat -c %s "$tmp/config.json")" "$layers_json" >"$tmp/manifest.json"
  curl -fsS -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$tmp/manifest.json" "http://$host/v2/$repo/manifests/1" -o /dev/null
  refs+=("$host/$repo:1")
done
rm -rf "$tmp"

# The snapshotter both sides use: overlayfs when an overlay mount works here.
probe_snapshotter

mkdir -p "$work/node"   # prefetch's --root: an empty tree (no SOCI config to read)
now() { date +%s.%N; }
agent_times=() ctr_times=()
for r in $(seq "$runs"); do
  d="$work/agent-$r"; start_containerd "$d"
  t=$(now)
  "$bin" --log-level error prefetch --concurrency "$concurrency" --root "$work/node" \
    --cri-endpoint "unix://$d/c.sock" --containerd-address "$d/c.sock" "${refs[@]}" >"$d/report"
  agent_times+=("$(python3 -c "print($(now) - $t)")")
  tail -n1 "$d/report" >&2
  stop_containerd; rm -rf "$d"

  d="$work/ctr-$r"; start_containerd "$d"
  t=$(now)
  for ref in "${refs[@]}"; do
    ctr --address "$d/c.sock" -n k8s.io images pull --plain-http --snapshotter "$snapshotter" "$ref" >/dev/null
  done
  ctr_times+=("$(python3 -c "print($(now) - $t)")")
  stop_containerd; rm -rf "$d"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
a=$(median "${agent_times[@]}") c=$(median "${ctr_times[@]}")
python3 - "$a" "$c" "$images" "$layers" "$layer_mib" "$concurrency" "$snapshotter" <<'PY'
import sys
a, c = float(sys.argv[1]), float(sys.argv[2])
images, layers, mib, conc, snap = sys.argv[3:8]
print(f"{images} images x {layers} x {mib} MiB, snapshotter {snap}")
print(f"soci-agent prefetch --concurrency {conc}: {a:.2f} s")
print(f"ctr -n k8s.io images pull, one by one: {c:.2f} s")
print(f"ratio {a / c:.2f} (goal <= 0.5)")
PY
