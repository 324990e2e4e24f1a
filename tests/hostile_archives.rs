//! `extract_verified` against hostile and broken archives: every refusal
//! rule, each a verification failure that leaves no extracted file behind.
//! Every hostile archive carries a correct digest, so the entry rules (not
//! the checksum) are what refuses it.

mod common;

use common::archive::{self, Member, hostile};
use common::{dir_names, mode_of};
use soci_agent::release::Sha256Hex;
use soci_agent::release::extract::{ExtractError, Extracted, extract_verified};

fn digest(bytes: &[u8]) -> Sha256Hex {
    Sha256Hex::parse(&archive::sha256_hex(bytes)).unwrap()
}

fn extract(bytes: &[u8]) -> (tempfile::TempDir, Result<Extracted, ExtractError>) {
    let dir = tempfile::tempdir().unwrap();
    let result = extract_verified(bytes, dir.path(), &digest(bytes));
    (dir, result)
}

/// Extracts `bytes` (with their true digest) and checks the refusal contract:
/// a verification failure and an empty destination. Returns the error.
fn refused(bytes: &[u8]) -> ExtractError {
    let (dir, result) = extract(bytes);
    let err = result.expect_err("archive must be refused");
    assert!(err.is_verification_failure(), "not a verification failure: {err:?}");
    assert_eq!(
        dir_names(dir.path()),
        Vec::<String>::new(),
        "files left behind after: {err}"
    );
    err
}

#[test]
fn standard_release_is_accepted_with_normalised_modes() {
    let bytes = archive::standard_release("0.15.0");
    let (dir, result) = extract(&bytes);
    let got = result.unwrap();
    assert_eq!(got.archive_sha256, digest(&bytes));
    assert_eq!(got.archive_bytes, bytes.len() as u64);
    let names: Vec<&str> = got.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, archive::RELEASE_ENTRIES);
    for (name, content) in archive::standard_contents("0.15.0") {
        let path = dir.path().join(name);
        assert_eq!(std::fs::read(&path).unwrap(), content, "{name}");
        let file = got.files.iter().find(|f| f.name == name).unwrap();
        assert_eq!(file.sha256, digest(&content), "{name}");
        assert_eq!(file.size, content.len() as u64);
        let expected_mode = if name == "soci-snapshotter-grpc" || name == "soci" {
            0o755
        } else {
            0o644
        };
        assert_eq!(mode_of(&path), expected_mode, "{name}");
        assert_eq!(file.mode, expected_mode);
    }
}

#[test]
fn archive_modes_are_ignored() {
    let daemon = archive::daemon_script("0.15.0");
    let bytes = archive::tar_gz(&[
        Member::File {
            name: "soci-snapshotter-grpc",
            data: &daemon,
            mode: 0o6777,
        },
        Member::File {
            name: "NOTICE.md",
            data: b"n",
            mode: 0o777,
        },
    ]);
    let (dir, result) = extract(&bytes);
    result.unwrap();
    assert_eq!(mode_of(&dir.path().join("soci-snapshotter-grpc")), 0o755);
    assert_eq!(mode_of(&dir.path().join("NOTICE.md")), 0o644);
}

#[test]
fn dot_slash_prefix_root_dir_and_pax_paths_are_accepted() {
    let daemon = archive::daemon_script("0.15.0");
    let records: [(&str, &[u8]); 2] = [("path", b"soci"), ("mtime", b"1700000000.5")];
    let bytes = archive::tar_gz(&[
        Member::Dir { name: "./" },
        Member::file("./soci-snapshotter-grpc", &daemon),
        Member::Pax { records: &records },
        Member::file("PaxHeaders-placeholder", b"cli"),
        Member::GnuLongName { name: "NOTICE.md" },
        Member::file("ignored-header-name", b"notice"),
    ]);
    let (dir, result) = extract(&bytes);
    let names: Vec<String> = result.unwrap().files.into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["soci-snapshotter-grpc", "soci", "NOTICE.md"]);
    assert_eq!(dir_names(dir.path()), ["NOTICE.md", "soci", "soci-snapshotter-grpc"]);
    assert_eq!(std::fs::read(dir.path().join("soci")).unwrap(), b"cli");
}

