//! Golden tests for `containerd_config`: `tests/data/containerd/<case>/`
//! holds `input.toml` (absent: no file on the node) and either
//! `expected.toml` (the merged file) or `expected-error.txt` (the error's
//! Display). `UPDATE_GOLDEN=1 cargo test --test containerd_merge` rewrites the
//! expected files; review the diff before committing.
//!
//! Every result is also fed to the real `containerd -c FILE config dump` of
//! the containerd that reads it: v2 to Debian's containerd 1.6, v3 to the
//! real v2.2.9 and v2.4.2, v4 to v2.4.2 (and 2.2.9 must refuse it). For v2
//! results the real 2.x migration is checked against
//! `v2_migration_drops_owned_keys`, the prediction install and doctor use.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::real;
use soci_agent::files::containerd_config::{
    ConfigVersion, ContainerdConfigError, Daemon, Merged, SociWiring, detect_version, fragment, merge, owned_keys,
    v2_migration_drops_owned_keys,
};
use soci_agent::paths::SOCI_SOCKET as DEFAULT_ADDRESS;
use toml_edit::{DocumentMut, Item};

const PATH: &str = "/etc/containerd/config.toml";
const SOCI_ROOT: &str = "/var/lib/soci-snapshotter-grpc";

fn wiring() -> SociWiring {
    SociWiring {
        address: DEFAULT_ADDRESS.to_owned(),
        soci_root: SOCI_ROOT.to_owned(),
    }
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/containerd")
}

fn read_input(case: &str) -> Option<String> {
    let path = data_dir().join(case).join("input.toml");
    path.exists()
        .then(|| std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
}

/// Compares `actual` with the golden file, or rewrites it under UPDATE_GOLDEN=1.
fn golden(path: &Path, actual: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(path, actual).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path:?}: {e} (run with UPDATE_GOLDEN=1 to create it, then review it)"));
    if expected != actual {
        let diff = similar::TextDiff::from_lines(expected.as_str(), actual);
        let diff = diff.unified_diff().header("expected", "actual").to_string();
        panic!("{path:?} differs from the output (UPDATE_GOLDEN=1 rewrites it):\n{diff}");
    }
}

/// Input lines holding an owned key's value, or an inline table on an
/// owned key's path: the only lines merge may rewrite.
fn owned_lines(input: &str, version: ConfigVersion) -> BTreeSet<usize> {
    let doc = toml_edit::Document::parse(input).expect("input parses");
    let line_of = |offset: usize| input[..offset].matches('\n').count();
    let mut lines = BTreeSet::new();
    for key in owned_keys(version, &wiring()) {
        let mut item: Option<&Item> = Some(doc.as_item());
        for seg in &key.path {
            item = item.and_then(|i| i.as_table_like()).and_then(|t| t.get(seg));
            if let Some(span) = item.filter(|i| i.is_value()).and_then(Item::span) {
                lines.extend(line_of(span.start)..=line_of(span.end));
            }
        }
    }
    lines
}

/// Every input line that is not an owned key is still in the output, in order.
fn assert_input_preserved(case: &str, input: &str, output: &str, version: ConfigVersion) {
    let owned = owned_lines(input, version);
    let mut out = output.lines();
    for (n, line) in input.lines().enumerate() {
        if owned.contains(&n) {
            continue;
        }
        assert!(
            out.any(|o| o == line),
            "{case}: input line {} {line:?} is missing from the output, or out of order",
            n + 1
        );
    }
}

fn assert_owned_keys_set(case: &str, text: &str, version: ConfigVersion) {
    let doc: DocumentMut = text.parse().unwrap_or_else(|e| panic!("{case}: output: {e}"));
    assert_eq!(detect_version(text, PATH).unwrap(), Some(version), "{case}");
    for key in owned_keys(version, &wiring()) {
        assert!(key.is_set_in(doc.as_table()), "{case}: {} not set", key.dotted());
    }
    let cri = doc["plugins"].as_table_like().expect("plugins table");
    match version {
        ConfigVersion::V2 => {
            assert!(cri.contains_key("io.containerd.grpc.v1.cri"), "{case}");
            assert!(
                !cri.contains_key("io.containerd.cri.v1.images"),
                "{case}: v3 table in a v2 file"
            );
        }
        ConfigVersion::V3 | ConfigVersion::V4 => {
            assert!(cri.contains_key("io.containerd.cri.v1.images"), "{case}");
            // containerd 2.x keeps a `io.containerd.grpc.v1.cri` plugin (the CRI server), without image settings.
            let legacy = ["plugins", "io.containerd.grpc.v1.cri", "containerd", "snapshotter"]
                .iter()
                .try_fold(doc.as_item(), |item, k| item.get(k))
                .is_none();
            assert!(legacy, "{case}: v2 snapshotter key written into a v{version} file");
        }
    }
    let soci = &doc["proxy_plugins"]["soci"];
    assert_eq!(soci["type"].as_str(), Some("snapshot"), "{case}");
    assert_eq!(soci["address"].as_str(), Some(DEFAULT_ADDRESS), "{case}");
    assert_eq!(soci["exports"]["root"].as_str(), Some(SOCI_ROOT), "{case}");
}

