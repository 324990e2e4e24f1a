//! `Fetcher` against the loopback mirror: the streaming download + verify +
//! extract pipeline, its retry policy and its cleanup on failure.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::archive;
use common::mirror::{Fault, Mirror};
use common::{dir_names, fast_http_options, mode_of};
use soci_agent::release::fetch::{FetchError, Fetcher, HttpOptions, Progress, extract_local};
use soci_agent::release::{Arch, Flavor, ReleaseSpec, Sha256Hex, parse_sha256sum};

const VERSION: &str = "0.15.0";

/// A mirror publishing one release at its upstream path, and a scratch dir.
struct World {
    mirror: Mirror,
    spec: ReleaseSpec,
    path: String,
    url: String,
    bytes: Vec<u8>,
    digest: Sha256Hex,
    tmp: tempfile::TempDir,
}

impl World {
    fn new(bytes: Vec<u8>) -> Self {
        let mirror = Mirror::start();
        let spec = ReleaseSpec {
            version: VERSION.parse().unwrap(),
            arch: Arch::Amd64,
            flavor: Flavor::Static,
        };
        let path = mirror.publish(VERSION, &spec.archive_name(), &bytes);
        let url = spec.archive_url(&mirror.base_url());
        assert_eq!(url, mirror.url(&path));
        let digest = Sha256Hex::parse(&archive::sha256_hex(&bytes)).unwrap();
        World {
            mirror,
            spec,
            path,
            url,
            bytes,
            digest,
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn standard() -> Self {
        World::new(archive::standard_release(VERSION))
    }

    fn dest(&self) -> PathBuf {
        self.tmp.path().join("staging")
    }

    async fn download(&self, opts: HttpOptions) -> Result<soci_agent::release::extract::Extracted, FetchError> {
        Fetcher::new(opts)
            .unwrap()
            .download_release(&self.url, &self.digest, &self.dest())
            .await
    }

    fn requests(&self) -> usize {
        self.mirror.requests(&self.path)
    }

    /// The release files are in `dest` with the right content and modes.
    fn assert_installed(&self) {
        let dest = self.dest();
        assert_eq!(
            dir_names(&dest),
            ["NOTICE.md", "THIRD_PARTY_LICENSES", "soci", "soci-snapshotter-grpc"]
        );
        for (name, content) in archive::standard_contents(VERSION) {
            assert_eq!(std::fs::read(dest.join(name)).unwrap(), content, "{name}");
        }
        assert_eq!(mode_of(&dest.join("soci-snapshotter-grpc")), 0o755);
        assert_eq!(mode_of(&dest.join("NOTICE.md")), 0o644);
    }

    /// Nothing extracted is left behind.
    fn assert_nothing_left(&self) {
        assert_eq!(dir_names(&self.dest()), Vec::<String>::new());
    }
}

#[tokio::test]
async fn happy_path_extracts_verified_release() {
    let w = World::standard();
    let got = w.download(fast_http_options()).await.unwrap();
    assert_eq!(got.archive_sha256, w.digest);
    assert_eq!(got.archive_bytes, w.bytes.len() as u64);
    for f in &got.files {
        let content = std::fs::read(w.dest().join(&f.name)).unwrap();
        assert_eq!(f.sha256.as_str(), archive::sha256_hex(&content), "{}", f.name);
    }
    w.assert_installed();
    assert_eq!(w.requests(), 1);
}

#[tokio::test]
async fn dest_is_recreated_empty() {
    let w = World::standard();
    std::fs::create_dir(w.dest()).unwrap();
    std::fs::write(w.dest().join("leftover"), b"from a crashed run").unwrap();
    w.download(fast_http_options()).await.unwrap();
    w.assert_installed();
}

#[tokio::test]
async fn wrong_digest_is_a_verification_failure_and_not_retried() {
    let w = World::standard();
    let wrong = Sha256Hex::parse(&common::wrong_digest(&w.bytes)).unwrap();
    let err = Fetcher::new(fast_http_options())
        .unwrap()
        .download_release(&w.url, &wrong, &w.dest())
        .await
        .unwrap_err();
    assert!(err.is_verification_failure(), "{err:?}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains(&w.url), "{err}");
    w.assert_nothing_left();
    assert_eq!(w.requests(), 1);
}

#[tokio::test]
async fn hostile_archive_over_http_is_refused_once() {
    let w = World::new(archive::hostile::symlink());
    let err = w.download(fast_http_options()).await.unwrap_err();
    assert!(err.is_verification_failure(), "{err:?}");
    w.assert_nothing_left();
    assert_eq!(w.requests(), 1);
}

#[tokio::test]
async fn truncated_body_is_retried() {
    let w = World::standard();
    w.mirror.fault(&w.path, Fault::Truncate(w.bytes.len() / 2));
    w.download(fast_http_options()).await.unwrap();
    w.assert_installed();
    assert_eq!(w.requests(), 2);
}

#[tokio::test]
async fn truncated_on_every_attempt_fails_with_nothing_left() {
    let w = World::standard();
    let opts = HttpOptions {
        retries: 2,
        ..fast_http_options()
    };
    w.mirror
        .faults(&w.path, std::iter::repeat_n(Fault::Truncate(w.bytes.len() - 10), 3));
    let err = w.download(opts).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(!err.is_verification_failure());
    assert!(err.to_string().contains(&w.url), "{err}");
    w.assert_nothing_left();
    assert_eq!(w.requests(), 3);
}

#[tokio::test]
async fn large_archive_cut_mid_entry_is_retried() {
    let big = archive::noise(3 * 1024 * 1024, 42);
    let daemon = archive::daemon_script(VERSION);
    let w = World::new(archive::release_tar_gz(&[
        ("soci-snapshotter-grpc", &daemon),
        ("THIRD_PARTY_LICENSES", &big),
    ]));
    w.mirror.fault(&w.path, Fault::Truncate(2 * 1024 * 1024));
    let opts = HttpOptions {
        progress: Progress::Log,
        ..fast_http_options()
    };
    let got = w.download(opts).await.unwrap();
    let lic = got.files.iter().find(|f| f.name == "THIRD_PARTY_LICENSES").unwrap();
    assert_eq!(lic.sha256.as_str(), archive::sha256_hex(&big));
    assert_eq!(std::fs::read(w.dest().join("THIRD_PARTY_LICENSES")).unwrap(), big);
    assert_eq!(w.requests(), 2);
}

#[tokio::test]
async fn server_error_then_ok() {
    let w = World::standard();
    w.mirror.fault(&w.path, Fault::Status(500));
    w.download(fast_http_options()).await.unwrap();
    w.assert_installed();
    assert_eq!(w.requests(), 2);
}

#[tokio::test]
async fn persistent_server_errors_exhaust_retries() {
    let w = World::standard();
    w.mirror.faults(&w.path, std::iter::repeat_n(Fault::Status(503), 10));
    let err = w.download(fast_http_options()).await.unwrap_err();
    assert!(matches!(err, FetchError::Status { status: 503, .. }), "{err:?}");
    assert_eq!(w.requests(), 4, "1 attempt + 3 retries");
    w.assert_nothing_left();
}

#[tokio::test]
async fn forbidden_is_not_retried() {
    let w = World::standard();
    w.mirror.fault(&w.path, Fault::Status(403));
    let err = w.download(fast_http_options()).await.unwrap_err();
    assert!(matches!(err, FetchError::Status { status: 403, .. }), "{err:?}");
    assert!(err.to_string().contains(&w.url), "{err}");
    assert_eq!(w.requests(), 1);
}

#[tokio::test]
async fn drop_mid_body_then_ok() {
    let w = World::standard();
    w.mirror.fault(&w.path, Fault::DropMidBody);
    w.download(fast_http_options()).await.unwrap();
    w.assert_installed();
    assert_eq!(w.requests(), 2);
}

#[tokio::test]
async fn not_found_names_the_url_and_is_not_retried() {
    let w = World::standard();
    w.mirror.fault(&w.path, Fault::NotFound);
    let err = w.download(fast_http_options()).await.unwrap_err();
    assert!(matches!(err, FetchError::NotFound { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&w.url) && text.contains("--soci-version"), "{text}");
    assert!(!err.is_transient() && !err.is_verification_failure());
    assert_eq!(w.requests(), 1);
    w.assert_nothing_left();
}

#[tokio::test]
async fn wrong_version_is_a_clean_404() {
    let w = World::standard();
    let other = ReleaseSpec {
        version: "0.14.0".parse().unwrap(),
        ..w.spec
    };
    let url = other.archive_url(&w.mirror.base_url());
    let err = Fetcher::new(fast_http_options())
        .unwrap()
        .download_release(&url, &w.digest, &w.dest())
        .await
        .unwrap_err();
    assert!(matches!(&err, FetchError::NotFound { url: u } if *u == url), "{err:?}");
    assert_eq!(w.mirror.total_requests(), 1);
}

/// A download meeting `fault` (a stall of 2 s) with a stall timeout of 300 ms: cut short and
/// retried, installed by the second request.
async fn stall_is_cut_short_and_retried(fault: Fault, why: &str) {
    let w = World::standard();
    w.mirror.fault(&w.path, fault);
    let opts = HttpOptions {
        stall_timeout: Duration::from_millis(300),
        ..fast_http_options()
    };
    let started = std::time::Instant::now();
    w.download(opts).await.unwrap();
    w.assert_installed();
    assert_eq!(w.requests(), 2);
    assert!(started.elapsed() < Duration::from_secs(2), "{why}");
}

#[tokio::test]
async fn slow_first_byte_beyond_stall_timeout_is_retried() {
    stall_is_cut_short_and_retried(
        Fault::SlowFirstByte(Duration::from_secs(2)),
        "the stall timeout (300 ms) must cut the wait short",
    )
    .await;
}

#[tokio::test]
async fn stall_mid_body_is_retried() {
    stall_is_cut_short_and_retried(
        Fault::StallMidBody(Duration::from_secs(2)),
        "the stall timeout must cut the wait short",
    )
    .await;
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v{VERSION}/x.tar.gz");
    let tmp = tempfile::tempdir().unwrap();
    let digest = Sha256Hex::parse(&"a".repeat(64)).unwrap();
    let opts = HttpOptions {
        retries: 1,
        ..fast_http_options()
    };
    let err = Fetcher::new(opts)
        .unwrap()
        .download_release(&url, &digest, &tmp.path().join("d"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn get_small_fetches_the_checksum_file() {
    let w = World::standard();
    let sum_path = format!("{}.sha256sum", w.path);
    w.mirror.fault(&sum_path, Fault::Status(502));
    let fetcher = Fetcher::new(fast_http_options()).unwrap();
    let body = fetcher
        .get_small(&w.spec.checksum_url(&w.mirror.base_url()), 4096)
        .await
        .unwrap();
    let text = String::from_utf8(body).unwrap();
    assert_eq!(text, archive::sha256sum_line(&w.bytes, &w.spec.archive_name()));
    assert_eq!(parse_sha256sum(&text, &w.spec.archive_name()).unwrap(), w.digest);
    assert_eq!(w.mirror.requests(&sum_path), 2);
}

#[tokio::test]
async fn get_small_refuses_big_bodies() {
    let w = World::standard();
    let fetcher = Fetcher::new(fast_http_options()).unwrap();
    let err = fetcher.get_small(&w.url, 100).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { limit: 100, .. }), "{err:?}");
    assert_eq!(w.requests(), 1);
}

#[tokio::test]
async fn extract_local_verifies_and_extracts() {
    let w = World::standard();
    let file = w.tmp.path().join(w.spec.archive_name());
    std::fs::write(&file, &w.bytes).unwrap();
    let got = extract_local(&file, &w.digest, &w.dest()).await.unwrap();
    assert_eq!(got.archive_sha256, w.digest);
    w.assert_installed();

    let wrong = Sha256Hex::parse(&common::wrong_digest(&w.bytes)).unwrap();
    let err = extract_local(&file, &wrong, &w.dest()).await.unwrap_err();
    assert!(err.is_verification_failure(), "{err:?}");
    assert!(err.to_string().contains(&file.display().to_string()), "{err}");
    w.assert_nothing_left();

    let missing = w.tmp.path().join("missing.tar.gz");
    let err = extract_local(&missing, &w.digest, &w.dest()).await.unwrap_err();
    assert!(matches!(err, FetchError::OpenLocal { .. }), "{err:?}");
    assert!(!err.is_verification_failure());
}

// ---------------------------------------------------------------------------------------------
// A server that drips, one that never ends, redirects.

/// Bounds a download that must end on its own (a hang fails the test instead of blocking it).
async fn ends<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the download did not end by itself within 60 s")
}

#[tokio::test]
async fn a_dripping_server_is_a_stall_not_a_hang() {
    let w = World::standard();
    w.mirror.fault(&w.path, Fault::Drip(Duration::from_millis(20)));
    let opts = HttpOptions {
        stall_timeout: Duration::from_millis(400),
        retries: 0,
        ..fast_http_options()
    };
    let err = ends(w.download(opts)).await.unwrap_err();
    assert!(
        matches!(err, FetchError::TooSlow { .. }),
        "a byte every 20 ms is below 1 KiB/s: {err:?}"
    );
    assert!(err.to_string().contains("below the minimum"), "{err}");
    assert!(err.is_transient(), "a slow server is worth another attempt");
    w.assert_nothing_left();
}

#[tokio::test]
async fn the_download_deadline_bounds_every_attempt_together() {
    let w = World::standard();
    w.mirror
        .faults(&w.path, std::iter::repeat_n(Fault::Drip(Duration::from_millis(20)), 5));
    let opts = HttpOptions {
        stall_timeout: Duration::from_secs(5),
        min_rate: 0,
        deadline: Duration::from_millis(800),
        ..fast_http_options()
    };
    let err = ends(w.download(opts)).await.unwrap_err();
    assert!(matches!(err, FetchError::Deadline { .. }), "{err:?}");
    assert!(err.to_string().contains("download deadline"), "{err}");
    assert_eq!(w.requests(), 1, "the deadline is not per attempt");
}

#[tokio::test]
async fn a_plain_http_redirect_is_followed_within_the_mirror() {
    let w = World::standard();
    let moved = w.mirror.publish("moved", "archive.tar.gz", &w.bytes);
    w.mirror.fault(&w.path, Fault::Redirect(w.mirror.url(&moved)));
    w.download(fast_http_options()).await.unwrap();
    w.assert_installed();
}

#[test]
fn an_https_to_http_redirect_is_a_refused_downgrade() {
    use soci_agent::release::fetch::check_redirect;
    let url = |s: &str| s.parse::<reqwest::Url>().unwrap();
    let err = check_redirect(&url("https://github.com/a"), &url("http://evil.example/a")).unwrap_err();
    assert!(matches!(err, FetchError::Downgrade { .. }), "{err:?}");
    assert!(err.to_string().contains("must not continue over plain http"), "{err}");
    assert!(!err.is_transient());
    for (from, to) in [
        ("https://a/x", "https://b/y"),
        ("http://a/x", "http://b/y"),
        ("http://a/x", "https://b/y"),
    ] {
        check_redirect(&url(from), &url(to)).unwrap();
    }
}

#[tokio::test]
async fn a_name_that_does_not_resolve_says_so_and_what_to_do() {
    let opts = HttpOptions {
        retries: 0,
        ..fast_http_options()
    };
    let err = ends(
        Fetcher::new(opts)
            .unwrap()
            .get_small("https://soci-agent-test.invalid/x.sha256sum", 1024),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, FetchError::Resolve { ref host, .. } if host == "soci-agent-test.invalid"),
        "{err:?}"
    );
    let text = soci_agent::exit::error_chain(&err);
    assert!(text.contains("--archive") && text.contains("--release-url"), "{text}");
    assert!(!text.contains("Query {"), "the resolver's raw struct leaks: {text}");
}
