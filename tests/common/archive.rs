//! Release-layout archives built in memory, well-formed or hostile.
//!
//! Tar members are written by hand (512-byte headers from the `tar` crate's
//! [`Header`], names copied straight into the name field) so tests can build
//! what a well-behaved builder refuses to: absolute and `..` names, devices,
//! headers that lie about their size.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// The four names of a real release, in upstream order.
pub const RELEASE_ENTRIES: [&str; 4] = ["soci-snapshotter-grpc", "soci", "THIRD_PARTY_LICENSES", "NOTICE.md"];
pub const DAEMON: &str = "soci-snapshotter-grpc";

/// One tar member for [`tar_gz`] / [`tar_bytes`].
#[derive(Debug, Clone, Copy)]
pub enum Member<'a> {
    /// Regular file with the given mode bits (archive modes are ignored by the extractor).
    File {
        name: &'a str,
        data: &'a [u8],
        mode: u32,
    },
    Symlink {
        name: &'a str,
        target: &'a str,
    },
    Hardlink {
        name: &'a str,
        target: &'a str,
    },
    Fifo {
        name: &'a str,
    },
    CharDevice {
        name: &'a str,
    },
    Dir {
        name: &'a str,
    },
    /// Regular-file header announcing `size` bytes, followed by one block of
    /// data; the tar stream ends there (no end marker).
    OversizeFile {
        name: &'a str,
        size: u64,
    },
    /// PAX extended header (type `x`) for the next member: `key=value` records.
    Pax {
        records: &'a [(&'a str, &'a [u8])],
    },
    /// GNU long name record (type `L`) for the next member.
    GnuLongName {
        name: &'a str,
    },
}

impl<'a> Member<'a> {
    /// A regular file with mode 0755.
    pub fn file(name: &'a str, data: &'a [u8]) -> Self {
        Member::File {
            name,
            data,
            mode: 0o755,
        }
    }
}

