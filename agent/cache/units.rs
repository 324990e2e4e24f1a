//! The units of a data volume, rendered from the files in `systemd/`: the
//! oneshot that mounts it and the drop-ins that make containerd and SOCI
//! require it. Pure.

use crate::files::units::exec_word;

const VOLUME_SERVICE: &str = include_str!("../../systemd/soci-agent-volume.service");
const CONTAINERD_DROPIN: &str = include_str!("../../systemd/containerd.service.d/20-soci-agent-volume.conf");
const SOCI_DROPIN: &str = include_str!("../../systemd/soci-snapshotter.service.d/20-soci-agent-volume.conf");

/// `soci-agent-volume.service` for `device` and SOCI's root.
pub fn volume_service(device: &str, soci_root: &str) -> String {
    VOLUME_SERVICE
        .replace("@DEVICE@", &exec_word(device))
        .replace("@SOCI_ROOT@", &exec_word(soci_root))
}

/// `containerd.service.d/20-soci-agent-volume.conf`.
pub fn containerd_dropin() -> String {
    CONTAINERD_DROPIN.to_string()
}

/// `soci-snapshotter.service.d/20-soci-agent-volume.conf`.
pub fn soci_dropin() -> String {
    SOCI_DROPIN.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::units::is_ours;

    #[test]
    fn rendered_and_marked() {
        let u = volume_service("/dev/disk/by-id/nvme-Amazon x", "/var/lib/soci-snapshotter-grpc");
        assert!(is_ours(&u) && is_ours(&containerd_dropin()) && is_ours(&soci_dropin()));
        assert!(
            u.contains(
                "cache mount --device \"/dev/disk/by-id/nvme-Amazon x\" --soci-root /var/lib/soci-snapshotter-grpc\n"
            ),
            "{u}"
        );
        assert!(u.contains("Before=containerd.service soci-snapshotter.service"));
        assert!(!u.contains('@'));
        for d in [containerd_dropin(), soci_dropin()] {
            assert!(d.contains("Requires=soci-agent-volume.service") && d.contains("After=soci-agent-volume.service"));
        }
    }
}
