//! Node trees for the agent's `--root` runs: a temp directory whose `root/` is the node's `/`,
//! with room beside the root for what is not part of the node (release archives, sockets, logs).
//!
//! [`Tree::plain`] and [`Tree::nodeadm`] are the two host shapes the tests start from; test files
//! wrap a `Tree` in their own type for the agent runs they make.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::archive::sha256sum_line;

const DEBIAN_OS_RELEASE: &str = "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12\"\n";
const AL2023_OS_RELEASE: &str = "ID=\"amzn\"\nVERSION_ID=\"2023\"\nPRETTY_NAME=\"Amazon Linux 2023\"\n";
/// Debian containerd's default config (what `containerd config default` writes there).
pub const DEBIAN_CONTAINERD_DEFAULT: &str = include_str!("../data/containerd/debian-default/input.toml");
const BOTTLEROCKET_OS_RELEASE: &str =
    "NAME=Bottlerocket\nID=bottlerocket\nVERSION_ID=1.44.0\nPRETTY_NAME=\"Bottlerocket OS 1.44.0\"\n";
const UNPIGZ: &str = "#!/bin/sh\nexec gzip \"$@\"\n";

/// A node tree under a temp dir (see the module docs).
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    /// A fresh temp dir; the root itself does not exist yet.
    pub fn empty() -> Tree {
        Tree {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    /// A root holding only a Debian 12 `/etc/os-release`.
    pub fn debian() -> Tree {
        let t = Tree::empty();
        t.write("/etc/os-release", DEBIAN_OS_RELEASE, 0o644);
        t
    }
    /// A plain Debian host: containerd's default config, unpigz, a kubelet config.
    pub fn plain() -> Tree {
        let t = Tree::debian();
        t.write("/etc/containerd/config.toml", DEBIAN_CONTAINERD_DEFAULT, 0o644);
        t.write("/usr/bin/unpigz", UNPIGZ, 0o755);
        t.write("/etc/kubernetes/kubelet/config.json", "{}\n", 0o644);
        t
    }
    /// An AL2023-shaped nodeadm host with `containerd_version` in the EKS file.
    pub fn nodeadm(containerd_version: &str) -> Tree {
        let t = Tree::debian();
        t.write("/etc/os-release", AL2023_OS_RELEASE, 0o644);
        t.write("/usr/bin/nodeadm", "#!/bin/sh\nexit 0\n", 0o755);
        fs::create_dir_all(t.path("/etc/eks/nodeadm.d")).unwrap();
        t.write(
            "/etc/eks/containerd-version.txt",
            format!("{containerd_version}\n"),
            0o644,
        );
        t.write("/usr/bin/unpigz", UNPIGZ, 0o755);
        t
    }

    /// A Bottlerocket root (`/etc/os-release` only), which the agent leaves to its settings API.
    pub fn bottlerocket() -> Tree {
        let t = Tree::empty();
        t.write("/etc/os-release", BOTTLEROCKET_OS_RELEASE, 0o644);
        t
    }

    /// Host path of the node's `/`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    /// Host path of `node_path`.
    pub fn path(&self, node_path: &str) -> PathBuf {
        self.root().join(node_path.trim_start_matches('/'))
    }
    /// Host path of `name` beside the root (outside the node).
    pub fn beside(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces `node_path` (a file or link; parents created) with a file of `mode`.
    pub fn write(&self, node_path: &str, content: impl AsRef<[u8]>, mode: u32) {
        let p = self.path(node_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = fs::remove_file(&p);
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    /// A node file's bytes; panics when unreadable.
    pub fn read_bytes(&self, node_path: &str) -> Vec<u8> {
        fs::read(self.path(node_path)).unwrap_or_else(|e| panic!("{node_path}: {e}"))
    }
    /// A node file's text; panics when unreadable.
    pub fn read(&self, node_path: &str) -> String {
        fs::read_to_string(self.path(node_path)).unwrap_or_else(|e| panic!("{node_path}: {e}"))
    }
    /// Removes a node file, link or directory (which must be there).
    pub fn remove(&self, node_path: &str) {
        let p = self.path(node_path);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).unwrap(),
            Ok(_) => fs::remove_file(&p).unwrap(),
            Err(e) => panic!("remove {node_path}: {e}"),
        }
    }
    /// A symlink at `node_path` to `target` (parents created).
    pub fn symlink(&self, target: impl AsRef<Path>, node_path: &str) {
        let p = self.path(node_path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    /// Writes a release archive `name` beside the root with its `.sha256sum`; returns its path.
    pub fn put_archive(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let archive = self.beside(name);
        fs::write(&archive, bytes).unwrap();
        fs::write(self.beside(&format!("{name}.sha256sum")), sha256sum_line(bytes, name)).unwrap();
        archive
    }
}
