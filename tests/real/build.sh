#!/usr/bin/env bash
# Builds the real components the end-to-end tests run, from source, and caches
# them by version outside the checkout (nothing prebuilt is downloaded):
#
#   containerd v2.4.2 and v2.2.9 (+ ctr)   Go module proxy
#   crictl v1.37.0                         Go module proxy
#   soci-snapshotter-grpc + soci v0.16.1   Go module proxy (pinned cmd pseudo-version)
#   soci-snapshotter-grpc + soci v0.15.0   ../shared/third_party source tarball (an "AMI's older SOCI")
#   nodeadm (amazon-eks-ami 81fec2e8)      ../shared/third_party source tarball (vendored)
#
# and packs each SOCI build as an upstream-shaped release tree
# (releases/v{VER}/soci-snapshotter-{VER}-linux-amd64-static.tar.gz + .sha256sum)
# that tests serve on loopback, so the agent installs the real daemon through
# its normal download path.
#
# Usage: bash tests/real/build.sh            # build what is missing, print the rig directory
# Env:   SOCI_AGENT_RIG    cache directory (default $XDG_CACHE_HOME/soci-agent-test/rig
#                          or /var/tmp/soci-agent-test/rig)
#        SOCI_AGENT_SHARED the shared directory (default ../shared beside the checkout)
# Needs: go >= 1.24, gcc, zlib1g-dev (SOCI is cgo), tar, sha256sum.
# Cold: ~5 min on 2 cores; warm: instant.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
checkout="$(cd "$here/../.." && pwd)"
shared="${SOCI_AGENT_SHARED:-$checkout/../shared}"
if [[ -n "${SOCI_AGENT_RIG:-}" ]]; then
  rig="$SOCI_AGENT_RIG"
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
  rig="$XDG_CACHE_HOME/soci-agent-test/rig"
else
  rig=/var/tmp/soci-agent-test/rig
fi

CONTAINERD_VERSIONS=(v2.4.2 v2.2.9)
CRICTL_VERSION=v1.37.0
SOCI_VERSION=v0.16.1
# The cmd module has no tags; this pseudo-version is the v0.16.1 release commit.
SOCI_CMD_PSEUDO=v0.0.0-20260930233240-61147fe7c929
SOCI_REVISION=61147fe7c929
SOCI_OLD_VERSION=v0.15.0
SOCI_OLD_REVISION=7716bd67e813
SOCI_OLD_TARBALL=soci-snapshotter-0.15.0-src.tar.gz
NODEADM_COMMIT=81fec2e8
NODEADM_TARBALL=amazon-eks-ami-81fec2e8-nodeadm.tar.gz

