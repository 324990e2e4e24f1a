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
registry_pid= containerd_pid=

stop_containerd() {
  if [ -n "$containerd_pid" ]; then
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
    containerd_pid=
  fi
  # Anything containerd left mounted under the work dir (deepest first).
  awk -v w="$work" 'index($2, w) == 1 {print length($2), $2}' /proc/self/mounts | sort -rn | cut -d' ' -f2- |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
cleanup() {
  stop_containerd
  if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
host=127.0.0.1:$port
mkdir -p "$work/registry/storage" "$work/hosts/$host"
cat >"$work/registry/config.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/registry/storage
http:
  addr: $host
EOF
docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 &
registry_pid=$!
for _ in $(seq 200); do curl -fsS "http://$host/v2/" >/dev/null 2>&1 && break; sleep 0.05; done
curl -fsS "http://$host/v2/" >/dev/null || { echo "registry did not start:"; cat "$work/registry/log"; exit 1; }
cat >"$work/hosts/$host/hosts.toml" <<EOF
server = "http://$host"
[host."http://$host"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
EOF

sha() { sha256sum "$1" | cut -d' ' -f1; }
push_blob() { # $1 repo, $2 file; prints the digest
  local digest="sha256:$(sha "$2")" location sep
  location=$(curl -fsS -X POST -o /dev/null -D - "http://$host/v2/$1/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" {print $2}')
  case $location in http*) ;; *) location="http://$host$location" ;; esac
  case $location in *\?*) sep='&' ;; *) sep='?' ;; esac
  curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$2" \
    "$location${sep}digest=$digest" -o /dev/null
  echo "$digest"
}

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
snapshotter=native
probe="$work/probe"; mkdir -p "$probe"/{l,u,w,m}
if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
  umount "$probe/m"; snapshotter=overlayfs
fi

start_containerd() { # $1 = dir (fresh)
  local d=$1
  mkdir -p "$d"
  cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/c.sock"
[ttrpc]
  address = "$d/c.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
[plugins."io.containerd.grpc.v1.cri"]
  disable_apparmor = true
  disable_cgroup = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "$snapshotter"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "$work/hosts"
EOF
  containerd --config "$d/config.toml" >"$d/log" 2>&1 &
  containerd_pid=$!
  for _ in $(seq 300); do
    ctr --address "$d/c.sock" plugins ls 2>/dev/null | awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" && $NF == "ok" {f=1} END {exit !f}' && return
    sleep 0.1
  done
  echo "containerd did not start:"; cat "$d/log"; exit 1
}

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
