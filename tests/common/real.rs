//! The real components the end-to-end tests run: containerd v2.4.2 and v2.2.9 (+ ctr), crictl
//! v1.37.0, SOCI v0.16.1 and v0.15.0, and nodeadm, built from source by `tests/real/build.sh` and
//! cached by version outside the checkout (see that script). [`rig`] runs the script once per test
//! binary; a warm cache makes that instant. `.ci/run` builds the rig before the tests, so a test
//! run never starts a cold Go build in the middle of a test.
//!
//! The SOCI builds are also packed as upstream-shaped release trees
//! (`releases/v{VER}/soci-snapshotter-{VER}-linux-amd64-static.tar.gz` + `.sha256sum`), served by
//! the tests' loopback mirror, so `soci-agent install` fetches the REAL daemon through its normal
//! download path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// containerd versions the rig builds, newest first.
pub const CONTAINERD_VERSIONS: [&str; 2] = ["2.4.2", "2.2.9"];
/// The SOCI release the agent installs by default.
pub const SOCI_VERSION: &str = "0.16.1";
/// An older real SOCI, standing in for the AL2023 AMI's packaged one.
pub const SOCI_OLD_VERSION: &str = "0.15.0";

/// The rig directory (building what is missing first). Panics with the script's output when the
/// build fails, naming the prerequisites.
pub fn rig() -> &'static Path {
    static RIG: OnceLock<PathBuf> = OnceLock::new();
    RIG.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/real/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): the real components (containerd, crictl, SOCI, nodeadm) are built from source \
             and need Go, gcc and zlib1g-dev (`bash .ci/run` installs them):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        PathBuf::from(dir)
    })
}

fn existing(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} missing from the rig", path.display());
    path
}

/// The real `containerd` binary of `version` (e.g. "2.4.2").
pub fn containerd(version: &str) -> PathBuf {
    existing(rig().join(format!("containerd-v{version}/containerd")))
}

/// The real `ctr` of `version`.
pub fn ctr(version: &str) -> PathBuf {
    existing(rig().join(format!("containerd-v{version}/ctr")))
}

pub fn crictl() -> PathBuf {
    existing(rig().join("crictl-v1.37.0/crictl"))
}

/// The real `soci-snapshotter-grpc` of `version` (e.g. "0.16.1").
pub fn soci_daemon(version: &str) -> PathBuf {
    existing(rig().join(format!("soci-v{version}/soci-snapshotter-grpc")))
}

/// The real nodeadm, built from the shared source tarball.
pub fn nodeadm() -> PathBuf {
    existing(rig().join("nodeadm-81fec2e8/nodeadm"))
}

/// The AMI's real runtime files (`rootfs/etc/systemd/system/...`, `bin/setup-local-disks`) from
/// the nodeadm tarball's `templates/al2023/runtime`.
pub fn ami_runtime() -> PathBuf {
    existing(rig().join("nodeadm-81fec2e8/runtime"))
}

/// A packed SOCI release: the static archive's name and bytes, and its `.sha256sum` text.
pub struct SociRelease {
    pub version: String,
    pub archive_name: String,
    pub archive: Vec<u8>,
    pub sha256sum: String,
}

/// The upstream-shaped release of `version` built by the rig.
pub fn soci_release(version: &str) -> SociRelease {
    let archive_name = format!("soci-snapshotter-{version}-linux-amd64-static.tar.gz");
    let dir = rig().join(format!("releases/v{version}"));
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()));
    SociRelease {
        version: version.to_string(),
        archive: read(&archive_name),
        sha256sum: String::from_utf8(read(&format!("{archive_name}.sha256sum"))).unwrap(),
        archive_name,
    }
}

impl SociRelease {
    /// Publishes the archive and its `.sha256sum` on `mirror` at the upstream path
    /// (`/v{VER}/{archive}`).
    pub fn publish(&self, mirror: &super::mirror::Mirror) {
        mirror.put(
            &format!("/v{}/{}", self.version, self.archive_name),
            self.archive.clone(),
        );
        mirror.put(
            &format!("/v{}/{}.sha256sum", self.version, self.archive_name),
            self.sha256sum.clone().into_bytes(),
        );
    }
}

/// `containerd -c FILE config dump` with the real containerd of `version`: (success, stdout,
/// stderr).
pub fn config_dump(version: &str, text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(containerd(version))
        .arg("-c")
        .arg(&file)
        .args(["config", "dump"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run containerd {version}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a node's `/etc/containerd/config.toml` starts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeContainerdConfig {
    /// No file: containerd runs its built-in defaults.
    None,
    /// `containerd config default` of that version (v4 on 2.4, v3 on 2.2), with the CRI
    /// registry `config_path` set to `/etc/containerd/certs.d` (as the EKS AMI does).
    Default,
    /// A `version = 3` file that only sets the CRI registry `config_path`.
    RegistryOnly,
}

/// The [`NodeContainerdConfig::RegistryOnly`] file.
pub const REGISTRY_ONLY_V3: &str =
    "version = 3\n\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '/etc/containerd/certs.d'\n";

/// Node preparation (run on the copy's root before boot): the rig's containerd `version` and
/// its `ctr` over Debian's in `/usr/bin`, crictl in `/usr/local/bin` with `/etc/crictl.yaml`
/// on containerd's socket, and the containerd config `config`.
pub fn put_containerd(root: &Path, version: &str, config: NodeContainerdConfig) {
    let copy = |from: PathBuf, to: &str| {
        let to = root.join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&to);
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    };
    copy(containerd(version), "usr/bin/containerd");
    copy(ctr(version), "usr/bin/ctr");
    copy(crictl(), "usr/local/bin/crictl");
    std::fs::write(
        root.join("etc/crictl.yaml"),
        "runtime-endpoint: unix:///run/containerd/containerd.sock\n\
         image-endpoint: unix:///run/containerd/containerd.sock\ntimeout: 60\n",
    )
    .unwrap();
    let file = root.join("etc/containerd/config.toml");
    let _ = std::fs::remove_file(&file);
    if config == NodeContainerdConfig::RegistryOnly {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, REGISTRY_ONLY_V3).unwrap();
    }
    if config == NodeContainerdConfig::Default {
        let out = Command::new(containerd(version))
            .args(["config", "default"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "containerd {version} config default");
        let text = String::from_utf8(out.stdout)
            .unwrap()
            .replace("config_path = ''", "config_path = '/etc/containerd/certs.d'");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, text).unwrap();
    }
}

/// Trusts the loopback registry `host` (`127.0.0.1:PORT`) over plain HTTP in a node whose
/// containerd reads `/etc/containerd/certs.d` (node preparation, or at any time: containerd
/// reads hosts files per pull).
pub fn trust_plain_http(root: &Path, host: &str) {
    let dir = root.join("etc/containerd/certs.d").join(host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!("server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
}

/// `opts` with the rig's containerd `version` in place of Debian's, its config `config`
/// (see [`put_containerd`]).
pub fn with_containerd(
    opts: super::nspawn::NodeOptions,
    version: &'static str,
    config: NodeContainerdConfig,
) -> super::nspawn::NodeOptions {
    opts.prepare(move |root: &Path| put_containerd(root, version, config))
}

/// Writes the real release of `version` (archive + `.sha256sum`) into `dir` (e.g. a node's
/// `/share`); returns the archive's file name.
pub fn release_into(dir: &Path, version: &str) -> String {
    let r = soci_release(version);
    std::fs::write(dir.join(&r.archive_name), &r.archive).unwrap();
    std::fs::write(dir.join(format!("{}.sha256sum", r.archive_name)), &r.sha256sum).unwrap();
    r.archive_name
}
