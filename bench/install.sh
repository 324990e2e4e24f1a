#!/usr/bin/env bash
# Benchmark: `soci-agent install --no-start` from a loopback mirror vs the
# shell baseline `curl | tee >(sha256sum) | tar xz`, both measured in this
# run on the same archive and server. Prints the median wall-time ratio
# (goal <= 1.0) and soci-agent's peak RSS for 64 MiB and 512 MiB archives
# (goal: flat within 10%, under 16 MiB).
# Usage: bash bench/install.sh [runs]   (default 7 runs per side)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}

source tests/agent-bin.sh
bin=$(agent_bin)
work=$(mktemp -d /tmp/soci-agent-bench.XXXXXX)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT
ver=0.15.0

make_release() { # $1 = MiB of payload; writes the archive under $work/mirror-$1
  local mib=$1 dir="$work/mirror-$1/v$ver" pkg="$work/pkg-$1"
  mkdir -p "$dir" "$pkg"
  local half=$((mib / 2))
  head -c $((half * 1048576)) /dev/urandom > "$pkg/soci-snapshotter-grpc"
  head -c $(((mib - half) * 1048576)) /dev/urandom > "$pkg/soci"
  echo licenses > "$pkg/THIRD_PARTY_LICENSES"; echo notice > "$pkg/NOTICE.md"
  chmod 755 "$pkg/soci-snapshotter-grpc" "$pkg/soci"
  local name="soci-snapshotter-$ver-linux-amd64-static.tar.gz"
  tar -C "$pkg" -c soci-snapshotter-grpc soci THIRD_PARTY_LICENSES NOTICE.md | gzip -1 > "$dir/$name"
  (cd "$dir" && sha256sum "$name" > "$name.sha256sum")
}

# measure CMD...: prints "wall_seconds max_rss_kib" of the command's process tree
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t = time.monotonic()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"{time.monotonic() - t:.4f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
PY
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

serve() { # $1 = directory
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 --directory "$1" "$port" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/" >/dev/null 2>&1 && return; sleep 0.05; done
}

run_agent() { # $1 = mib, $2 = run index; prints "wall rss"
  local root="$work/root-$1-$2"; mkdir -p "$root/etc"
  measure "$bin" install --root "$root" --no-start --arch amd64 --containerd-version 2.2 --soci-version $ver \
    --release-url "http://127.0.0.1:$port" --decompressor none --log-level error
  rm -rf "$root"
}

run_shell() { # $1 = mib, $2 = run index
  local out="$work/shell-$1-$2"; mkdir -p "$out"
  local url="http://127.0.0.1:$port/v$ver/soci-snapshotter-$ver-linux-amd64-static.tar.gz"
  measure bash -c "set -o pipefail; curl -fsS '$url' | tee >(sha256sum > '$out/sum') | tar -xz -C '$out'"
  rm -rf "$out"
}

echo "soci-agent install benchmark ($runs runs per side, loopback mirror)"
for mib in 64 512; do
  make_release $mib
  serve "$work/mirror-$mib"
  agent_times=() agent_rss=() shell_times=()
  for i in $(seq "$runs"); do
    read -r t r < <(run_agent $mib "$i"); agent_times+=("$t"); agent_rss+=("$r")
    if [ "$mib" = 64 ]; then read -r t _ < <(run_shell $mib "$i"); shell_times+=("$t"); fi
  done
  a=$(printf '%s\n' "${agent_times[@]}" | median)
  rss=$(printf '%s\n' "${agent_rss[@]}" | sort -n | tail -n1)
  if [ "$mib" = 64 ]; then
    s=$(printf '%s\n' "${shell_times[@]}" | median)
    printf '64 MiB: soci-agent median %.3fs, shell baseline median %.3fs, ratio %.2f (goal <= 1.0)\n' "$a" "$s" "$(echo "$a $s" | awk '{print $1/$2}')"
    rss64=$rss
  else
    printf '512 MiB: soci-agent median %.3fs\n' "$a"
    rss512=$rss
  fi
  rm -rf "$work/mirror-$mib" "$work/pkg-$mib"
done
printf 'peak RSS: 64 MiB archive %d KiB, 512 MiB archive %d KiB, growth %.1f%% (goal: < 10%%, < 16384 KiB)\n' \
  "$rss64" "$rss512" "$(echo "$rss64 $rss512" | awk '{print ($2-$1)*100/$1}')"