fn header(kind: EntryType, name: &str, size: u64, mode: u32) -> Header {
    let mut h = if matches!(kind, EntryType::GNULongName) {
        Header::new_gnu()
    } else {
        Header::new_ustar()
    };
    let bytes = name.as_bytes();
    assert!(
        bytes.len() <= 100,
        "name {name:?} does not fit a tar header; use GnuLongName or Pax"
    );
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

fn push(out: &mut Vec<u8>, mut h: Header, data: &[u8]) {
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `len` counts itself.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut digits = 1;
    while (body + digits).to_string().len() != digits {
        digits += 1;
    }
    let mut rec = format!("{} {key}=", body + digits).into_bytes();
    rec.extend_from_slice(value);
    rec.push(b'\n');
    rec
}

/// An uncompressed tar stream of `members`, with the end-of-archive marker
/// unless a member ends the stream early.
pub fn tar_bytes(members: &[Member<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        match *m {
            Member::File { name, data, mode } => push(
                &mut out,
                header(EntryType::Regular, name, data.len() as u64, mode),
                data,
            ),
            Member::Symlink { name, target } | Member::Hardlink { name, target } => {
                let kind = if matches!(m, Member::Symlink { .. }) {
                    EntryType::Symlink
                } else {
                    EntryType::Link
                };
                let mut h = header(kind, name, 0, 0o777);
                h.set_link_name_literal(target).expect("link target fits");
                push(&mut out, h, &[]);
            }
            Member::Fifo { name } => push(&mut out, header(EntryType::Fifo, name, 0, 0o644), &[]),
            Member::CharDevice { name } => {
                let mut h = header(EntryType::Char, name, 0, 0o666);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                push(&mut out, h, &[]);
            }
            Member::Dir { name } => push(&mut out, header(EntryType::Directory, name, 0, 0o755), &[]),
            Member::OversizeFile { name, size } => {
                push(&mut out, header(EntryType::Regular, name, size, 0o755), &[0x7f; 512]);
                return out;
            }
            Member::Pax { records } => {
                let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
                push(
                    &mut out,
                    header(EntryType::XHeader, "PaxHeaders/next", data.len() as u64, 0o644),
                    &data,
                );
            }
            Member::GnuLongName { name } => {
                let mut data = name.as_bytes().to_vec();
                data.push(0);
                push(
                    &mut out,
                    header(EntryType::GNULongName, "././@LongLink", data.len() as u64, 0o644),
                    &data,
                );
            }
        }
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// `tar_bytes(members)`, gzip'd.
pub fn tar_gz(members: &[Member<'_>]) -> Vec<u8> {
    gzip(&tar_bytes(members))
}

/// A release-layout `.tar.gz` of regular files (mode 0755), in the given order.
pub fn release_tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let members: Vec<Member<'_>> = entries.iter().map(|(n, d)| Member::file(n, d)).collect();
    tar_gz(&members)
}

/// Content of the fake daemon: a shell script answering `--version` /
/// `-version` like the real one.
pub fn daemon_script(version: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\ncase \"$1\" in\n  --version|-version) echo \"soci-snapshotter-grpc version v{version} deadbeef\" ;;\n  *) echo \"fake soci-snapshotter-grpc $*\" ;;\nesac\n"
    )
    .into_bytes()
}

/// Content of each of the four entries of [`standard_release`].
pub fn standard_contents(version: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (DAEMON, daemon_script(version)),
        (
            "soci",
            format!("#!/bin/sh\necho \"soci version v{version} deadbeef\"\n").into_bytes(),
        ),
        (
            "THIRD_PARTY_LICENSES",
            b"Third-party licenses of a test release.\n".to_vec(),
        ),
        (
            "NOTICE.md",
            b"# NOTICE\nTest release built by soci-agent's test suite.\n".to_vec(),
        ),
    ]
}

/// The four real entries; the daemon prints
/// `soci-snapshotter-grpc version v{version} deadbeef` for `--version`.
pub fn standard_release(version: &str) -> Vec<u8> {
    let contents = standard_contents(version);
    let entries: Vec<(&str, &[u8])> = contents.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    release_tar_gz(&entries)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly what `sha256sum NAME` prints: `<64 hex>  <name>\n`.
pub fn sha256sum_line(bytes: &[u8], name: &str) -> String {
    format!("{}  {name}\n", sha256_hex(bytes))
}

/// Deterministic pseudo-random bytes (incompressible filler for big entries).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = vec![0u8; len];
    rng.fill(&mut out);
    out
}

/// Hostile or broken archives. Each starts with a well-formed daemon entry
/// (so the extractor has already written a file when it meets the bad
/// member) and is otherwise a complete gzip'd tar.
pub mod hostile {
    use super::{DAEMON, Member, daemon_script, release_tar_gz, tar_gz};

    fn after_daemon(bad: &[Member<'_>]) -> Vec<u8> {
        let daemon = daemon_script("0.15.0");
        let mut members = vec![Member::file(DAEMON, &daemon)];
        members.extend_from_slice(bad);
        tar_gz(&members)
    }

    pub fn symlink() -> Vec<u8> {
        after_daemon(&[Member::Symlink {
            name: "soci",
            target: "/etc/shadow",
        }])
    }
    pub fn hardlink() -> Vec<u8> {
        after_daemon(&[Member::Hardlink {
            name: "soci",
            target: DAEMON,
        }])
    }
    pub fn fifo() -> Vec<u8> {
        after_daemon(&[Member::Fifo { name: "soci" }])
    }
    pub fn char_device() -> Vec<u8> {
        after_daemon(&[Member::CharDevice { name: "soci" }])
    }
    /// A directory with an allowed name (the type is what is wrong).
    pub fn directory() -> Vec<u8> {
        after_daemon(&[Member::Dir { name: "soci" }])
    }
    pub fn absolute_name() -> Vec<u8> {
        after_daemon(&[Member::file("/usr/local/bin/soci", b"x")])
    }
    pub fn parent_dir_name() -> Vec<u8> {
        after_daemon(&[Member::file("../soci", b"x")])
    }
    pub fn nested_name() -> Vec<u8> {
        after_daemon(&[Member::file("bin/soci", b"x")])
    }
    pub fn unknown_name() -> Vec<u8> {
        after_daemon(&[Member::file("install.sh", b"#!/bin/sh\nrm -rf /\n")])
    }
    pub fn duplicate() -> Vec<u8> {
        after_daemon(&[Member::file(DAEMON, b"second copy")])
    }
    /// Header says one byte over the extractor's 256 MiB cap.
    pub fn oversize_header() -> Vec<u8> {
        after_daemon(&[Member::OversizeFile {
            name: "soci",
            size: 256 * 1024 * 1024 + 1,
        }])
    }
    /// A PAX `path` record that escapes with `..` (header name is harmless).
    pub fn pax_parent_dir() -> Vec<u8> {
        let records: [(&str, &[u8]); 1] = [("path", b"../../usr/bin/soci")];
        after_daemon(&[Member::Pax { records: &records }, Member::file("soci", b"x")])
    }
    /// A GNU long name that resolves to a nested path.
    pub fn gnu_long_nested() -> Vec<u8> {
        let long = format!("{}soci", "d/".repeat(60));
        after_daemon(&[Member::GnuLongName { name: &long }, Member::file("soci", b"x")])
    }
    /// A 1 MiB PAX record: over the metadata cap, must not be buffered.
    pub fn huge_pax() -> Vec<u8> {
        let big = vec![b'a'; 1024 * 1024];
        let records = [("comment", big.as_slice())];
        after_daemon(&[Member::Pax { records: &records }, Member::file("soci", b"x")])
    }
    /// Valid archive without the daemon.
    pub fn only_cli() -> Vec<u8> {
        release_tar_gz(&[("soci", b"#!/bin/sh\n")])
    }
}

/// A one-layer OCI image layout tarball of image `name`, shaped like the EKS AMI's
/// `/etc/eks/pause.tar`: the layer holds `/pause` (a script that sleeps, the entrypoint); the
/// index names the image (`io.containerd.image.name`) for this machine's architecture, as
/// `ctr images import` and the agent's boot unit take it.
pub fn oci_image_tar(name: &str) -> Vec<u8> {
    let layer = tar_bytes(&[Member::file("pause", b"#!/bin/sh\nexec sleep infinity\n")]);
    let layer_gz = gzip(&layer);
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Entrypoint": ["/pause"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", sha256_hex(&layer_gz)),
            "size": layer_gz.len(),
        }],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))
    .unwrap();
    let blobs: Vec<(String, &[u8])> = [&layer_gz, &config, &manifest]
        .into_iter()
        .map(|b| (format!("blobs/sha256/{}", sha256_hex(b)), b.as_slice()))
        .collect();
    let mut members = vec![
        Member::file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        Member::file("index.json", &index),
        Member::Dir { name: "blobs/" },
        Member::Dir { name: "blobs/sha256/" },
    ];
    members.extend(blobs.iter().map(|(n, b)| Member::file(n, b)));
    tar_bytes(&members)
}
