//! `install --data-volume` and `cache verify` under `--root` (no systemd, no
//! mounts): an image file under the tree stands in for the device. What is
//! checked: a blank device is refused without `--format-data-volume` and
//! formatted (ext4, labelled) with it; a device holding anything is never
//! formatted; a missing device is a usage error naming it; the unit and the
//! drop-ins are written; the device never enters the install record (so
//! uninstall cannot remove it); `cache verify` without a (valid) manifest
//! exits 2.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::agent_bin;
use common::real;
use common::tree::Tree;

const ARCHIVE: &str = "soci-snapshotter-0.16.1-linux-amd64-static.tar.gz";
const DEVICE: &str = "/dev/xvdb";
const UNIT: &str = "/etc/systemd/system/soci-agent-volume.service";
const CONTAINERD_DROPIN: &str = "/etc/systemd/system/containerd.service.d/20-soci-agent-volume.conf";
const SOCI_DROPIN: &str = "/etc/systemd/system/soci-snapshotter.service.d/20-soci-agent-volume.conf";

fn archive(t: &Tree) -> PathBuf {
    t.put_archive(ARCHIVE, &real::soci_release(real::SOCI_VERSION).archive)
}

fn agent(t: &Tree, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args).arg("--root").arg(t.root()).args(["--log-level", "warn"]);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOCI_AGENT_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn install(t: &Tree, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let a = archive(t);
    let mut args = vec![
        "install",
        "--no-start",
        "--arch",
        "amd64",
        "--output",
        "json",
        "--archive",
    ];
    args.push(a.to_str().unwrap());
    args.extend_from_slice(extra);
    agent(t, &args, env)
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A blank "device" of `mib` MiB at `/dev/xvdb` under the tree.
fn blank_device(t: &Tree, mib: u64) {
    std::fs::create_dir_all(t.path("/dev")).unwrap();
    let f = std::fs::File::create(t.path(DEVICE)).unwrap();
    f.set_len(mib << 20).unwrap();
}

fn ext4_label(t: &Tree) -> Option<String> {
    let b = std::fs::read(t.path(DEVICE)).unwrap();
    (b.get(1080..1082) == Some(&[0x53, 0xEF][..])).then(|| {
        let l = &b[1024 + 120..1024 + 136];
        String::from_utf8_lossy(&l[..l.iter().position(|c| *c == 0).unwrap_or(16)]).into_owned()
    })
}

#[test]
fn blank_device_is_refused_without_format_and_nothing_changes() {
    let t = Tree::plain();
    blank_device(&t, 64);
    let out = install(&t, &["--data-volume", DEVICE], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--format-data-volume"),
        "{}",
        show(&out)
    );
    assert!(!t.path(UNIT).exists() && !t.path("/var/lib/soci-agent/record.json").exists());
    assert_eq!(ext4_label(&t), None);
}

#[test]
fn format_data_volume_makes_labelled_ext4_and_writes_the_units() {
    let t = Tree::plain();
    blank_device(&t, 64);
    a_dry_run_shows_the_format_and_changes_nothing(&t);

    let out = install(&t, &["--data-volume", DEVICE, "--format-data-volume"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(ext4_label(&t).as_deref(), Some("soci-cache"));
    let unit = t.read(UNIT);
    assert!(
        unit.contains("ExecStart=/usr/local/bin/soci-agent cache mount --device /dev/xvdb --soci-root /var/lib/soci-snapshotter-grpc"),
        "{unit}"
    );
    for d in [CONTAINERD_DROPIN, SOCI_DROPIN] {
        assert!(t.read(d).contains("Requires=soci-agent-volume.service"), "{d}");
    }
    assert_the_record_asks_for_the_device_but_never_owns_it(&t);
    a_second_run_formats_nothing_and_changes_nothing(&t);
    doctor_sees_the_volume_but_not_its_mounts(&t);

    // Uninstall removes the units, never the device.
    let un = agent(&t, &["uninstall", "--no-start"], &[]);
    assert_eq!(un.status.code(), Some(0), "{}", show(&un));
    assert!(t.path(DEVICE).exists() && !t.path(UNIT).exists());
}

/// A dry run shows the format and changes nothing.
fn a_dry_run_shows_the_format_and_changes_nothing(t: &Tree) {
    let dry = install(t, &["--data-volume", DEVICE, "--format-data-volume", "--dry-run"], &[]);
    assert_eq!(dry.status.code(), Some(0), "{}", show(&dry));
    let report: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert!(
        report["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["path"] == DEVICE && a["action"] == "format"),
        "{report:#}"
    );
    assert_eq!(ext4_label(t), None, "a dry run formatted the device");
}

fn assert_the_record_asks_for_the_device_but_never_owns_it(t: &Tree) {
    let record: serde_json::Value = serde_json::from_str(&t.read("/var/lib/soci-agent/record.json")).unwrap();
    for owned in ["paths", "written"] {
        assert!(
            record[owned].get(DEVICE).is_none(),
            "the device must never be a path install owns ({owned}):\n{record:#}"
        );
    }
    assert_eq!(
        record["request"]["data_volume"]["value"], DEVICE,
        "the device is part of what install was asked (the desired state)"
    );
    assert!(
        record["request"].get("format_data_volume").is_none(),
        "formatting is about that run only"
    );
}

/// Again: the volume now holds ext4, nothing is formatted, nothing changes.
fn a_second_run_formats_nothing_and_changes_nothing(t: &Tree) {
    let before = std::fs::read(t.path(DEVICE)).unwrap();
    let again = install(t, &["--data-volume", DEVICE, "--format-data-volume"], &[]);
    assert_eq!(again.status.code(), Some(0), "{}", show(&again));
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["changed"], false, "{report:#}");
    assert_eq!(std::fs::read(t.path(DEVICE)).unwrap(), before, "formatted twice");
}

/// doctor: the volume is configured; under --root its mounts are not checked.
fn doctor_sees_the_volume_but_not_its_mounts(t: &Tree) {
    let doc = agent(t, &["doctor", "--no-live", "--output", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    let verdict = |id: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| (c["verdict"].as_str().unwrap().to_string(), c["evidence"].to_string()))
            .unwrap_or_else(|| panic!("no {id} in {doc:#}"))
    };
    let (v, e) = verdict("cache.volume");
    assert_eq!(v, "skip", "{e}");
    assert!(e.contains("/dev/xvdb: --root is not this host"), "{e}");
    assert_eq!(verdict("cache.manifest").0, "warn");
    assert_eq!(verdict("cache.images").0, "skip");
}

#[test]
fn a_device_holding_something_is_never_formatted() {
    let t = Tree::plain();
    blank_device(&t, 8);
    let mut bytes = std::fs::read(t.path(DEVICE)).unwrap();
    bytes[4096..4100].copy_from_slice(b"data");
    std::fs::write(t.path(DEVICE), &bytes).unwrap();
    let out = install(&t, &["--data-volume", DEVICE, "--format-data-volume"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("never formats"),
        "{}",
        show(&out)
    );
    assert_eq!(std::fs::read(t.path(DEVICE)).unwrap(), bytes);
    assert!(!t.path(UNIT).exists());
}

#[test]
fn missing_device_from_env_or_config_is_a_usage_error_naming_it() {
    let t = Tree::plain();
    let out = install(&t, &[], &[("SOCI_AGENT_DATA_VOLUME", "/dev/xvdz")]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/dev/xvdz"),
        "{}",
        show(&out)
    );
    t.write(
        "/etc/soci-agent/config.toml",
        "[install]\ndata_volume = \"/dev/xvdy\"\n",
        0o644,
    );
    let out = install(&t, &[], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/dev/xvdy: no such device"),
        "{}",
        show(&out)
    );
    assert!(!t.path(UNIT).exists());
    // --format-data-volume on the command line formats the config file's device; alone it is refused.
    blank_device(&t, 64);
    t.write(
        "/etc/soci-agent/config.toml",
        "[install]\ndata_volume = \"/dev/xvdb\"\n",
        0o644,
    );
    let out = install(&t, &["--format-data-volume"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(ext4_label(&t).as_deref(), Some("soci-cache"));
    std::fs::remove_file(t.path("/etc/soci-agent/config.toml")).unwrap();
    let out = install(&t, &["--format-data-volume"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--format-data-volume"),
        "{}",
        show(&out)
    );
}

#[test]
fn verify_without_a_manifest_or_with_a_broken_one_exits_2() {
    let t = Tree::plain();
    let out = agent(&t, &["cache", "verify", "--output", "json"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["error"].as_str().unwrap().contains("no cache manifest"), "{r:#}");
    t.write("/var/lib/soci-agent/volume/soci-agent-cache.json", "<html>", 0o644);
    let out = agent(&t, &["cache", "verify"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not valid JSON"),
        "{}",
        show(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// render --data-volume-*.

const D0: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn render(args: &[&str]) -> Output {
    Command::new(agent_bin()).arg("render").args(args).output().unwrap()
}

fn agent_args() -> Vec<&'static str> {
    vec![
        "--agent-url",
        "https://example.com/soci-agent-{arch}",
        "--agent-sha256-amd64",
        D0,
    ]
}

/// `ec2nodeclass --cluster c --role R <agent args> <extra>`.
fn ec2nodeclass<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["ec2nodeclass", "--cluster", "c", "--role", "R"];
    args.extend(agent_args());
    args.extend(extra);
    args
}

#[test]
fn render_ec2nodeclass_maps_the_snapshot_and_keeps_the_root_volume() {
    let out = render(&ec2nodeclass(&[
        "--data-volume-snapshot",
        "snap-0abc123456789def0",
        "--data-volume-size",
        "200Gi",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    let bdm = doc["spec"]["blockDeviceMappings"].as_sequence().unwrap();
    assert_eq!(bdm.len(), 2, "{bdm:?}");
    assert_eq!(bdm[0]["deviceName"], "/dev/xvda");
    assert_eq!(bdm[1]["deviceName"], "/dev/xvdb");
    assert_eq!(bdm[1]["ebs"]["snapshotID"], "snap-0abc123456789def0");
    assert_eq!(bdm[1]["ebs"]["volumeSize"], "200Gi");
    assert_eq!(bdm[1]["ebs"]["volumeType"], "gp3");
    let ud = doc["spec"]["userData"].as_str().unwrap();
    assert!(
        ud.contains("'--data-volume=/dev/xvdb'") || ud.contains("--data-volume=/dev/xvdb"),
        "{ud}"
    );
    assert!(!ud.contains("--format-data-volume"), "{ud}");
    without_a_snapshot_install_formats_a_blank_volume();
    refusals_name_the_option();
}

/// Without a snapshot: a blank builder volume, formatted by install.
fn without_a_snapshot_install_formats_a_blank_volume() {
    let out = render(&ec2nodeclass(&[
        "--data-volume-size",
        "50Gi",
        "--data-volume-device",
        "/dev/sdf",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--data-volume=/dev/sdf") && text.contains("--format-data-volume"),
        "{text}"
    );
}

/// Refusals name the option.
fn refusals_name_the_option() {
    for (bad, option) in [
        (
            vec!["--data-volume-snapshot", "vol-0abc12345"],
            "--data-volume-snapshot",
        ),
        (vec!["--data-volume-size", "0Gi"], "--data-volume-size"),
        (
            vec!["--data-volume-size", "9Gi", "--data-volume-device", "/dev/xvda"],
            "--data-volume-device",
        ),
        (
            vec!["--data-volume-size", "9Gi", "--instance-store-raid0"],
            "--instance-store-raid0",
        ),
    ] {
        let out = render(&ec2nodeclass(&bad));
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(option), "{}", show(&out));
    }
}

#[test]
fn render_userdata_and_launch_template_pass_the_data_volume() {
    let mut args = vec!["userdata"];
    args.extend(agent_args());
    args.extend(["--data-volume", "/dev/xvdb"]);
    let out = render(&args);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--data-volume=/dev/xvdb"));

    let mut args = vec!["launch-template"];
    args.extend(agent_args());
    args.extend(["--data-volume-snapshot", "snap-0abc123456789def0"]);
    let out = render(&args);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--data-volume=/dev/xvdb"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BlockDeviceMappings") && err.contains("\"SnapshotId\":\"snap-0abc123456789def0\""),
        "{err}"
    );
}