say() { printf 'rig: %s\n' "$*" >&2; }
die() { printf 'rig: error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go is not on PATH (Go >= 1.24 is needed to build the real components; see README 'Tests')"
mkdir -p "$rig"
exec 9>"$rig/.lock"
flock 9   # one builder per machine; others wait, then find everything done

export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export GOTOOLCHAIN=local
tmp_root="$(mktemp -d "$rig/.build.XXXXXX")"
trap 'chmod -R u+w "$tmp_root" 2>/dev/null; rm -rf "$tmp_root"' EXIT

# done DIR: true when DIR was completed by an earlier run.
done_() { [[ -f "$1/.complete" ]]; }
# finish TMP DIR: mark TMP complete and move it into place as DIR.
finish() { touch "$1/.complete"; rm -rf "$2"; mv "$1" "$2"; }

build_containerd() {
  local v=$1 dir="$rig/containerd-$1"
  done_ "$dir" && return
  say "building containerd $v + ctr (Go module proxy)"
  local out="$tmp_root/containerd-$v"; mkdir -p "$out"
  CGO_ENABLED=0 GOBIN="$out" go install -trimpath -tags "urfave_cli_no_docs no_btrfs" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$v" \
    "github.com/containerd/containerd/v2/cmd/containerd@$v" "github.com/containerd/containerd/v2/cmd/ctr@$v"
  "$out/containerd" --version | grep -q "$v" || die "containerd $v reports $("$out/containerd" --version)"
  finish "$out" "$dir"
}

build_crictl() {
  local dir="$rig/crictl-$CRICTL_VERSION"
  done_ "$dir" && return
  say "building crictl $CRICTL_VERSION (Go module proxy)"
  local out="$tmp_root/crictl"; mkdir -p "$out"
  CGO_ENABLED=0 GOBIN="$out" go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  finish "$out" "$dir"
}

soci_ldflags() { echo "-s -w -X github.com/awslabs/soci-snapshotter/version.Version=$1 -X github.com/awslabs/soci-snapshotter/version.Revision=$2"; }

build_soci() {
  local dir="$rig/soci-$SOCI_VERSION"
  done_ "$dir" && return
  say "building soci-snapshotter $SOCI_VERSION (Go module proxy, cmd module $SOCI_CMD_PSEUDO)"
  local out="$tmp_root/soci-$SOCI_VERSION" mod="$tmp_root/soci-wrapper"
  mkdir -p "$out" "$mod"
  local cmd_dir
  cmd_dir="$(cd "$mod" && go mod download -json "github.com/awslabs/soci-snapshotter/cmd@$SOCI_CMD_PSEUDO" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$cmd_dir" ]] || die "the Go module proxy did not give github.com/awslabs/soci-snapshotter/cmd@$SOCI_CMD_PSEUDO"
  (
    cd "$mod"
    go mod init soci-agent-rig/soci >/dev/null 2>&1
    go mod edit -require="github.com/awslabs/soci-snapshotter@$SOCI_VERSION" \
      -require="github.com/awslabs/soci-snapshotter/cmd@$SOCI_CMD_PSEUDO" \
      -replace="github.com/awslabs/soci-snapshotter@v0.0.0-local=github.com/awslabs/soci-snapshotter@$SOCI_VERSION"
    # The cmd module's own replace directives: local ones (=> ../) point at the
    # root module's release tag, the others are copied as they are.
    go mod edit -json "$cmd_dir/go.mod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    old = r["Old"]["Path"] + ("@" + r["Old"]["Version"] if r["Old"].get("Version") else "")
    new = r["New"]["Path"]
    if new.startswith("."):
        continue
    print(old + "=" + new + ("@" + r["New"]["Version"] if r["New"].get("Version") else ""))
' | while read -r rep; do go mod edit -replace="$rep"; done
    go mod edit -replace="github.com/awslabs/soci-snapshotter@v0.0.0=github.com/awslabs/soci-snapshotter@$SOCI_VERSION"
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "github.com/awslabs/soci-snapshotter/cmd/soci"
	_ "github.com/awslabs/soci-snapshotter/cmd/soci-snapshotter-grpc"
)
GO
    go mod tidy >/dev/null
    CGO_ENABLED=1 go build -trimpath -ldflags "$(soci_ldflags "$SOCI_VERSION" "$SOCI_REVISION")" -o "$out/" \
      github.com/awslabs/soci-snapshotter/cmd/soci-snapshotter-grpc github.com/awslabs/soci-snapshotter/cmd/soci
  )
  "$out/soci-snapshotter-grpc" --version | grep -q "$SOCI_VERSION" || die "soci-snapshotter-grpc reports $("$out/soci-snapshotter-grpc" --version)"
  soci_notices "$(go env GOMODCACHE)/github.com/awslabs/soci-snapshotter@$SOCI_VERSION" "$out"
  finish "$out" "$dir"
}