/// The containerd each fixture version is merged for.
fn daemon_for(version: ConfigVersion) -> Daemon {
    match version {
        ConfigVersion::V2 => Daemon { major: 1, minor: 7 },
        ConfigVersion::V3 => Daemon { major: 2, minor: 2 },
        ConfigVersion::V4 => Daemon { major: 2, minor: 4 },
    }
}

/// Loads `text` with Debian's containerd 1.6 and checks what it read.
fn assert_containerd_1_6_accepts(case: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, text).unwrap();
    let out = match Command::new("containerd")
        .arg("-c")
        .arg(&file)
        .args(["config", "dump"])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`containerd` is not on PATH: install Debian's containerd \
             (`apt-get install containerd`; CI installs it) to run this test"
        ),
        Err(e) => panic!("running containerd: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{case}: containerd config dump failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#"snapshotter = "soci""#), "{case}: {stdout}");
    assert!(stdout.contains(&format!("address = \"{DEFAULT_ADDRESS}\"")), "{case}");
    // containerd 1.6 does not know proxy plugin `exports`; check the rest.
    let dump: DocumentMut = stdout.parse().expect("containerd dumps TOML");
    for key in owned_keys(ConfigVersion::V2, &wiring()) {
        if !key.path.contains(&"exports") {
            assert!(
                key.is_set_in(dump.as_table()),
                "{case}: containerd read no {}",
                key.dotted()
            );
        }
    }
}

/// What the real containerd 2.x of `daemon` read from `text`: every owned key (v3 names) set?
fn real_2x_reads_every_owned_key(case: &str, daemon: &str, text: &str) -> bool {
    let (ok, stdout, stderr) = real::config_dump(daemon, text);
    assert!(ok, "{case}: containerd {daemon} config dump failed: {stderr}");
    let dump: DocumentMut = stdout.parse().expect("containerd dumps TOML");
    owned_keys(ConfigVersion::V3, &wiring())
        .iter()
        .all(|k| k.is_set_in(dump.as_table()))
}

/// Loads `text` (a merge result of `version`) with the real containerd versions that read it.
fn assert_containerd_reads(case: &str, text: &str, version: ConfigVersion) {
    match version {
        ConfigVersion::V2 => {
            assert_containerd_1_6_accepts(case, text);
            // containerd 2.x migrates v2: the prediction must match what it really does.
            let doc: DocumentMut = text.parse().unwrap();
            let drops = v2_migration_drops_owned_keys(&doc);
            for daemon in real::CONTAINERD_VERSIONS {
                assert_eq!(
                    real_2x_reads_every_owned_key(case, daemon, text),
                    !drops,
                    "{case}: containerd {daemon}'s v2 migration {} the owned keys, predicted otherwise",
                    if drops { "kept" } else { "dropped" }
                );
            }
        }
        ConfigVersion::V3 => {
            for daemon in real::CONTAINERD_VERSIONS {
                assert!(
                    real_2x_reads_every_owned_key(case, daemon, text),
                    "{case}: containerd {daemon} did not read every owned key"
                );
            }
        }
        ConfigVersion::V4 => {
            assert!(
                real_2x_reads_every_owned_key(case, "2.4.2", text),
                "{case}: containerd 2.4.2"
            );
            let (ok, _, stderr) = real::config_dump("2.2.9", text);
            assert!(!ok, "{case}: containerd 2.2.9 loaded a version 4 file");
            assert!(stderr.contains("version"), "{case}: {stderr}");
        }
    }
}

