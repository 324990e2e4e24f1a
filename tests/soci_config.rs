//! SOCI config.toml: golden renders, round trips, validation rules and the
//! unknown-key check `doctor` uses.

use soci_agent::soci_config::*;
use std::path::PathBuf;
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
            assert!(KNOWN_KEYS.contains(&key.as_str()), "{key} is not in KNOWN_KEYS");
        }
        assert_eq!(unknown_keys(&text), Ok(vec![]));
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
fn limits_are_minus_one_or_positive() {
    let zero = tuning(|t| t.max_concurrent_downloads = 0);
    let err = validate(&zero).unwrap_err();
    assert_eq!(
        err,
        TuningError::BadLimit {
            flag: "--max-concurrent-downloads",
            value: 0
        }
    );
    assert!(err.to_string().contains("--max-concurrent-downloads 0"));
    assert!(err.to_string().contains("use -1 for unbounded"));
    let minus_two = tuning(|t| t.max_concurrent_unpacks_per_image = -2);
    assert_eq!(
        validate(&minus_two),
        Err(TuningError::BadLimit {
            flag: "--max-concurrent-unpacks-per-image",
            value: -2
        })
    );
    assert_eq!(validate(&tuning(|t| t.max_concurrent_unpacks_per_image = 1)), Ok(()));
    assert_eq!(validate(&tuning(|t| t.max_concurrent_downloads_per_image = -1)), Ok(()));
}

#[test]
fn per_image_cannot_exceed_a_bounded_global() {
    let over = tuning(|t| {
        t.max_concurrent_downloads = 10;
        t.max_concurrent_downloads_per_image = 30;
    });
    assert_eq!(
        validate(&over).unwrap_err().to_string(),
        "--max-concurrent-downloads-per-image 30 exceeds --max-concurrent-downloads 10: \
         the daemon refuses a per-image limit above a global limit (use 10 or less)"
    );
    let unbounded_under_bounded = tuning(|t| {
        t.max_concurrent_unpacks = 4;
        t.max_concurrent_unpacks_per_image = -1;
    });
    let err = validate(&unbounded_under_bounded).unwrap_err();
    assert!(matches!(
        err,
        TuningError::PerImageAboveGlobal {
            per_image: -1,
            global: 4,
            ..
        }
    ));
    assert!(
        err.to_string()
            .contains("-1 (unbounded) exceeds --max-concurrent-unpacks 4")
    );
    // Edges that pass: equal limits, and any per-image limit under an unbounded global.
    let equal = tuning(|t| {
        t.max_concurrent_downloads = 20;
        t.max_concurrent_unpacks = 12;
    });
    assert_eq!(validate(&equal), Ok(()));
    let unbounded_global = tuning(|t| t.max_concurrent_downloads_per_image = 10_000);
    assert_eq!(validate(&unbounded_global), Ok(()));
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
    let relative = SociConfig {
        gzip: Some(Decompressor::unpigz("bin/unpigz")),
        ..Default::default()
    };
    assert_eq!(
        render_checked(&relative),
        Err(TuningError::RelativeDecompressor("bin/unpigz".to_string()))
    );
    assert_eq!(render_checked(&with_gzip()), Ok(render(&with_gzip())));
    let bad = SociConfig {
        tuning: tuning(|t| t.max_concurrent_unpacks = 0),
        ..Default::default()
    };
    assert!(render_checked(&bad).is_err());
}

#[test]
fn unknown_keys_with_suggestions() {
    let text = "[pull_modes.parallel_pull_unpack]\nmax_concurent_downloads = 5\n";
    assert_eq!(
        unknown_keys(text),
        Ok(vec![UnknownKey {
            path: "pull_modes.parallel_pull_unpack.max_concurent_downloads".to_string(),
            suggestion: Some("max_concurrent_downloads".to_string()),
        }])
    );
    assert_eq!(
        unknown_keys("[foo]\nbar = 1\n"),
        Ok(vec![UnknownKey {
            path: "foo".to_string(),
            suggestion: None
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
    // Open subtrees are not validated; a file that is not TOML is an error.
    assert_eq!(
        unknown_keys("[resolver.host.\"r.example\"]\nanything = 1\n"),
        Ok(vec![])
    );
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
    for k in KNOWN_KEYS {
        assert!(seen.insert(k.to_ascii_lowercase()), "duplicate {k}");
        assert!(!k.is_empty() && k.split('.').all(|s| !s.is_empty()), "bad path {k}");
        assert!(
            !KNOWN_KEYS.iter().any(|o| o.starts_with(&format!("{k}."))),
            "{k} is both a key and a table"
        );
    }
}
