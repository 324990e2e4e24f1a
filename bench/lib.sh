# Shared by the shell benchmarks (source it after setting `work`): a loopback
# docker-registry trusted over plain HTTP through `$work/hosts`, blob pushes,
# and containerd with CRI on private paths.
# Sets: host, registry_pid (start_registry); containerd_pid (start_containerd);
# snapshotter (probe_snapshotter).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# A docker-registry on a free loopback port, storage under $work/registry,
# and a containerd hosts.toml for it under $work/hosts.
start_registry() {
  host=127.0.0.1:$(free_port)
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
}

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

# overlayfs when an overlay mount works here, else native.
probe_snapshotter() {
  snapshotter=native
  local probe="$work/probe"; mkdir -p "$probe"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
    umount "$probe/m"; snapshotter=overlayfs
  fi
}

# containerd with CRI under $1 (fresh), its socket $1/c.sock, pulling through $work/hosts.
start_containerd() {
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

# Unmounts anything left mounted under $work (deepest first).
unmount_work() {
  awk -v w="$work" 'index($2, w) == 1 {print length($2), $2}' /proc/self/mounts | sort -rn | cut -d' ' -f2- |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
