//! A host loop device over a sparse file: an EBS volume stand-in to bind into a node
//! ([`super::nspawn::NodeOptions::bind`]). Detached on drop; the file stays (copy it to
//! "restore a snapshot").

use std::path::{Path, PathBuf};
use std::process::Command;

/// An attached loop device.
pub struct Loop {
    pub device: PathBuf,
    pub file: PathBuf,
}

impl Loop {
    /// A new sparse file of `bytes` at `file`, attached.
    pub fn blank(file: &Path, bytes: u64) -> Loop {
        let f = std::fs::File::create(file).unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
        f.set_len(bytes).unwrap();
        Loop::attach(file)
    }

    /// Attaches `file` (`losetup --find --show`).
    pub fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup --find --show {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Loop {
            device,
            file: file.to_path_buf(),
        }
    }

    /// The device path as a string (`/dev/loopN`).
    pub fn dev(&self) -> String {
        self.device.display().to_string()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Copies `from` to `to` keeping holes (`cp --sparse=always`): a snapshot restored.
pub fn copy_sparse(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp --sparse=always {} {}", from.display(), to.display());
}