build_soci_old() {
  local dir="$rig/soci-$SOCI_OLD_VERSION"
  done_ "$dir" && return
  [[ -f "$shared/third_party/$SOCI_OLD_TARBALL" ]] || die "missing $shared/third_party/$SOCI_OLD_TARBALL"
  say "building soci-snapshotter $SOCI_OLD_VERSION (shared/third_party source)"
  local out="$tmp_root/soci-$SOCI_OLD_VERSION"; mkdir -p "$out"
  tar -xzf "$shared/third_party/$SOCI_OLD_TARBALL" -C "$tmp_root"
  (cd "$tmp_root/soci-snapshotter-0.15.0/cmd" && CGO_ENABLED=1 go build -trimpath \
    -ldflags "$(soci_ldflags "$SOCI_OLD_VERSION" "$SOCI_OLD_REVISION")" -o "$out/" ./soci-snapshotter-grpc ./soci)
  soci_notices "$tmp_root/soci-snapshotter-0.15.0" "$out"
  finish "$out" "$dir"
}

# soci_notices SRC OUT: the two text entries of a release archive.
soci_notices() {
  local src=$1 out=$2
  if [[ -f "$src/NOTICE.md" ]]; then cp "$src/NOTICE.md" "$out/NOTICE.md"; else echo "SOCI snapshotter (built from source for tests)" > "$out/NOTICE.md"; fi
  if [[ -f "$src/THIRD_PARTY_LICENSES" ]]; then cp "$src/THIRD_PARTY_LICENSES" "$out/THIRD_PARTY_LICENSES"; else cp "$src/LICENSE" "$out/THIRD_PARTY_LICENSES" 2>/dev/null || echo "see upstream" > "$out/THIRD_PARTY_LICENSES"; fi
  chmod 0644 "$out/NOTICE.md" "$out/THIRD_PARTY_LICENSES"
}

build_nodeadm() {
  local dir="$rig/nodeadm-$NODEADM_COMMIT"
  done_ "$dir" && return
  [[ -f "$shared/third_party/$NODEADM_TARBALL" ]] || die "missing $shared/third_party/$NODEADM_TARBALL"
  say "building nodeadm $NODEADM_COMMIT (shared/third_party source, vendored)"
  local out="$tmp_root/nodeadm"; mkdir -p "$out"
  tar -xzf "$shared/third_party/$NODEADM_TARBALL" -C "$tmp_root"
  (cd "$tmp_root/amazon-eks-ami/nodeadm" && GOFLAGS="-mod=vendor -buildvcs=false" CGO_ENABLED=0 \
    go build -trimpath -ldflags "-s -w" -o "$out/nodeadm" ./cmd/nodeadm)
  # The AMI's real units and scripts, for nodeadm nodes in tests.
  cp -a "$tmp_root/amazon-eks-ami/templates/al2023/runtime" "$out/runtime"
  finish "$out" "$dir"
}

# pack_release VERSION: releases/v{V}/soci-snapshotter-{V}-linux-amd64-static.tar.gz (+ .sha256sum),
# shaped like upstream's (four entries, no ./ prefix), reproducible.
pack_release() {
  local v=$1 src="$rig/soci-v$1" rel="$rig/releases/v$1"
  local name="soci-snapshotter-$v-linux-amd64-static.tar.gz"
  [[ -f "$rel/$name.sha256sum" && "$rel/.from" -nt "$src/.complete" ]] && return
  say "packing release $name"
  mkdir -p "$rel"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1700000000 -C "$src" \
    -cf - soci-snapshotter-grpc soci THIRD_PARTY_LICENSES NOTICE.md | gzip -n > "$rel/$name.tmp"
  mv "$rel/$name.tmp" "$rel/$name"
  cp "$rel/$name" "$rel/soci-snapshotter-$v-linux-amd64.tar.gz"
  (cd "$rel" && sha256sum "$name" > "$name.sha256sum.tmp" && mv "$name.sha256sum.tmp" "$name.sha256sum" \
    && sha256sum "soci-snapshotter-$v-linux-amd64.tar.gz" > "soci-snapshotter-$v-linux-amd64.tar.gz.sha256sum")
  touch "$rel/.from"
}

for v in "${CONTAINERD_VERSIONS[@]}"; do build_containerd "$v"; done
build_crictl
build_soci
build_soci_old
build_nodeadm
pack_release "${SOCI_VERSION#v}"
pack_release "${SOCI_OLD_VERSION#v}"
echo "$rig"