fn run_ok(case: &str, version: ConfigVersion) -> Merged {
    let input = read_input(case);
    let daemon = Some(daemon_for(version));
    let merged =
        merge(input.as_deref(), PATH, &wiring(), daemon).unwrap_or_else(|e| panic!("{case}: merge failed: {e}"));
    golden(&data_dir().join(case).join("expected.toml"), &merged.text);
    assert_eq!(merged.version, version, "{case}");
    assert_eq!(merged.created, input.is_none(), "{case}");
    assert_eq!(merged.changed, input.as_deref() != Some(&merged.text), "{case}");
    if let Some(input) = &input {
        assert_input_preserved(case, input, &merged.text, version);
    }
    assert_owned_keys_set(case, &merged.text, version);
    let again = merge(Some(&merged.text), PATH, &wiring(), daemon).expect("output merges");
    assert!(!again.changed, "{case}: second merge changed something");
    assert_eq!(again.text, merged.text, "{case}: not idempotent");
    assert_containerd_reads(case, &merged.text, version);
    merged
}

fn run_err(case: &str, is_expected: fn(&ContainerdConfigError) -> bool) {
    run_err_for(case, None, is_expected);
}

fn run_err_for(case: &str, daemon: Option<Daemon>, is_expected: fn(&ContainerdConfigError) -> bool) {
    let input = read_input(case).expect("failure cases have an input");
    let err = merge(Some(&input), PATH, &wiring(), daemon).expect_err(case);
    assert!(is_expected(&err), "{case}: unexpected error {err:?}");
    golden(&data_dir().join(case).join("expected-error.txt"), &format!("{err}\n"));
}

#[test]
fn debian_default_config() {
    run_ok("debian-default", ConfigVersion::V2);
}

#[test]
fn eks_v2_template() {
    run_ok("eks-v2", ConfigVersion::V2);
}

#[test]
fn eks_v3_template() {
    run_ok("eks-v3", ConfigVersion::V3);
}

#[test]
fn containerd_2_default_configs() {
    run_ok("containerd-2.2-default", ConfigVersion::V3);
    run_ok("containerd-2.4-default", ConfigVersion::V4);
}

/// A new file gets the version its containerd writes: 2 for 1.x, 3 for 2.0-2.3, 4 for 2.4+.
#[test]
fn no_file_creates_a_minimal_file_for_the_daemon() {
    for (case, version) in [
        ("no-file", ConfigVersion::V2),
        ("no-file-v3", ConfigVersion::V3),
        ("no-file-v4", ConfigVersion::V4),
    ] {
        let merged = run_ok(case, version);
        assert!(merged.text.starts_with("# "), "{case}: starts with a comment");
        assert!(
            !merged.text.contains("[plugins]\n"),
            "{case}: no empty [plugins] header"
        );
    }
    let err = merge(None, PATH, &wiring(), None).unwrap_err();
    assert!(matches!(err, ContainerdConfigError::UnknownDaemon { .. }), "{err:?}");
}

#[test]
fn empty_and_comment_only_files_get_a_minimal_file() {
    let empty = run_ok("empty-file", ConfigVersion::V2);
    assert!(!empty.created && empty.changed);
    let v2 = Some(daemon_for(ConfigVersion::V2));
    assert_eq!(empty.text, merge(None, PATH, &wiring(), v2).unwrap().text);
    run_ok("comments-only", ConfigVersion::V2);
}

/// containerd 2.x reads v2 through a migration (that drops the owned keys without `runtimes`):
/// no v2 content is written for it. 2.2 cannot load v4.
#[test]
fn files_the_daemon_would_misread_are_refused() {
    let v2_on_2 = |e: &ContainerdConfigError| matches!(e, ContainerdConfigError::V2ForContainerd2 { .. });
    run_err_for("fail-v2-on-containerd-2", Some(daemon_for(ConfigVersion::V3)), v2_on_2);
    run_err_for(
        "fail-v2-drops-on-containerd-2",
        Some(daemon_for(ConfigVersion::V4)),
        v2_on_2,
    );
    run_err_for("fail-v4-on-containerd-2.2", Some(daemon_for(ConfigVersion::V3)), |e| {
        matches!(e, ContainerdConfigError::TooNewForDaemon { file: 4, .. })
    });
}

