#!/usr/bin/env bash
# The main job, end to end, on any machine: builds soci-agent, makes a SOCI
# release archive with the real layout (a stand-in binary: the real one cannot
# be downloaded here), serves it from a loopback mirror, and installs it into
# a temporary --root: dry run, install, then a second install that must change
# nothing. Usage: bash tests/demo.sh [extra install flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

source tests/agent-bin.sh
bin=$(agent_bin)

work=$(mktemp -d /tmp/soci-agent-demo.XXXXXX)
root="$work/node" mirror="$work/mirror"
ver=0.15.0 arch=$(uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/')
name="soci-snapshotter-$ver-linux-$arch-static.tar.gz"
mkdir -p "$root/etc/containerd" "$root/usr/bin" "$mirror/v$ver" "$work/pkg"

# Stand-in release: the real release's four entries, flat, no ./ prefix.
printf '#!/bin/sh\necho "soci-snapshotter-grpc version v%s demo"\n' "$ver" > "$work/pkg/soci-snapshotter-grpc"
printf '#!/bin/sh\necho "soci version v%s demo"\n' "$ver" > "$work/pkg/soci"
echo "demo licenses" > "$work/pkg/THIRD_PARTY_LICENSES"
echo "demo notice" > "$work/pkg/NOTICE.md"
chmod 755 "$work/pkg/soci-snapshotter-grpc" "$work/pkg/soci"
tar -C "$work/pkg" -czf "$mirror/v$ver/$name" soci-snapshotter-grpc soci THIRD_PARTY_LICENSES NOTICE.md
(cd "$mirror/v$ver" && sha256sum "$name" > "$name.sha256sum")

# A plain (non-nodeadm) node: os-release, containerd's default config, unpigz.
cp /etc/os-release "$root/etc/os-release"
if command -v containerd >/dev/null; then containerd config default > "$root/etc/containerd/config.toml"; fi
if command -v unpigz >/dev/null; then cp "$(command -v unpigz)" "$root/usr/bin/unpigz"; fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$mirror" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done

args=(install --root "$root" --no-start --release-url "http://127.0.0.1:$port" --arch "$arch" --soci-version "$ver" "$@")
echo "== dry run"; "$bin" "${args[@]}" --dry-run --log-level warn
echo "== install"; "$bin" "${args[@]}" --log-level warn
echo "== second install (must change nothing)"; "$bin" "${args[@]}" --log-level warn
echo "== files under $root"
(cd "$root" && find . \( -type f -o -type l \) | sort)
