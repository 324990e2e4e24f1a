//! `--data-volume-*` of `render ec2nodeclass` and `render launch-template`:
//! a second EBS block device mapping (gp3) restored from a sealed snapshot
//! cache (`soci-agent cache seal`), and `--data-volume DEVICE` passed to
//! install in the user data. Without a snapshot, `--data-volume-size` maps a
//! blank volume that install formats (a builder).

use clap::Args;

use super::userdata::UserdataArgs;
use super::{RenderError, invalid};

#[derive(Debug, Clone, Args)]
pub struct DataVolumeArgs {
    /// EBS snapshot of a sealed snapshot cache (snap-...): mapped as a second gp3 volume, and the
    /// user data runs install --data-volume on it.
    #[arg(long, value_name = "SNAPSHOT")]
    pub data_volume_snapshot: Option<String>,

    /// Size of the data volume (Gi or Ti). [default: the snapshot's size; required without
    /// --data-volume-snapshot, which maps a blank volume that install formats (a cache builder)]
    #[arg(long, value_name = "SIZE")]
    pub data_volume_size: Option<String>,

    /// Device name of the data volume mapping, passed to install --data-volume (on Nitro
    /// instances it shows up as /dev/nvme1n1; install finds it by its EBS name).
    #[arg(long, value_name = "DEVICE", default_value = "/dev/xvdb")]
    pub data_volume_device: String,
}

/// The checked mapping.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub device: String,
    pub snapshot: Option<String>,
    /// GiB, when set.
    pub size_gib: Option<u64>,
    /// Given as (`100Gi`).
    pub size: Option<String>,
}

impl DataVolumeArgs {
    /// The mapping asked for, if any; `ud` gets `--data-volume` (and
    /// `--format-data-volume` for a blank volume).
    pub fn apply(&self, ud: &mut UserdataArgs, notes: &mut Vec<String>) -> Result<Option<Mapping>, RenderError> {
        if self.data_volume_snapshot.is_none() && self.data_volume_size.is_none() {
            return Ok(None);
        }
        let device = check_device(&self.data_volume_device)?;
        if let Some(s) = &self.data_volume_snapshot {
            check_snapshot(s)?;
        }
        let size_gib = self
            .data_volume_size
            .as_deref()
            .map(|s| {
                super::parse_size(s)
                    .filter(|g| (1..=16384).contains(g))
                    .ok_or_else(|| invalid("--data-volume-size", s, "expected 1Gi to 16Ti, e.g. 200Gi"))
            })
            .transpose()?;
        if let Some(given) = &ud.data_volume
            && given != &device
        {
            return Err(invalid(
                "--data-volume",
                given,
                format!("differs from --data-volume-device {device}: give one of them"),
            ));
        }
        ud.data_volume = Some(device.clone());
        if self.data_volume_snapshot.is_none() {
            ud.format_data_volume = true;
            notes.push(format!(
                "no --data-volume-snapshot: {device} is a blank volume that install formats (a cache builder: then \
                 prefetch and soci-agent cache seal)"
            ));
        } else {
            notes.push(
                "enable EBS Fast Snapshot Restore on the snapshot in the node's AZs: without it the first reads of a \
                 restored volume are slow"
                    .into(),
            );
        }
        Ok(Some(Mapping {
            device,
            snapshot: self.data_volume_snapshot.clone(),
            size_gib,
            size: self.data_volume_size.clone(),
        }))
    }
}

/// An EBS device name: /dev/sd[b-z] or /dev/xvd[b-z] (optionally one more letter).
fn check_device(v: &str) -> Result<String, RenderError> {
    let tail = v.strip_prefix("/dev/xvd").or_else(|| v.strip_prefix("/dev/sd"));
    let ok = tail.is_some_and(|t| {
        (1..=2).contains(&t.len()) && t.bytes().all(|c| c.is_ascii_lowercase()) && !t.starts_with('a')
    });
    if ok {
        Ok(v.to_string())
    } else {
        Err(invalid(
            "--data-volume-device",
            v,
            "must be an EBS device name other than the root's, e.g. /dev/xvdb or /dev/sdf",
        ))
    }
}

fn check_snapshot(v: &str) -> Result<(), RenderError> {
    let ok = v
        .strip_prefix("snap-")
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.bytes().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--data-volume-snapshot",
            v,
            "must be an EBS snapshot id, snap-0123456789abcdef0",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert!(check_device("/dev/xvdb").is_ok() && check_device("/dev/sdf").is_ok());
        for bad in ["/dev/xvda", "/dev/nvme1n1", "xvdb", "/dev/xvdB"] {
            assert!(check_device(bad).is_err(), "{bad}");
        }
        assert!(check_snapshot("snap-0abc12345").is_ok());
        assert!(check_snapshot("snap-xyz").is_err() && check_snapshot("vol-0abc12345").is_err());
    }
}