#[test]
fn symlink_is_refused() {
    let err = refused(&hostile::symlink());
    assert!(
        matches!(&err, ExtractError::EntryType { name, .. } if name == "soci"),
        "{err:?}"
    );
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

#[test]
fn hardlink_is_refused() {
    let err = refused(&hostile::hardlink());
    assert!(
        matches!(&err, ExtractError::EntryType { name, .. } if name == "soci"),
        "{err:?}"
    );
    assert!(err.to_string().contains("hard link"), "{err}");
}

#[test]
fn fifo_is_refused() {
    let err = refused(&hostile::fifo());
    assert!(
        matches!(&err, ExtractError::EntryType { kind, .. } if kind == "FIFO"),
        "{err:?}"
    );
}

#[test]
fn char_device_is_refused() {
    let err = refused(&hostile::char_device());
    assert!(
        matches!(&err, ExtractError::EntryType { kind, .. } if kind == "character device"),
        "{err:?}"
    );
}

#[test]
fn directory_is_refused() {
    let err = refused(&hostile::directory());
    assert!(
        matches!(&err, ExtractError::EntryType { kind, .. } if kind == "directory"),
        "{err:?}"
    );
}

#[test]
fn absolute_name_is_refused() {
    let err = refused(&hostile::absolute_name());
    assert!(
        matches!(&err, ExtractError::AbsolutePath { name } if name == "/usr/local/bin/soci"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("/usr/local/bin/soci"),
        "error must name the entry: {err}"
    );
}

#[test]
fn parent_dir_name_is_refused() {
    let err = refused(&hostile::parent_dir_name());
    assert!(
        matches!(&err, ExtractError::ParentDir { name } if name == "../soci"),
        "{err:?}"
    );
}

#[test]
fn nested_name_is_refused() {
    let err = refused(&hostile::nested_name());
    assert!(
        matches!(&err, ExtractError::NestedPath { name } if name == "bin/soci"),
        "{err:?}"
    );
}

#[test]
fn unknown_name_is_refused() {
    let err = refused(&hostile::unknown_name());
    assert!(
        matches!(&err, ExtractError::UnexpectedEntry { name } if name == "install.sh"),
        "{err:?}"
    );
}

#[test]
fn duplicate_entry_is_refused() {
    let err = refused(&hostile::duplicate());
    assert!(
        matches!(&err, ExtractError::Duplicate { name } if name == "soci-snapshotter-grpc"),
        "{err:?}"
    );
}

#[test]
fn oversize_header_is_refused_before_writing() {
    let err = refused(&hostile::oversize_header());
    assert!(
        matches!(&err, ExtractError::TooLarge { name, size, .. } if name == "soci" && *size == 256 * 1024 * 1024 + 1),
        "{err:?}"
    );
}

#[test]
fn pax_path_with_parent_dir_is_refused() {
    let err = refused(&hostile::pax_parent_dir());
    assert!(
        matches!(&err, ExtractError::ParentDir { name } if name == "../../usr/bin/soci"),
        "{err:?}"
    );
}

#[test]
fn gnu_long_name_nested_path_is_refused() {
    let err = refused(&hostile::gnu_long_nested());
    assert!(
        matches!(&err, ExtractError::NestedPath { name } if name.ends_with("d/soci")),
        "{err:?}"
    );
}

#[test]
fn huge_pax_record_is_refused() {
    let err = refused(&hostile::huge_pax());
    assert!(matches!(&err, ExtractError::BadMetadata { .. }), "{err:?}");
}

#[test]
fn missing_daemon_is_refused() {
    let err = refused(&hostile::only_cli());
    assert!(matches!(err, ExtractError::MissingDaemon), "{err:?}");
}

#[test]
fn truncated_gzip_is_refused() {
    // Large incompressible entry so the cut lands inside file data.
    let notice = archive::noise(256 * 1024, 7);
    let daemon = archive::daemon_script("0.15.0");
    let full = archive::release_tar_gz(&[("soci-snapshotter-grpc", &daemon), ("NOTICE.md", &notice)]);
    let half = &full[..full.len() / 2];
    let err = refused(half);
    assert!(
        matches!(err, ExtractError::Corrupt { .. } | ExtractError::TruncatedEntry { .. }),
        "{err:?}"
    );
}

#[test]
fn missing_gzip_trailer_is_refused() {
    let bytes = archive::standard_release("0.15.0");
    let cut = &bytes[..bytes.len() - 4]; // drop the ISIZE field of the trailer
    let err = refused(cut);
    assert!(matches!(err, ExtractError::Corrupt { .. }), "{err:?}");
}

#[test]
fn garbage_file_is_refused() {
    let err = refused(b"<html><body>Rate limited</body></html>\n");
    assert!(matches!(err, ExtractError::Corrupt { .. }), "{err:?}");
}

#[test]
fn uncompressed_tar_is_refused() {
    let tar = archive::tar_bytes(&[Member::file("soci-snapshotter-grpc", b"x")]);
    let err = refused(&tar);
    assert!(matches!(err, ExtractError::Corrupt { .. }), "{err:?}");
}

#[test]
fn wrong_digest_is_refused_and_names_both_digests() {
    let bytes = archive::standard_release("0.15.0");
    let dir = tempfile::tempdir().unwrap();
    let wrong = Sha256Hex::parse(&common::wrong_digest(&bytes)).unwrap();
    let err = extract_verified(&bytes[..], dir.path(), &wrong).unwrap_err();
    assert!(err.is_verification_failure());
    let text = err.to_string();
    assert!(
        text.contains(wrong.as_str()) && text.contains(&archive::sha256_hex(&bytes)),
        "{text}"
    );
    assert_eq!(dir_names(dir.path()), Vec::<String>::new());
}

#[test]
fn trailing_bytes_after_gzip_member_are_covered_by_the_digest() {
    let mut bytes = archive::standard_release("0.15.0");
    let clean = digest(&bytes);
    bytes.extend_from_slice(b"appended junk");
    let dir = tempfile::tempdir().unwrap();
    let err = extract_verified(&bytes[..], dir.path(), &clean).unwrap_err();
    assert!(
        matches!(err, ExtractError::DigestMismatch { bytes: n, .. } if n == bytes.len() as u64),
        "{err:?}"
    );
    assert_eq!(dir_names(dir.path()), Vec::<String>::new());
}

#[test]
fn write_errors_are_not_verification_failures() {
    let bytes = archive::standard_release("0.15.0");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("soci"), b"already here").unwrap();
    let err = extract_verified(&bytes[..], dir.path(), &digest(&bytes)).unwrap_err();
    assert!(
        matches!(&err, ExtractError::CreateFile { path, .. } if path.ends_with("soci")),
        "{err:?}"
    );
    assert!(!err.is_verification_failure());
    // The daemon written before the collision is removed; the foreign file stays.
    assert_eq!(dir_names(dir.path()), ["soci"]);
}

#[test]
fn endless_metadata_records_are_refused() {
    let records: [(&str, &[u8]); 1] = [("comment", b"padding")];
    let daemon = archive::daemon_script("0.15.0");
    let mut members = vec![Member::file("soci-snapshotter-grpc", &daemon)];
    members.extend(std::iter::repeat_n(Member::Pax { records: &records }, 40));
    members.push(Member::file("soci", b"x"));
    let err = refused(&archive::tar_gz(&members));
    assert!(matches!(err, ExtractError::BadMetadata { .. }), "{err:?}");
}

#[test]
fn repeated_root_directory_is_refused() {
    let daemon = archive::daemon_script("0.15.0");
    let bytes = archive::tar_gz(&[
        Member::Dir { name: "./" },
        Member::file("soci-snapshotter-grpc", &daemon),
        Member::Dir { name: "." },
    ]);
    let err = refused(&bytes);
    assert!(matches!(err, ExtractError::BadMetadata { .. }), "{err:?}");
}

#[test]
fn megabytes_after_the_tar_end_are_refused() {
    let daemon = archive::daemon_script("0.15.0");
    let mut tar = archive::tar_bytes(&[Member::file("soci-snapshotter-grpc", &daemon)]);
    tar.resize(tar.len() + 2 * 1024 * 1024, 0);
    let err = refused(&archive::gzip(&tar));
    assert!(
        matches!(
            err,
            ExtractError::TrailingData {
                after: "tar end marker",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn megabytes_after_the_gzip_stream_are_refused() {
    let mut bytes = archive::standard_release("0.15.0");
    bytes.extend(archive::noise(2 * 1024 * 1024, 1));
    let err = refused(&bytes);
    assert!(
        matches!(
            err,
            ExtractError::TrailingData {
                after: "gzip stream",
                ..
            }
        ),
        "{err:?}"
    );
}
