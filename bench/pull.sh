#!/usr/bin/env bash
# Benchmark: CRI pull of a 1 GiB image through a per-connection rate limit,
# plain containerd vs SOCI parallel pull/unpack as soci-agent wires it, on one
# booted node (see bench/pull.rs). Prints both times and the ratio (goal <= 0.25).
# Usage (as root): bash bench/pull.sh      Env: PULL_LIMIT=25m PULL_LAYER_MIB=256
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx >/dev/null || { apt-get install -y -qq --no-install-recommends nginx; systemctl disable --now nginx 2>/dev/null || true; }
bash tests/real/build.sh >/dev/null
exec cargo bench --locked --bench pull
