#!/usr/bin/env bash
# Benchmark: the snapshot cache (a data volume restored from a sealed builder)
# against a cold SOCI pull of the same 512 MiB image through a per-connection
# rate limit, in booted nodes (see bench/cache.rs). Prints the ratio (goal
# <= 0.1) and install/mount/verify times.
# Usage (as root): bash bench/cache.sh      Env: CACHE_LIMIT=25m CACHE_LAYER_MIB=128
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx >/dev/null || { apt-get install -y -qq --no-install-recommends nginx; systemctl disable --now nginx 2>/dev/null || true; }
bash tests/real/build.sh >/dev/null
exec cargo bench --locked --bench cache
