//! Every node path, socket and unit name soci-agent knows, once. A leaf:
//! it imports nothing. Paths are node paths (absolute, as on the node);
//! `rootfs::Root` resolves them under `--root`.

// --- soci-agent's own files.
/// The agent's config file (`[install]`, `[prefetch]`, `[daemon]`).
pub const AGENT_CONFIG: &str = "/etc/soci-agent/config.toml";
/// Where install copies the agent binary (the boot and daemon units run it).
pub const AGENT_BINARY: &str = "/usr/local/bin/soci-agent";
/// State: the install record, backups, run reports.
pub const STATE_DIR: &str = "/var/lib/soci-agent";
pub const RECORD: &str = "/var/lib/soci-agent/record.json";
pub const BACKUP_DIR: &str = "/var/lib/soci-agent/backup";
pub const REPORTS_DIR: &str = "/var/lib/soci-agent/reports";
/// The versioned release store and the directory of its symlinks.
pub const STORE_DIR: &str = "/usr/local/lib/soci-agent/releases";
pub const BIN_DIR: &str = "/usr/local/bin";
/// Held by install (and daemon repairs) for the whole run.
pub const INSTALL_LOCK: &str = "/run/soci-agent/install.lock";
/// The daemon's status socket.
pub const DAEMON_STATE_SOCKET: &str = "/run/soci-agent/daemon.sock";

// --- SOCI.
pub const SOCI_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
pub const SOCI_SOCKET: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
pub const SOCI_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
/// Where a preinstalled SOCI may sit (the AL2023 AMI's first).
pub const SOCI_BINARY_LOCATIONS: [&str; 2] = ["/usr/bin/soci-snapshotter-grpc", "/usr/local/bin/soci-snapshotter-grpc"];
pub const UNPIGZ: &str = "/usr/bin/unpigz";

// --- containerd.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub const CRI_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
pub const CONTAINERD_HOSTS_DIR: &str = "/etc/containerd/certs.d";
pub const CTR_CANDIDATES: [&str; 3] = ["/usr/bin/ctr", "/usr/local/bin/ctr", "/bin/ctr"];

// --- EKS / nodeadm / kubelet.
pub const NODEADM_BIN: &str = "/usr/bin/nodeadm";
pub const NODEADM_DROPIN_DIR: &str = "/etc/eks/nodeadm.d";
pub const NODEADM_DROPIN: &str = "/etc/eks/nodeadm.d/50-soci-agent.yaml";
pub const NODEADM_CACHE: &str = "/run/eks/nodeadm/config.json";
pub const CONTAINERD_VERSION_FILE: &str = "/etc/eks/containerd-version.txt";
pub const PAUSE_ARCHIVE: &str = "/etc/eks/pause.tar";
pub const CREDENTIAL_PROVIDER_CONFIG: &str = "/etc/eks/image-credential-provider/config.json";
pub const CREDENTIAL_PROVIDER_BIN_DIR: &str = "/etc/eks/image-credential-provider";
pub const KUBELET_CONFIG: &str = "/etc/kubernetes/kubelet/config.json";
pub const KUBELET_DROPIN_DIR: &str = "/etc/kubernetes/kubelet/config.json.d";
pub const KUBELET_DROPIN: &str = "/etc/kubernetes/kubelet/config.json.d/50-soci-agent.conf";

// --- systemd.
pub const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// Where systemd looks for units, first match wins.
pub const UNIT_SEARCH_PATH: [&str; 3] = ["/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"];
pub const SOCI_SERVICE: &str = "soci-snapshotter.service";
pub const SOCI_SOCKET_UNIT: &str = "soci-snapshotter.socket";
pub const BOOT_SERVICE: &str = "soci-agent-boot.service";
pub const DAEMON_SERVICE: &str = "soci-agent.service";
pub const CONTAINERD_SERVICE: &str = "containerd.service";
pub const KUBELET_SERVICE: &str = "kubelet.service";
pub const SOCI_SERVICE_PATH: &str = "/etc/systemd/system/soci-snapshotter.service";
pub const SOCI_SOCKET_PATH: &str = "/etc/systemd/system/soci-snapshotter.socket";
pub const SOCI_SERVICE_DROPIN: &str = "/etc/systemd/system/soci-snapshotter.service.d/50-soci-agent.conf";
pub const CONTAINERD_DROPIN: &str = "/etc/systemd/system/containerd.service.d/10-soci-snapshotter.conf";
pub const BOOT_SERVICE_PATH: &str = "/etc/systemd/system/soci-agent-boot.service";
pub const KUBELET_DROPIN_PATH: &str = "/etc/systemd/system/kubelet.service.d/50-soci-agent-boot.conf";
pub const DAEMON_SERVICE_PATH: &str = "/etc/systemd/system/soci-agent.service";

// --- The snapshot cache (an attached data volume holding both daemons' roots).
/// Where the data volume is mounted (its unit: `var-lib-soci\x2dagent-volume`).
pub const VOLUME_MOUNT: &str = "/var/lib/soci-agent/volume";
/// containerd's root (nodeadm's template and containerd's default).
pub const CONTAINERD_ROOT: &str = "/var/lib/containerd";
/// Directories at the volume's top, bound onto containerd's and SOCI's roots.
pub const VOLUME_CONTAINERD_DIR: &str = "containerd";
pub const VOLUME_SOCI_DIR: &str = "soci-snapshotter-grpc";
/// The cache manifest, at the volume's top.
pub const CACHE_MANIFEST: &str = "soci-agent-cache.json";
/// Label of a filesystem `install --format-data-volume` makes.
pub const VOLUME_LABEL: &str = "soci-cache";
/// The oneshot unit that mounts the volume and binds the roots, before either daemon.
pub const VOLUME_SERVICE: &str = "soci-agent-volume.service";
pub const VOLUME_SERVICE_PATH: &str = "/etc/systemd/system/soci-agent-volume.service";
/// Drop-ins making containerd and SOCI require the volume unit.
pub const CONTAINERD_VOLUME_DROPIN: &str = "/etc/systemd/system/containerd.service.d/20-soci-agent-volume.conf";
pub const SOCI_VOLUME_DROPIN: &str = "/etc/systemd/system/soci-snapshotter.service.d/20-soci-agent-volume.conf";
