//! Step 4b of the plan: `--data-volume`. The device is found and read here
//! (blank, ext4/xfs, or something never formatted), then planned: a format
//! action for a blank one with `--format-data-volume`, the unit that mounts
//! it before both daemons, and their drop-ins requiring it. The logic lives
//! in `crate::cache`.

use crate::cache::device::{self, Content, VolumeError};
use crate::cache::units;
use crate::cache::volume::{self, Layout};
use crate::host::HostFacts;
use crate::install::settings::InstallSettings;
use crate::paths::{CONTAINERD_VOLUME_DROPIN, SOCI_VOLUME_DROPIN, VOLUME_MOUNT, VOLUME_SERVICE_PATH};

use super::builder::Builder;
use super::{Action, ActionKind, CONTAINERD_CHANGE, Effects, Op, PlanError, UNIT_CHANGE};

/// Step 4b: nothing without `--data-volume`.
pub(super) fn data_volume(b: &mut Builder, s: &InstallSettings, facts: &HostFacts) -> Result<(), PlanError> {
    let Some(given) = &s.data_volume else {
        return Ok(());
    };
    let dev = device::find_device(b.root, given)?;
    if let Some(n) = &dev.note {
        b.notes.push(format!("--data-volume: {n}"));
    }
    let layout = Layout::new(b.root, &s.soci_root);
    if b.root.is_host() {
        volume::check_not_mounted_elsewhere(&dev, &layout, &volume::mounts())?;
    }
    plan_content(b, s, dev)?;
    if facts.nodeadm {
        b.warnings.push(
            "nodeadm host with --data-volume: do not also set instanceStorePolicy RAID0 / localStorage (nodeadm \
             would bind instance store over the same roots)"
                .into(),
        );
    }
    // The unit names the device as given: a by-id link or an EBS name is resolved at every boot.
    b.file(
        VOLUME_SERVICE_PATH,
        units::volume_service(given, &s.soci_root),
        0o644,
        UNIT_CHANGE,
    )?;
    b.file(SOCI_VOLUME_DROPIN, units::soci_dropin(), 0o644, UNIT_CHANGE)?;
    b.file(
        CONTAINERD_VOLUME_DROPIN,
        units::containerd_dropin(),
        0o644,
        CONTAINERD_CHANGE,
    )?;
    Ok(())
}

/// What the device holds decides: format a blank one (with
/// `--format-data-volume`), use ext4/xfs, refuse anything else.
fn plan_content(b: &mut Builder, s: &InstallSettings, dev: device::Device) -> Result<(), PlanError> {
    match device::probe(b.root, &dev)? {
        Content::Blank if s.format_data_volume => {
            device::check_writable(&dev)?;
            b.actions.push(Action {
                path: dev.used.clone(),
                action: ActionKind::Format,
                changed: true,
                detail: format!("blank: make an ext4 filesystem labelled {}", crate::paths::VOLUME_LABEL),
                diff: None,
                op: Op::FormatVolume(Box::new(dev.clone())),
                effects: Effects::default(),
            });
        }
        Content::Blank => return Err(VolumeError::Blank { device: dev.used }.into()),
        Content::Filesystem { fs, label, uuid } if fs == "ext4" || fs == "xfs" => {
            device::check_writable(&dev)?;
            b.notes.push(format!(
                "--data-volume {}: {fs} filesystem (label {label:?}, uuid {uuid}), mounted at {VOLUME_MOUNT} with \
                 containerd's and SOCI's roots bound onto it before either daemon starts",
                dev.used
            ));
        }
        Content::Filesystem { fs, .. } => {
            return Err(VolumeError::Foreign {
                device: dev.used,
                what: format!("an {fs} filesystem"),
            }
            .into());
        }
        Content::Other { what } => return Err(VolumeError::Foreign { device: dev.used, what }.into()),
    }
    Ok(())
}
