//! SOCI config.toml: golden renders, round trips, validation rules (equal
//! to the daemon's, SOCI 0.11.0-0.16.1), the key table with first versions,
//! version-aware rendering and the unknown-key check `doctor` uses.

use soci_agent::files::soci_config::*;
use soci_agent::release::Version;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use toml_edit::{DocumentMut, TableLike};

fn fixture(case: &str, name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/soci_config")
        .join(case)
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn with_gzip() -> SociConfig {
    SociConfig {
        gzip: Some(Decompressor::unpigz("/usr/bin/unpigz")),
        ..Default::default()
    }
}

fn ver(s: &str) -> Version {
    s.parse().unwrap()
}

/// Every SOCI release with parallel mode up to the newest one recorded.
const RELEASES: [&str; 10] = [
    "0.11.0", "0.11.1", "0.12.0", "0.12.1", "0.13.0", "0.14.0", "0.14.1", "0.15.0", "0.16.0", "0.16.1",
];

fn tuning(f: impl FnOnce(&mut Tuning)) -> Tuning {
    let mut t = Tuning::default();
    f(&mut t);
    t
}

/// Dotted paths of every leaf value in a TOML document.
fn leaves(table: &dyn TableLike, prefix: &str, out: &mut Vec<String>) {
    for (k, item) in table.iter() {
        let path = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        match item.as_table_like() {
            Some(sub) => leaves(sub, &path, out),
            None => out.push(path),
        }
    }
}

#[test]
fn defaults_are_the_eks_ami_values() {
    let t = Tuning::default();
    assert_eq!(
        (t.max_concurrent_downloads, t.max_concurrent_downloads_per_image),
        (-1, 20)
    );
    assert_eq!((t.max_concurrent_unpacks, t.max_concurrent_unpacks_per_image), (-1, 12));
    assert_eq!(t.concurrent_download_chunk_size, "16mb");
    assert!(t.discard_unpacked_layers);
    let c = SociConfig::default();
    assert_eq!(c.containerd_address, "/run/containerd/containerd.sock");
    assert_eq!(c.image_service_path, "/run/containerd/containerd.sock");
    assert_eq!(c.gzip, None);
    assert_eq!(c.version, ver("0.16.1"));
    assert_eq!(Decompressor::unpigz("/usr/bin/unpigz").args, ["-d", "-c"]);
    assert_eq!(validate(&t), Ok(()));
}

#[test]
fn golden_renders() {
    assert_eq!(render(&SociConfig::default()), fixture("default", "expected.toml"));
    assert_eq!(render(&with_gzip()), fixture("eks_unpigz", "expected.toml"));
    assert!(render(&SociConfig::default()).starts_with(&format!("{HEADER}\n")));
    assert_eq!(
        render(&with_gzip()),
        render(&with_gzip()),
        "render must be deterministic"
    );
}

#[test]
fn no_decompress_streams_without_gzip() {
    let text = render(&SociConfig::default());
    assert!(!text.contains("decompress_streams"));
    let doc: DocumentMut = text.parse().unwrap();
    assert!(
        doc["pull_modes"]["parallel_pull_unpack"]
            .get("decompress_streams")
            .is_none()
    );
}

#[test]
fn every_rendered_key_is_known() {
    for cfg in [SociConfig::default(), with_gzip()] {
        let text = render(&cfg);
        let doc: DocumentMut = text.parse().unwrap();
        let mut found = Vec::new();
        leaves(doc.as_table(), "", &mut found);
        assert_eq!(found.len(), if cfg.gzip.is_some() { 13 } else { 11 });
        for key in &found {
            assert_eq!(first_version(key), Some(ver("0.11.0")), "{key}");
        }
        assert_eq!(unknown_keys(&text), Ok(vec![]));
        for v in RELEASES {
            assert_eq!(unknown_keys_for(&text, Some(ver(v))), Ok(vec![]), "{v}");
        }
    }
}

#[derive(serde::Deserialize, Debug)]
struct File {
    content_store: Store,
    cri_keychain: Keychain,
    pull_modes: Modes,
}
#[derive(serde::Deserialize, Debug)]
struct Store {
    r#type: String,
    containerd_address: String,
}
#[derive(serde::Deserialize, Debug)]
struct Keychain {
    enable_keychain: bool,
    image_service_path: String,
}
#[derive(serde::Deserialize, Debug)]
struct Modes {
    parallel_pull_unpack: Parallel,
}
#[derive(serde::Deserialize, Debug)]
struct Parallel {
    enable: bool,
    max_concurrent_downloads: i64,
    max_concurrent_downloads_per_image: i64,
    concurrent_download_chunk_size: String,
    max_concurrent_unpacks: i64,
    max_concurrent_unpacks_per_image: i64,
    discard_unpacked_layers: bool,
    decompress_streams: Option<std::collections::BTreeMap<String, Stream>>,
}
#[derive(serde::Deserialize, Debug)]
struct Stream {
    path: String,
    args: Vec<String>,
}

#[test]
fn rendered_values_read_back() {
    let custom = SociConfig {
        tuning: Tuning {
            max_concurrent_downloads: 40,
            max_concurrent_downloads_per_image: 10,
            concurrent_download_chunk_size: " 1.5 GB ".to_string(),
            max_concurrent_unpacks: 8,
            max_concurrent_unpacks_per_image: 8,
            discard_unpacked_layers: false,
        },
        gzip: Some(Decompressor {
            path: "/opt/bin/un \"pigz\"".to_string(),
            args: vec!["-d".into(), "-c".into()],
        }),
        containerd_address: "/run/k3s/containerd/containerd.sock".to_string(),
        image_service_path: "/run/k3s/containerd/containerd.sock".to_string(),
        ..Default::default()
    };
    for cfg in [SociConfig::default(), with_gzip(), custom] {
        let text = render(&cfg);
        let f: File = toml_edit::de::from_str(&text).unwrap();
        let p = &f.pull_modes.parallel_pull_unpack;
        assert!(p.enable && f.cri_keychain.enable_keychain);
        assert_eq!(f.content_store.r#type, "containerd");
        assert_eq!(f.content_store.containerd_address, cfg.containerd_address);
        assert_eq!(f.cri_keychain.image_service_path, cfg.image_service_path);
        let back = Tuning {
            max_concurrent_downloads: p.max_concurrent_downloads,
            max_concurrent_downloads_per_image: p.max_concurrent_downloads_per_image,
            concurrent_download_chunk_size: p.concurrent_download_chunk_size.clone(),
            max_concurrent_unpacks: p.max_concurrent_unpacks,
            max_concurrent_unpacks_per_image: p.max_concurrent_unpacks_per_image,
            discard_unpacked_layers: p.discard_unpacked_layers,
        };
        assert_eq!(back, cfg.tuning);
        let gzip = p.decompress_streams.as_ref().and_then(|s| s.get("gzip"));
        assert_eq!(
            gzip.map(|g| (&g.path, &g.args)),
            cfg.gzip.as_ref().map(|g| (&g.path, &g.args))
        );
        assert_eq!(read_back(&text), Ok(Some(cfg.clone())));
    }
}

#[test]
fn read_back_refuses_other_shapes() {
    let ours = render(&SociConfig::default());
    assert_eq!(read_back(&ours.replace("\"containerd\"", "\"soci\"")), Ok(None));
    assert_eq!(read_back(&ours.replace("enable = true\n", "")), Ok(None));
    assert_eq!(read_back(&ours.replace("max_concurrent_unpacks = -1\n", "")), Ok(None));
    assert_eq!(read_back(""), Ok(None));
    assert!(read_back("[content_store").is_err());
}

#[test]
fn limits_at_or_below_zero_are_unbounded() {
    for v in [0, -1, -5] {
        let all = tuning(|t| {
            t.max_concurrent_downloads = v;
            t.max_concurrent_downloads_per_image = v;
            t.max_concurrent_unpacks = v;
            t.max_concurrent_unpacks_per_image = v;
        });
        assert_eq!(validate(&all), Ok(()), "{v}");
        // An unbounded per-image limit under a bounded global one: the daemon accepts it.
        let under_bounded = tuning(|t| {
            t.max_concurrent_downloads = 4;
            t.max_concurrent_downloads_per_image = v;
            t.max_concurrent_unpacks = 2;
            t.max_concurrent_unpacks_per_image = v;
        });
        assert_eq!(validate(&under_bounded), Ok(()), "{v}");
    }
    assert_eq!(validate(&tuning(|t| t.max_concurrent_unpacks_per_image = 1)), Ok(()));
    assert_eq!(validate(&tuning(|t| t.max_concurrent_downloads_per_image = -1)), Ok(()));
    let zero = SociConfig {
        tuning: tuning(|t| t.max_concurrent_unpacks = 0),
        ..Default::default()
    };
    assert_eq!(render_checked(&zero), Ok(render(&zero)));
}

#[test]
fn per_image_cannot_exceed_a_bounded_global() {
    let over = tuning(|t| {
        t.max_concurrent_downloads = 4;
        t.max_concurrent_downloads_per_image = 8;
    });
    let err = validate(&over).unwrap_err();
    assert_eq!(
        err,
        TuningError::PerImageAboveGlobal {
            per_image_flag: "--max-concurrent-downloads-per-image",
            per_image: 8,
            global_flag: "--max-concurrent-downloads",
            global: 4,
        }
    );
    assert_eq!(
        err.to_string(),
        "--max-concurrent-downloads-per-image 8 exceeds --max-concurrent-downloads 4: SOCI refuses to \
         start with a per-image limit above a bounded global one (\"global download limit less than \
         per-image download limit\"); use 4 or less, or -1 (unbounded) for --max-concurrent-downloads"
    );
    let unpacks = tuning(|t| {
        t.max_concurrent_unpacks = 4;
        t.max_concurrent_unpacks_per_image = 8;
    });
    let msg = validate(&unpacks).unwrap_err().to_string();
    assert!(
        msg.contains("global unpack limit less than per-image unpack limit"),
        "{msg}"
    );
    assert!(msg.starts_with("--max-concurrent-unpacks-per-image 8 exceeds --max-concurrent-unpacks 4"));
    // Edges that pass: equal limits, and any per-image limit under an unbounded global.
    let equal = tuning(|t| {
        t.max_concurrent_downloads = 20;
        t.max_concurrent_unpacks = 12;
    });
    assert_eq!(validate(&equal), Ok(()));
    for global in [0, -1, -5] {
        let unbounded_global = tuning(|t| {
            t.max_concurrent_downloads = global;
            t.max_concurrent_downloads_per_image = 10_000;
        });
        assert_eq!(validate(&unbounded_global), Ok(()));
    }
    let bad = SociConfig {
        tuning: over,
        ..Default::default()
    };
    assert!(render_checked(&bad).is_err());
}

#[test]
fn chunk_size_grammar() {
    for ok in ["16mb", " 1.5 GB ", "", "8MB", "1024", "512 b", "2kb", "0"] {
        assert_eq!(
            validate(&tuning(|t| t.concurrent_download_chunk_size = ok.to_string())),
            Ok(()),
            "{ok:?}"
        );
    }
    assert_eq!(parse_chunk_size("16mb"), Ok(Some(16 * 1024 * 1024)));
    assert_eq!(parse_chunk_size(" 1.5 GB "), Ok(Some(1536 * 1024 * 1024)));
    assert_eq!(parse_chunk_size("2kb"), Ok(Some(2048)));
    assert_eq!(parse_chunk_size("1024"), Ok(Some(1024)));
    assert_eq!(parse_chunk_size(""), Ok(None));

    let mib = validate(&tuning(|t| t.concurrent_download_chunk_size = "16MiB".to_string())).unwrap_err();
    assert!(
        mib.to_string()
            .contains("use 16mb (binary units; MiB is not accepted by SOCI)"),
        "{mib}"
    );
    assert!(
        mib.to_string().contains("--concurrent-download-chunk-size \"16MiB\""),
        "{mib}"
    );
    for bad in ["abc", "16MiB", "16 tb", "-1mb", "1,5mb", "mb", "16m"] {
        assert!(parse_chunk_size(bad).is_err(), "{bad:?} accepted");
    }
    let abc = parse_chunk_size("abc").unwrap_err();
    assert!(matches!(abc, TuningError::BadChunkSize { .. }));
    assert!(abc.to_string().contains("b, kb, mb or gb"));
}

#[test]
fn content_store_rule() {
    assert_eq!(check_content_store_rule("containerd", false), Ok(()));
    assert_eq!(check_content_store_rule("soci", true), Ok(()));
    assert_eq!(check_content_store_rule("", true), Ok(()));
    let err = check_content_store_rule("soci", false).unwrap_err();
    assert!(
        err.to_string()
            .contains("type = \"containerd\" or discard_unpacked_layers = true")
    );
    assert!(
        check_content_store_rule("", false)
            .unwrap_err()
            .to_string()
            .contains("unset, so soci")
    );
    assert!(matches!(
        check_content_store_rule("Containerd", true),
        Err(TuningError::UnknownContentStore(_))
    ));
}

#[test]
fn decompressor_paths_are_absolute() {
    assert_eq!(validate_decompressor_path("/usr/bin/unpigz"), Ok(()));
    let err = validate_decompressor_path("unpigz").unwrap_err();
    assert_eq!(err, TuningError::RelativeDecompressor("unpigz".to_string()));
    assert!(err.to_string().contains("must be absolute"));
    assert!(err.to_string().contains("soci-agent's own rule"));
    let relative = SociConfig {
        gzip: Some(Decompressor::unpigz("bin/unpigz")),
        ..Default::default()
    };
    assert_eq!(
        render_checked(&relative),
        Err(TuningError::RelativeDecompressor("bin/unpigz".to_string()))
    );
    assert_eq!(render_checked(&with_gzip()), Ok(render(&with_gzip())));
}

#[test]
fn decompressor_paths_without_forbidden_chars() {
    assert_eq!(DECOMPRESSOR_FORBIDDEN_CHARS, "#%{}\\|;&$<>");
    for c in ['#', '%', '{', '}', '\\', '|', ';', '&', '$', '<', '>'] {
        let path = format!("/opt/bin/unpigz{c}x");
        let err = validate_decompressor_path(&path).unwrap_err();
        assert!(
            matches!(&err, TuningError::DecompressorForbiddenChars { path: p, .. } if *p == path),
            "{path}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("{c:?}")), "{msg}");
        assert!(msg.contains("path contains invalid characters"), "{msg}");
        let cfg = SociConfig {
            gzip: Some(Decompressor::unpigz(&path)),
            ..Default::default()
        };
        assert!(render_checked(&cfg).is_err(), "{path}");
    }
    // Characters the daemon accepts.
    for ok in [
        "/opt/my bin/unpigz",
        "/opt/bin/un-pigz_2.8+x@y!(z)~",
        "/opt/bin/'q'\"x\"",
    ] {
        assert_eq!(validate_decompressor_path(ok), Ok(()), "{ok}");
    }
}

#[test]
fn unknown_keys_with_suggestions() {
    let text = "[pull_modes.parallel_pull_unpack]\nmax_concurent_downloads = 5\n";
    assert_eq!(
        unknown_keys(text),
        Ok(vec![UnknownKey {
            path: "pull_modes.parallel_pull_unpack.max_concurent_downloads".to_string(),
            suggestion: Some("max_concurrent_downloads".to_string()),
            not_read: None,
        }])
    );
    assert_eq!(
        unknown_keys("[foo]\nbar = 1\n"),
        Ok(vec![UnknownKey {
            path: "foo".to_string(),
            suggestion: None,
            not_read: None,
        }])
    );
    // Dotted keys and inline tables are walked like tables.
    let dotted = "pull_modes.soci_v2.enabel = true\ncontent_store = { tipe = \"soci\" }\n";
    let found = unknown_keys(dotted).unwrap();
    let paths: Vec<_> = found
        .iter()
        .map(|u| (u.path.as_str(), u.suggestion.as_deref()))
        .collect();
    assert_eq!(
        paths,
        [
            ("pull_modes.soci_v2.enabel", Some("enable")),
            ("content_store.tipe", Some("type"))
        ]
    );
    // Registry host tables are validated too (any host name; only `mirrors` inside).
    assert_eq!(
        unknown_keys("[resolver.host.\"r.example\"]\nanything = 1\n"),
        Ok(vec![UnknownKey {
            path: "resolver.host.r.example.anything".to_string(),
            suggestion: None,
            not_read: None,
        }])
    );
    // A file that is not TOML is an error.
    assert!(
        unknown_keys("a = [")
            .unwrap_err()
            .to_string()
            .contains("not valid TOML")
    );
}

#[test]
fn unknown_keys_golden() {
    let found = unknown_keys(&fixture("typos", "input.toml")).unwrap();
    let lines: String = found
        .iter()
        .map(|u| format!("{} -> {}\n", u.path, u.suggestion.as_deref().unwrap_or("(none)")))
        .collect();
    assert_eq!(lines, fixture("typos", "expected.txt"));
}

#[test]
fn known_keys_are_well_formed() {
    let mut seen = std::collections::HashSet::new();
    for k in KNOWN_KEYS.iter().map(|k| k.path) {
        assert!(seen.insert(k.to_ascii_lowercase()), "duplicate {k}");
        assert!(!k.is_empty() && k.split('.').all(|s| !s.is_empty()), "bad path {k}");
        assert!(
            !KNOWN_KEYS.iter().any(|o| o.path.starts_with(&format!("{k}."))),
            "{k} is both a key and a table"
        );
    }
}

/// The table, as read from upstream `config/*.go` at each release tag (the
/// Go module proxy's v0.11.0 ... v0.16.1): every key and its first release.
const VERIFIED: &[(&str, &str)] = &[
    ("debug", "0.11.0"),
    ("metrics_address", "0.11.0"),
    ("metrics_network", "0.11.0"),
    ("no_prometheus", "0.11.0"),
    ("debug_address", "0.11.0"),
    ("metadata_store", "0.11.0"),
    ("metadata_db_no_sync", "0.15.0"),
    ("metadata_insertion_chunk_size", "0.15.0"),
    ("skip_check_snapshotter_supported", "0.11.0"),
    ("max_concurrency", "0.11.0"),
    ("http_cache_type", "0.11.0"),
    ("filesystem_cache_type", "0.11.0"),
    ("resolve_result_entry", "0.11.0"),
    ("disable_verification", "0.11.0"),
    ("mount_timeout_sec", "0.11.0"),
    ("fuse_metrics_emit_wait_duration_sec", "0.11.0"),
    ("content_store.type", "0.11.0"),
    ("content_store.containerd_address", "0.11.0"),
    ("pull_modes.soci_v1.enable", "0.11.0"),
    ("pull_modes.soci_v2.enable", "0.11.0"),
    ("pull_modes.parallel_pull_unpack.enable", "0.11.0"),
    ("pull_modes.parallel_pull_unpack.max_concurrent_downloads", "0.11.0"),
    (
        "pull_modes.parallel_pull_unpack.max_concurrent_downloads_per_image",
        "0.11.0",
    ),
    (
        "pull_modes.parallel_pull_unpack.concurrent_download_chunk_size",
        "0.11.0",
    ),
    ("pull_modes.parallel_pull_unpack.max_concurrent_unpacks", "0.11.0"),
    (
        "pull_modes.parallel_pull_unpack.max_concurrent_unpacks_per_image",
        "0.11.0",
    ),
    ("pull_modes.parallel_pull_unpack.discard_unpacked_layers", "0.11.0"),
    (
        "pull_modes.parallel_pull_unpack.experimental_parallel_pull_as_fallback",
        "0.14.0",
    ),
    ("pull_modes.parallel_pull_unpack.decompress_streams.gzip.path", "0.11.0"),
    ("pull_modes.parallel_pull_unpack.decompress_streams.gzip.args", "0.11.0"),
    ("pull_modes.parallel_pull_unpack.decompress_streams.zstd.path", "0.11.0"),
    ("pull_modes.parallel_pull_unpack.decompress_streams.zstd.args", "0.11.0"),
    ("cri_keychain.enable_keychain", "0.11.0"),
    ("cri_keychain.image_service_path", "0.11.0"),
    ("kubeconfig_keychain.enable_keychain", "0.11.0"),
    ("kubeconfig_keychain.kubeconfig_path", "0.11.0"),
    ("resolver.host.\"r.example.com\".mirrors.host", "0.11.0"),
    ("resolver.host.\"r.example.com\".mirrors.insecure", "0.11.0"),
    ("resolver.host.\"r.example.com\".mirrors.request_timeout_sec", "0.11.0"),
    ("resolver.auth_client_ttl_sec", "0.15.0"),
    ("resolver.enable_auth_client_sharing", "0.15.0"),
    ("resolver.custom_headers", "0.16.0"),
    ("snapshotter.min_layer_size", "0.11.0"),
    ("snapshotter.allow_invalid_mounts_on_restart", "0.11.0"),
    ("http.MaxRetries", "0.11.0"),
    ("http.MinWaitMsec", "0.11.0"),
    ("http.MaxWaitMsec", "0.11.0"),
    ("http.DialTimeoutMsec", "0.11.0"),
    ("http.ResponseHeaderTimeoutMsec", "0.11.0"),
    ("http.RequestTimeoutMsec", "0.11.0"),
    ("blob.valid_interval", "0.11.0"),
    ("blob.check_always", "0.11.0"),
    ("blob.fetching_timeout_sec", "0.11.0"),
    ("blob.force_single_range_mode", "0.11.0"),
    ("blob.max_retries", "0.11.0"),
    ("blob.min_wait_msec", "0.11.0"),
    ("blob.max_wait_msec", "0.11.0"),
    ("blob.max_span_verification_retries", "0.11.0"),
    ("directory_cache.max_lru_cache_entry", "0.11.0"),
    ("directory_cache.max_cache_fds", "0.11.0"),
    ("directory_cache.sync_add", "0.11.0"),
    ("directory_cache.direct", "0.11.0"),
    ("fuse.attr_timeout", "0.11.0"),
    ("fuse.entry_timeout", "0.11.0"),
    ("fuse.negative_timeout", "0.11.0"),
    ("fuse.log_fuse_operations", "0.11.0"),
    ("background_fetch.disable", "0.11.0"),
    ("background_fetch.silence_period_msec", "0.11.0"),
    ("background_fetch.fetch_period_msec", "0.11.0"),
    ("background_fetch.max_queue_size", "0.11.0"),
    ("background_fetch.drop_policy", "0.15.0"),
    ("background_fetch.emit_metric_period_sec", "0.11.0"),
    ("prefetch.enable", "0.13.0"),
    ("prefetch.max_concurrency", "0.13.0"),
];

#[test]
fn key_first_versions_match_upstream() {
    // 72 keys in v0.16.1, the two map entries (gzip, zstd) counted apart.
    assert_eq!(KNOWN_KEYS.len(), 74);
    assert_eq!(VERIFIED.len(), KNOWN_KEYS.len());
    for (path, since) in VERIFIED {
        assert_eq!(first_version(path), Some(ver(since)), "{path}");
        for v in RELEASES {
            assert_eq!(reads_key(ver(v), path), ver(v) >= ver(since), "{path} in {v}");
        }
    }
    for k in KNOWN_KEYS {
        assert!(RELEASES.contains(&k.since.to_string().as_str()), "{}", k.path);
        assert!(k.since <= ver("0.16.1") && k.since >= ver("0.11.0"), "{}", k.path);
    }
    // Case-insensitive field names, exact map keys, tables.
    assert_eq!(
        first_version("PULL_MODES.Parallel_Pull_Unpack.Enable"),
        Some(ver("0.11.0"))
    );
    assert_eq!(first_version("http.maxretries"), Some(ver("0.11.0")));
    assert_eq!(
        first_version("pull_modes.parallel_pull_unpack.decompress_streams.GZIP.path"),
        None
    );
    assert_eq!(first_version("prefetch"), Some(ver("0.13.0")));
    assert_eq!(first_version("metadata_db_sync"), None);
}

#[test]
fn new_keys_are_known() {
    let text = "metadata_db_no_sync = true
metadata_insertion_chunk_size = 10000

[background_fetch]
drop_policy = \"newest\"

[prefetch]
enable = true
max_concurrency = 4

[resolver]
auth_client_ttl_sec = 600
enable_auth_client_sharing = true
custom_headers = [\"X-Trace\"]

[pull_modes.parallel_pull_unpack]
experimental_parallel_pull_as_fallback = true
";
    assert_eq!(unknown_keys(text), Ok(vec![]));
    assert_eq!(unknown_keys_for(text, Some(ver("0.16.1"))), Ok(vec![]));
    assert_eq!(unknown_keys_for(text, Some(ver("0.16.0"))), Ok(vec![]));
    let not_read = |v: &str| -> Vec<String> {
        unknown_keys_for(text, Some(ver(v)))
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        not_read("0.15.0"),
        ["resolver.custom_headers: not read by SOCI 0.15.0 (added in 0.16.0)"]
    );
    assert_eq!(
        not_read("0.11.1"),
        [
            "metadata_db_no_sync: not read by SOCI 0.11.1 (added in 0.15.0)",
            "metadata_insertion_chunk_size: not read by SOCI 0.11.1 (added in 0.15.0)",
            "background_fetch.drop_policy: not read by SOCI 0.11.1 (added in 0.15.0)",
            "prefetch: not read by SOCI 0.11.1 (added in 0.13.0)",
            "resolver.auth_client_ttl_sec: not read by SOCI 0.11.1 (added in 0.15.0)",
            "resolver.enable_auth_client_sharing: not read by SOCI 0.11.1 (added in 0.15.0)",
            "resolver.custom_headers: not read by SOCI 0.11.1 (added in 0.16.0)",
            "pull_modes.parallel_pull_unpack.experimental_parallel_pull_as_fallback: not read by SOCI 0.11.1 (added in 0.14.0)",
        ]
    );
    let found = unknown_keys_for(text, Some(ver("0.13.0"))).unwrap();
    let fallback = found.iter().find(|k| k.path.ends_with("fallback")).unwrap();
    assert_eq!(
        fallback.not_read,
        Some(NotRead {
            target: ver("0.13.0"),
            added_in: ver("0.14.0")
        })
    );
    assert_eq!(fallback.suggestion, None);
    assert!(!found.iter().any(|k| k.path.starts_with("prefetch")));
}

#[test]
fn keys_match_case_insensitively() {
    let text = "[Pull_Modes.PARALLEL_PULL_UNPACK]
Enable = true
Max_Concurrent_Downloads = 4

[CONTENT_STORE]
Type = \"containerd\"

[http]
maxretries = 3
";
    assert_eq!(unknown_keys(text), Ok(vec![]));
    let doc: DocumentMut = text.parse().unwrap();
    let get = |p: &str| lookup(doc.as_item(), p);
    assert_eq!(
        get("pull_modes.parallel_pull_unpack.enable").and_then(|i| i.as_bool()),
        Some(true)
    );
    assert_eq!(
        get("pull_modes.parallel_pull_unpack.max_concurrent_downloads").and_then(|i| i.as_integer()),
        Some(4)
    );
    assert_eq!(get("content_store.type").and_then(|i| i.as_str()), Some("containerd"));
    assert_eq!(get("http.MaxRetries").and_then(|i| i.as_integer()), Some(3));
    // The last spelling in the file wins, as in go-toml v2.
    let twice = "[pull_modes.parallel_pull_unpack]\nenable = true\nEnable = false\n";
    let doc: DocumentMut = twice.parse().unwrap();
    assert_eq!(
        lookup(doc.as_item(), "pull_modes.parallel_pull_unpack.enable").and_then(|i| i.as_bool()),
        Some(false)
    );
    // Map keys are exact: "GZIP" is not gzip (the daemon only warns about it).
    let upper = "[pull_modes.parallel_pull_unpack.decompress_streams.GZIP]\npath = \"/usr/bin/unpigz\"\n";
    assert_eq!(
        unknown_keys(upper),
        Ok(vec![UnknownKey {
            path: "pull_modes.parallel_pull_unpack.decompress_streams.GZIP".to_string(),
            suggestion: Some("gzip".to_string()),
            not_read: None,
        }])
    );
    let doc: DocumentMut = upper.parse().unwrap();
    assert!(
        lookup(
            doc.as_item(),
            "pull_modes.parallel_pull_unpack.decompress_streams.\"gzip\""
        )
        .is_none()
    );
    // read_back sees the effective values whatever the case.
    let ours = render(&with_gzip()).replace("enable = true", "ENABLE = true");
    assert_eq!(read_back(&ours), Ok(Some(with_gzip())));
}

#[test]
fn resolver_subtree_is_validated() {
    let text = "[resolver.host.\"r.example.com\"]
mirrors = [{ host = \"m.example.com\", insecure = true, request_timout_sec = 5 }]

[[resolver.host.\"other.example\".mirrors]]
host = \"m2.example\"
hots = \"typo\"
";
    let found: Vec<_> = unknown_keys(text)
        .unwrap()
        .into_iter()
        .map(|u| (u.path, u.suggestion))
        .collect();
    assert_eq!(
        found,
        [
            (
                "resolver.host.r.example.com.mirrors.request_timout_sec".to_string(),
                Some("request_timeout_sec".to_string())
            ),
            (
                "resolver.host.other.example.mirrors.hots".to_string(),
                Some("host".to_string())
            ),
        ]
    );
}

#[test]
fn rendering_follows_the_target_version() {
    for cfg in [SociConfig::default(), with_gzip()] {
        let newest = render(&cfg);
        for v in RELEASES {
            let for_v = SociConfig {
                version: ver(v),
                ..cfg.clone()
            };
            let text = render(&for_v);
            // Every key soci-agent writes is read from 0.11.0 on, so the file is the same.
            assert_eq!(text, newest, "{v}");
            assert_eq!(render_checked(&for_v), Ok(text.clone()), "{v}");
            let doc: DocumentMut = text.parse().unwrap();
            let mut found = Vec::new();
            leaves(doc.as_table(), "", &mut found);
            for key in found {
                assert!(reads_key(ver(v), &key), "{key} is not read by {v}");
            }
            assert_eq!(unknown_keys_for(&text, Some(ver(v))), Ok(vec![]));
        }
    }
    // Before parallel mode: nothing SOCI would read for it, and render_checked refuses.
    let old = SociConfig {
        version: ver("0.10.0"),
        ..Default::default()
    };
    assert!(!render(&old).contains("parallel_pull_unpack"));
    let err = render_checked(&old).unwrap_err();
    assert_eq!(err, TuningError::NoParallelMode(ver("0.10.0")));
    assert!(err.to_string().contains("use 0.11.0 or newer"));
}

/// A node tree for `soci-agent doctor --root`.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        let t = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        t.write("/etc/os-release", "ID=debian\nVERSION_ID=\"12\"\n", 0o644);
        t.write("/usr/bin/unpigz", "#!/bin/sh\nexec gzip \"$@\"\n", 0o755);
        t
    }
    fn write(&self, node_path: &str, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("root").join(node_path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    fn config(&self, text: &str) {
        self.write("/etc/soci-snapshotter-grpc/config.toml", text, 0o644);
    }
    /// `doctor --no-live`: the file checks.
    fn doctor(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_soci-agent"))
            .args([
                "doctor",
                "--output",
                "json",
                "--no-live",
                "--log-level",
                "warn",
                "--root",
            ])
            .arg(self.dir.path().join("root"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// (verdict, evidence + advice) of check `id`.
fn check(report: &serde_json::Value, id: &str) -> (String, String) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}"));
    (
        c["verdict"].as_str().unwrap().to_string(),
        format!(
            "{} {}",
            c["evidence"].as_str().unwrap_or(""),
            c["advice"].as_str().unwrap_or("")
        ),
    )
}

/// The doctor reads keys as the daemon does: `Enable = true` turns parallel mode on.
#[test]
fn doctor_reads_keys_case_insensitively() {
    let tree = Tree::new();
    tree.config(
        "[Content_Store]
TYPE = \"containerd\"

[PULL_MODES.parallel_pull_unpack]
Enable = true
MAX_CONCURRENT_DOWNLOADS = 4
max_concurrent_downloads_per_image = -1
metadata_db_sync = true

[pull_modes.parallel_pull_unpack.Decompress_Streams.gzip]
Path = \"/usr/bin/unpigz\"
ARGS = [\"-d\", \"-c\"]
",
    );
    let report = tree.doctor();
    let (verdict, text) = check(&report, "soci-config.parallel");
    assert_eq!(verdict, "ok", "{text}");
    // Per-image -1 under a bounded global: accepted, as by the daemon.
    let (verdict, text) = check(&report, "soci-config.limits");
    assert_eq!(verdict, "ok", "{text}");
    assert!(text.contains("downloads 4 global / -1 per image"), "{text}");
    let (verdict, text) = check(&report, "soci-config.decompressor");
    assert_eq!(verdict, "ok", "{text}");
    assert!(text.contains("gzip: /usr/bin/unpigz -d -c"), "{text}");
    let (verdict, text) = check(&report, "soci-config.content-store");
    assert_eq!(verdict, "ok", "{text}");
    let (verdict, text) = check(&report, "soci-config.keys");
    assert_eq!(verdict, "warn", "{text}");
    assert!(text.contains("metadata_db_sync"), "{text}");
    assert!(!text.contains("Enable"), "{text}");

    // A forbidden character in the decompressor path stops the daemon.
    tree.write("/usr/bin/un$pigz", "#!/bin/sh\n", 0o755);
    tree.config(
        "[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = true\n\
         [pull_modes.parallel_pull_unpack.decompress_streams.gzip]\npath = \"/usr/bin/un$pigz\"\n",
    );
    let (verdict, text) = check(&tree.doctor(), "soci-config.decompressor");
    assert_eq!(verdict, "fail", "{text}");
    assert!(text.contains("path contains invalid characters"), "{text}");
}

/// With the unit's SOCI version known, keys only later releases read are reported.
#[test]
fn doctor_checks_keys_against_the_running_version() {
    let tree = Tree::new();
    tree.write(
        "/usr/local/bin/soci-snapshotter-grpc",
        "#!/bin/sh\necho \"soci-snapshotter-grpc version v0.13.0 abcdef\"\n",
        0o755,
    );
    // Under a --root that is not this host the binary is never run: the version comes from the
    // install record, which names the same binary.
    tree.write(
        "/var/lib/soci-agent/record.json",
        "{\"paths\": {}, \"enabled_units\": [], \"store_entries\": [], \
         \"daemon_binary\": \"/usr/local/bin/soci-snapshotter-grpc\", \"soci_version\": \"0.13.0\"}\n",
        0o644,
    );
    tree.write(
        "/etc/systemd/system/soci-snapshotter.service",
        "[Service]\nType=notify\nExecStart=/usr/local/bin/soci-snapshotter-grpc --address fd://\n",
        0o644,
    );
    let file = render(&with_gzip());
    tree.config(&format!("metadata_db_no_sync = true\n{file}"));
    let (verdict, text) = check(&tree.doctor(), "soci-config.keys");
    assert_eq!(verdict, "warn", "{text}");
    assert!(
        text.contains("metadata_db_no_sync: not read by SOCI 0.13.0 (added in 0.15.0)"),
        "{text}"
    );
    assert!(text.contains("checked against SOCI 0.13.0"), "{text}");
    tree.config(&file);
    let (verdict, text) = check(&tree.doctor(), "soci-config.keys");
    assert_eq!(verdict, "ok", "{text}");
}

/// The real v0.16.1 daemon, built by `tests/real/build.sh`.
const REAL_SOCI: &str = "/var/tmp/soci-agent-test/rig/soci-v0.16.1/soci-snapshotter-grpc";

/// The real daemon run on configs and private paths under `dir`.
struct RealSoci<'a> {
    bin: &'a Path,
    dir: &'a Path,
}

impl RealSoci<'_> {
    /// `soci-snapshotter-grpc --config <name> config dump`: must succeed, and print TOML.
    fn dump(&self, name: &str, text: &str) -> toml_edit::DocumentMut {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(self.bin)
            .arg("--config")
            .arg(&path)
            .args(["config", "dump"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .parse()
            .unwrap_or_else(|e| panic!("{name}: dump is not TOML: {e}"))
    }

    /// Ok(()) = serving with parallel mode; Err(log) = refused to start.
    fn start(&self, name: &str, text: &str) -> Result<(), String> {
        let dir = self.dir;
        let config = dir.join(format!("{name}.toml"));
        let log = dir.join(format!("{name}.log"));
        let root = dir.join(format!("root-{name}"));
        std::fs::write(&config, text).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let mut child = Command::new(self.bin)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(dir.join(format!("{name}.sock")))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        let read = || {
            let mut s = std::fs::read_to_string(&log).unwrap_or_default();
            s += &std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
            s
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if read().contains("Parallel image pull enabled") {
                break Ok(());
            }
            if child.try_wait().unwrap().is_some() {
                break Err(read());
            }
            if Instant::now() > deadline {
                break Err(format!("neither serving nor exited within 30s:\n{}", read()));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = child.kill();
        let _ = child.wait();
        outcome
    }
}

/// `soci-snapshotter-grpc config dump` (load-time rules) of the real v0.16.1
/// daemon on what soci-agent renders, and on files using the new keys and
/// odd key case; skipped when `tests/real/build.sh` has not built it.
#[test]
fn real_daemon_loads_rendered_configs() {
    let bin = Path::new(REAL_SOCI);
    if !bin.is_file() {
        eprintln!("skipped: {} not built (tests/real/build.sh)", bin.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let soci = RealSoci { bin, dir: dir.path() };
    let zero = SociConfig {
        tuning: tuning(|t| {
            t.max_concurrent_downloads = 4;
            t.max_concurrent_downloads_per_image = -1;
            t.max_concurrent_unpacks = 0;
            t.max_concurrent_unpacks_per_image = -5;
        }),
        ..with_gzip()
    };
    for (name, cfg) in [
        ("default", SociConfig::default()),
        ("gzip", with_gzip()),
        ("zero", zero),
    ] {
        let d = soci.dump(name, &render_checked(&cfg).unwrap());
        let par = &d["pull_modes"]["parallel_pull_unpack"];
        assert_eq!(par["enable"].as_bool(), Some(true), "{name}");
        assert_eq!(
            par["max_concurrent_downloads"].as_integer(),
            Some(cfg.tuning.max_concurrent_downloads),
            "{name}"
        );
        assert_eq!(
            par["max_concurrent_downloads_per_image"].as_integer(),
            Some(cfg.tuning.max_concurrent_downloads_per_image),
            "{name}"
        );
        assert_eq!(d["content_store"]["type"].as_str(), Some("containerd"), "{name}");
        assert_eq!(d["cri_keychain"]["enable_keychain"].as_bool(), Some(true), "{name}");
    }
    // Field names match case-insensitively in the real decoder too.
    let d = soci.dump(
        "case",
        "[PULL_MODES.Parallel_Pull_Unpack]\nEnable = true\nMax_Concurrent_Unpacks = 7\n[CRI_KEYCHAIN]\nENABLE_KEYCHAIN = true\n",
    );
    assert_eq!(d["pull_modes"]["parallel_pull_unpack"]["enable"].as_bool(), Some(true));
    assert_eq!(
        d["pull_modes"]["parallel_pull_unpack"]["max_concurrent_unpacks"].as_integer(),
        Some(7)
    );
    assert_eq!(d["cri_keychain"]["enable_keychain"].as_bool(), Some(true));
}

/// Parallel mode on, layers discarded (no containerd needed): the base of every start below.
const START_BASE: &str = "[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = true\n";

/// Start-time rules (`config dump` does not check them): the real v0.16.1
/// daemon starts, or refuses to, exactly where soci-agent's rules say so.
/// Runs with discarded layers (no containerd needed); skipped when
/// `tests/real/build.sh` has not built the daemon or when not root.
#[test]
fn real_daemon_start_rules_match() {
    let bin = Path::new(REAL_SOCI);
    if !bin.is_file() || !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root and {} (tests/real/build.sh)", bin.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let soci = RealSoci { bin, dir: dir.path() };
    limits_are_refused_where_validate_refuses_them(&soci);
    key_case_does_not_matter_to_the_daemon(&soci);
    decompressor_paths_are_refused_where_validate_refuses_them(&soci);
}

fn limits_are_refused_where_validate_refuses_them(soci: &RealSoci) {
    let base = START_BASE;
    let limits = [
        (4, 8, -1, 1),
        (-1, 3, 4, 8),
        (4, -1, 2, 0),
        (4, 0, 2, -5),
        (0, 100, -5, 100),
        (4, 4, 2, 2),
    ];
    for (dl, dl_img, up, up_img) in limits {
        let t = tuning(|t| {
            t.max_concurrent_downloads = dl;
            t.max_concurrent_downloads_per_image = dl_img;
            t.max_concurrent_unpacks = up;
            t.max_concurrent_unpacks_per_image = up_img;
        });
        let text = format!(
            "{base}max_concurrent_downloads = {dl}\nmax_concurrent_downloads_per_image = {dl_img}\n\
             max_concurrent_unpacks = {up}\nmax_concurrent_unpacks_per_image = {up_img}\n"
        );
        let name = format!("limits{dl}_{dl_img}_{up}_{up_img}");
        match (validate(&t), soci.start(&name, &text)) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(log)) => {
                let kind = if dl > 0 && dl_img > dl { "download" } else { "unpack" };
                let daemon = format!("global {kind} limit less than per-image {kind} limit");
                assert!(log.contains(&daemon), "{name}: {log}");
                assert!(e.to_string().contains(&daemon), "{name}: {e}");
            }
            (agent, daemon) => panic!("{name}: agent {agent:?}, daemon {daemon:?}"),
        }
    }
}

/// Key case does not matter to the daemon: this one is refused too.
fn key_case_does_not_matter_to_the_daemon(soci: &RealSoci) {
    let upper = "[PULL_MODES.Parallel_Pull_Unpack]\nEnable = true\nDiscard_Unpacked_Layers = true\n\
                 max_concurrent_downloads = 4\nMAX_CONCURRENT_DOWNLOADS_PER_IMAGE = 8\n";
    let log = soci.start("upper", upper).unwrap_err();
    assert!(
        log.contains("global download limit less than per-image download limit"),
        "{log}"
    );
}

/// Decompressor paths: each forbidden character stops the daemon; a plain one does not.
fn decompressor_paths_are_refused_where_validate_refuses_them(soci: &RealSoci) {
    let base = START_BASE;
    for (i, c) in DECOMPRESSOR_FORBIDDEN_CHARS.chars().enumerate() {
        let exe = soci.dir.join(format!("un{c}pigz"));
        std::fs::copy("/bin/true", &exe).unwrap();
        let path = exe.to_str().unwrap();
        assert!(validate_decompressor_path(path).is_err(), "{path}");
        let quoted = toml_edit::Value::from(path).to_string();
        let text = format!("{base}[pull_modes.parallel_pull_unpack.decompress_streams.gzip]\npath = {quoted}\n");
        let log = soci.start(&format!("chars{i}"), &text).unwrap_err();
        assert!(log.contains("path contains invalid characters"), "{c:?}: {log}");
    }
    let exe = soci.dir.join("unpigz");
    std::fs::copy("/bin/true", &exe).unwrap();
    let cfg = SociConfig {
        gzip: Some(Decompressor::unpigz(exe.to_str().unwrap())),
        ..Default::default()
    };
    let rendered = render_checked(&cfg).unwrap().replace("\"containerd\"", "\"soci\"");
    assert_eq!(soci.start("plain", &rendered), Ok(()));
}