#[test]
fn already_wired_files_are_left_byte_identical() {
    for case in ["already-wired-v2", "already-wired-v3"] {
        let version = if case.ends_with("v2") {
            ConfigVersion::V2
        } else {
            ConfigVersion::V3
        };
        let merged = run_ok(case, version);
        assert!(!merged.changed, "{case}");
        assert_eq!(Some(merged.text), read_input(case), "{case}");
    }
}

#[test]
fn wrong_values_are_replaced_keeping_comments() {
    let merged = run_ok("wrong-values-with-comments", ConfigVersion::V2);
    assert!(
        merged
            .text
            .contains(r#"snapshotter = "soci" # was overlayfs before SOCI"#)
    );
    assert!(
        merged
            .text
            .contains("disable_snapshot_annotations = false   # a string")
    );
}

#[test]
fn dotted_keys_and_inline_tables_are_edited_in_place() {
    run_ok("dotted-keys-v2", ConfigVersion::V2);
    run_ok("inline-tables-v2", ConfigVersion::V2);
    run_ok("dotted-inline-v3", ConfigVersion::V3);
    run_ok("implicit-soci-table", ConfigVersion::V2);
}

#[test]
fn malformed_toml_is_a_parse_error() {
    run_err(
        "fail-malformed",
        |e| matches!(e, ContainerdConfigError::Parse { message, .. } if message.contains("line 2")),
    );
}

#[test]
fn unsupported_versions_are_refused() {
    let unknown = |e: &ContainerdConfigError| matches!(e, ContainerdConfigError::UnknownVersion { .. });
    for case in [
        "fail-version-1",
        "fail-version-missing",
        "fail-version-5",
        "fail-version-string",
    ] {
        run_err(case, unknown);
    }
}

#[test]
fn non_table_parents_are_conflicts() {
    run_err(
        "fail-proxy-plugins-scalar",
        |e| matches!(e, ContainerdConfigError::Conflict { key, .. } if key == "proxy_plugins"),
    );
    run_err(
        "fail-owned-key-is-table",
        |e| matches!(e, ContainerdConfigError::Conflict { key, .. } if key == "proxy_plugins.soci.address"),
    );
}

/// The NodeConfig fragment is exactly the wired state: behind a `version`
/// line it merges as a no-op.
#[test]
fn nodeconfig_fragments() {
    for (version, name) in [(ConfigVersion::V2, "v2.toml"), (ConfigVersion::V3, "v3.toml")] {
        let text = fragment(version, &wiring());
        golden(&data_dir().join("fragment").join(name), &text);
        assert!(text.ends_with('\n') && !text.contains("version"), "{name}");
        let file = format!("version = {version}\n\n{text}");
        let merged = merge(Some(&file), PATH, &wiring(), Some(daemon_for(version))).unwrap();
        assert!(!merged.changed, "{name}: fragment is not fully wired");
        assert_owned_keys_set(name, &file, version);
        if version == ConfigVersion::V2 {
            assert_containerd_1_6_accepts(name, &file);
        } else {
            assert_containerd_reads(name, &file, version);
        }
    }
}

/// Every fixture directory is exercised by a test above.
#[test]
fn every_fixture_has_a_test() {
    let source = include_str!("containerd_merge.rs");
    for entry in std::fs::read_dir(data_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(source.contains(&format!("\"{name}\"")), "fixture {name} has no test");
    }
}

/// `[proxy_plugins.soci]` of another type is someone else's plugin: refused, never taken over.
#[test]
fn a_foreign_plugin_named_soci_is_refused() {
    run_err_for(
        "fail-foreign-soci-plugin",
        Some(daemon_for(ConfigVersion::V3)),
        |e| matches!(e, ContainerdConfigError::Conflict { key, reason, .. } if key == "proxy_plugins.soci.type" && reason.contains("\"content\"")),
    );
}

/// A UTF-8 byte-order mark stays where it was; nothing else changes because of it.
#[test]
fn a_byte_order_mark_is_kept() {
    let plain = read_input("eks-v3").unwrap();
    let daemon = Some(daemon_for(ConfigVersion::V3));
    let without = merge(Some(&plain), PATH, &wiring(), daemon).unwrap();
    let with = merge(Some(&format!("\u{feff}{plain}")), PATH, &wiring(), daemon).unwrap();
    assert_eq!(with.text, format!("\u{feff}{}", without.text));
    let again = merge(Some(&with.text), PATH, &wiring(), daemon).unwrap();
    assert!(!again.changed && again.text == with.text, "not idempotent with a BOM");
}
