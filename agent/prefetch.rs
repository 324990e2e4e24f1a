//! `soci-agent prefetch`: pre-pull images at boot through containerd's CRI
//! `ImageService`, into the snapshotter kubelet will use; the fallback when
//! no snapshot cache is attached to the node.
//!
//! ```text
//! soci-agent prefetch public.ecr.aws/org/app:1.2 registry.example/ml/train@sha256:...
//! soci-agent prefetch --from /etc/soci-agent/images.txt --concurrency 2 --pin
//! ```
//!
//! Per image (see [`PrefetchArgs`] for every flag and the
//! `[prefetch]` config table):
//! 1. the reference is validated and normalized (`nginx` ->
//!    `docker.io/library/nginx:latest`); duplicates are dropped, so one
//!    reference is never pulled twice at once;
//! 2. `ImageStatus`: present -> cache hit, nothing pulled;
//! 3. absent -> `PullImage` with credentials (`prefetch/credentials.rs`: `--auth-file`,
//!    then kubelet credential provider plugins, else anonymous), retried with
//!    capped exponential backoff and jitter on transient errors
//!    (`prefetch/cri.rs`);
//!    a bad reference, a missing image or an authorization failure is a
//!    per-image error, never retried; the whole image (status, retries, pin)
//!    is bounded by `--timeout-per-image`;
//! 4. `--pin` labels the image `io.cri-containerd.pinned=pinned` in
//!    containerd (namespace `k8s.io`), `--unpin` removes the label (`prefetch/pin.rs`);
//! 5. `--platform` (bake mode) also fetches other platforms' content (`prefetch/bake.rs`).
//!
//! At most `--concurrency` images are in flight. When SOCI's parallel mode
//! runs with `discard_unpacked_layers = true`, images of the same registry
//! repository are pulled one at a time, with a warning: their shared layers
//! trip upstream soci-snapshotter issue 2035 ("compressed digests did not
//! match") when pulled concurrently.
//!
//! Private registries with SOCI's parallel mode: SOCI fetches layers itself
//! and learns credentials only from CRI pulls through its own socket (its
//! `[cri_keychain]`, kubelet's `imageServiceEndpoint`). Pulls through
//! containerd's socket with credentials then warn to use
//! `--cri-endpoint unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock`.
//!
//! Output: on a terminal, a live line per image (state, elapsed) on stderr;
//! otherwise one structured log line per image. The report (text or `--output
//! json`) goes to stdout and ends with a summary line. Exit 0 when every image
//! was a hit or pulled, 4 when some failed, 2 for a usage/configuration error.
//!
//! Library entry: [`prefetch`] takes a plain [`PrefetchOptions`] (build it
//! with [`PrefetchOptions::new`] or [`PrefetchOptions::from_config`]) and
//! returns a [`PrefetchReport`]; it never exits the process and never
//! panics on a bad image. The boot path decides strictness from
//! `PrefetchOptions::strict` and [`PrefetchReport::failed`].
//!
//! The snapshot cache this command is the fallback for is `soci-agent cache`
//! (see `crate::cache`): a builder runs `install --data-volume DEV
//! --format-data-volume`, this command, then `cache seal`; nodes get a volume
//! restored from that snapshot under both daemons' roots before they start,
//! and `boot` runs `cache verify` and prefetches only the misses (hits cost
//! one `ImageStatus` each). `--platform` (bake mode) also fetches other
//! platforms' content (containerd 1.7+); with SOCI parallel mode, which
//! fetches layers itself, the other family still downloads its layers.

mod bake;
mod credentials;
pub(crate) mod cri;
mod matchimage;
mod options;
mod pin;
mod progress;
mod reference;
mod report;
mod soci;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_cri::v1::Image;
use tonic::transport::Channel;

pub use bake::{PlatformReport, PlatformState};
pub(crate) use credentials::basic_authorization;
pub use credentials::go_duration;
pub use options::{
    DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_PER_IMAGE_SECS, OptionsError, PinMode, PrefetchArgs, PrefetchOptions,
    read_image_list,
};
pub use reference::{ImageRef, RefError};
pub use report::{EXIT_SOME_FAILED, ImageReport, ImageState, PrefetchReport, Summary};

use credentials::{Credential, Keyring};
use cri::{CallError, Cri};
use progress::Board;
pub use soci::{SociConfigError, SociFacts, read_soci_config};

/// Where SOCI's sockets live (its CRI keychain serves the ImageService there).
pub(crate) const SOCI_RUN_DIR: &str = "/run/soci-snapshotter-grpc";
/// Longest wait between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The CLI: resolve the options, prefetch, print the report, return the exit code.
pub async fn run(args: &PrefetchArgs) -> u8 {
    let (opts, output) = match options::resolve(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("soci-agent prefetch: {}", crate::exit::error_chain(&e));
            return crate::exit::ExitKindOf::exit_kind(&e).code();
        }
    };
    let mut report = prefetch(&opts).await;
    if report.failed().next().is_some()
        && let Some(hint) = crate::cache::volume::full_hint(&crate::rootfs::Root::new(&args.root))
    {
        report.warnings.push(hint);
    }
    let phases = report.images.iter().map(|i| (i.image.clone(), i.seconds)).collect();
    crate::history::record_run(
        &crate::rootfs::Root::new(&args.root),
        "prefetch",
        &report.to_json(),
        report.exit_code,
        &phases,
        None,
    );
    match output {
        crate::output::OutputFormat::Json => println!("{}", report.to_json()),
        crate::output::OutputFormat::Text => print!("{}", report.to_text()),
    }
    report.exit_code
}

/// One unique image to work on.
struct Item {
    /// As given.
    given: String,
    parsed: Result<ImageRef, RefError>,
}

/// Why a run cannot start (the report's `error`, exit 2).
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialError),
    /// The CRI endpoint is not a unix socket path (the message names it).
    #[error(transparent)]
    Endpoint(#[from] cri::EndpointError),
    #[error("concurrency must be at least 1")]
    Concurrency,
    /// A socket to use is not there: nothing to retry, the flag or the service is wrong.
    #[error("{what} socket {path} {problem} ({flag} {value}): {advice}")]
    Socket {
        what: &'static str,
        path: PathBuf,
        problem: &'static str,
        flag: &'static str,
        value: String,
        advice: &'static str,
    },
}

/// Why one image failed (the report's per-image `error`).
#[derive(Debug, thiserror::Error)]
enum ImageError {
    /// A call failed for good, or its retries were spent.
    #[error("{what}: {error}{}", after_attempts(what, *attempts))]
    Call {
        what: &'static str,
        error: CallError,
        attempts: u32,
    },
    /// The pull failed; how credentials were found says why, maybe.
    #[error("{error} (credentials: {note})")]
    Pull { error: Box<ImageError>, note: String },
    #[error("PullImage succeeded but ImageStatus does not find {0}")]
    Vanished(String),
    /// The image is there, but its pinned label could not be set (or removed).
    #[error("image {state}, but {error}")]
    Pin {
        state: &'static str,
        error: Box<ImageError>,
    },
}

/// ` (ImageStatus tried N times)` when there was more than one attempt (the report's
/// `attempts` counts PullImage calls only, so the text names the call).
fn after_attempts(what: &str, attempts: u32) -> String {
    if attempts > 1 {
        format!(" ({what} tried {attempts} times)")
    } else {
        String::new()
    }
}

/// What every image task shares.
struct Ctx<'a> {
    opts: &'a PrefetchOptions,
    cri: Cri,
    containerd: Channel,
    keyring: Keyring,
    slots: tokio::sync::Semaphore,
    /// Per-repository locks when images of one repo must not overlap.
    repo_locks: HashMap<String, tokio::sync::Mutex<()>>,
    board: Board,
    /// When the run started (for `ImageReport::started_at`).
    started: Instant,
}

/// Pre-pulls `opts.images` through CRI and reports on each; see the module
/// documentation. Never panics on a bad image and never exits: a failed
/// image is `ImageState::Failed` with an error, a configuration that cannot
/// be used (unreadable auth file, invalid credential provider config, a
/// non-unix CRI endpoint) is `report.error` with exit code 2.
pub async fn prefetch(opts: &PrefetchOptions) -> PrefetchReport {
    let started = Instant::now();
    let mut report = PrefetchReport::new(opts.concurrency, opts.pin, opts.strict);
    let (keyring, cri_socket) = match setup(opts) {
        Ok(x) => x,
        Err(e) => {
            report.error = Some(crate::exit::error_chain(&e));
            report.finish();
            return report;
        }
    };
    report.warnings.extend(keyring.warnings.iter().cloned());
    let items = dedupe(&opts.images, &mut report.warnings);
    let repo_locks = soci_guards(opts, &items, &cri_socket, &mut report);
    let names = items
        .iter()
        .map(|i| i.parsed.as_ref().map_or(i.given.clone(), ToString::to_string))
        .collect();
    let ctx = Ctx {
        opts,
        cri: Cri::new(cri::unix_channel(cri_socket)),
        containerd: cri::unix_channel(opts.containerd_address.clone()),
        keyring,
        slots: tokio::sync::Semaphore::new(opts.concurrency),
        repo_locks,
        board: Board::new(names, opts.progress),
        started,
    };
    // Logged before the progress board (if any) starts drawing.
    for w in &report.warnings {
        tracing::warn!("{w}");
    }
    report.images = every_image(&ctx, &items).await;
    report.seconds = started.elapsed().as_secs_f64();
    report.finish();
    log_summary(&ctx, &report);
    report
}

/// The credentials and the CRI socket; `Err` when the configuration cannot be used.
fn setup(opts: &PrefetchOptions) -> Result<(Keyring, PathBuf), SetupError> {
    let keyring = Keyring::load(
        opts.auth_file.as_deref(),
        opts.credential_provider_config.as_deref(),
        opts.credential_provider_config_required,
        &opts.credential_provider_bin_dir,
    )?;
    let socket = cri::socket_path(&opts.cri_endpoint)?;
    if opts.concurrency == 0 {
        return Err(SetupError::Concurrency);
    }
    require_socket(
        "CRI",
        &socket,
        "--cri-endpoint",
        &opts.cri_endpoint,
        "is containerd running (systemctl status containerd)? Otherwise point --cri-endpoint \
         (or [prefetch] cri_endpoint) at the socket it serves",
    )?;
    if opts.pin != PinMode::Keep || !opts.platforms.is_empty() {
        require_socket(
            "containerd",
            &opts.containerd_address,
            "--containerd-address",
            &opts.containerd_address.display().to_string(),
            "pins and --platform talk to containerd itself: point --containerd-address at its socket \
             (by default the --cri-endpoint socket, which containerd serves both on)",
        )?;
    }
    Ok((keyring, socket))
}

/// Fails unless `path` is a unix socket (a missing socket is not transient: no retries).
fn require_socket(
    what: &'static str,
    path: &Path,
    flag: &'static str,
    value: &str,
    advice: &'static str,
) -> Result<(), SetupError> {
    use std::os::unix::fs::FileTypeExt;
    let problem = match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => return Ok(()),
        Ok(_) => "is not a socket",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
        Err(_) => "cannot be reached",
    };
    Err(SetupError::Socket {
        what,
        path: path.to_path_buf(),
        problem,
        flag,
        value: value.to_string(),
        advice,
    })
}

/// What SOCI's config means for this run: per-repository locks (issue 2035), and a warning
/// when its CRI keychain will not see the credentials of pulls through `cri_socket`.
fn soci_guards(
    opts: &PrefetchOptions,
    items: &[Item],
    cri_socket: &Path,
    report: &mut PrefetchReport,
) -> HashMap<String, tokio::sync::Mutex<()>> {
    let soci = read_soci_config(&opts.soci_config);
    let repos: Vec<String> = items
        .iter()
        .filter_map(|i| i.parsed.as_ref().ok())
        .map(ImageRef::repo)
        .collect();
    let repo_locks = soci::serialization(opts, &soci, &repos, report);
    let credentials_configured =
        opts.auth_file.is_some() || opts.credential_provider_config.as_deref().is_some_and(Path::exists);
    if soci.as_ref().is_ok_and(|f| f.cri_keychain) && credentials_configured && !cri_socket.starts_with(SOCI_RUN_DIR) {
        report.warnings.push(format!(
            "SOCI's CRI keychain is enabled: credentials of pulls through {} do not reach SOCI, which fetches \
             layers itself in parallel mode; point --cri-endpoint at SOCI's socket (kubelet's \
             imageServiceEndpoint) for private registries",
            opts.cri_endpoint
        ));
    }
    repo_locks
}

/// Works on every image at once (within the slots), redrawing the board meanwhile.
async fn every_image(ctx: &Ctx<'_>, items: &[Item]) -> Vec<ImageReport> {
    let work = futures_util::future::join_all(items.iter().enumerate().map(|(i, item)| one_image(ctx, i, item)));
    tokio::pin!(work);
    let images = loop {
        tokio::select! {
            done = &mut work => break done,
            _ = tokio::time::sleep(Duration::from_millis(250)) => ctx.board.draw(),
        }
    };
    ctx.board.draw();
    images
}

/// The summary log line (off a terminal; the board shows it otherwise).
fn log_summary(ctx: &Ctx<'_>, report: &PrefetchReport) {
    if ctx.board.enabled() {
        return;
    }
    tracing::info!(
        images = report.summary.images,
        hit = report.summary.hit,
        pulled = report.summary.pulled,
        failed = report.summary.failed,
        bytes_pulled = report.summary.bytes_pulled,
        seconds = report.seconds,
        "{}",
        report.summary_line()
    );
}

/// Parses every reference and drops repeats of the same normalized one.
fn dedupe(images: &[String], warnings: &mut Vec<String>) -> Vec<Item> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut items = Vec::new();
    for given in images {
        let given = given.trim();
        let parsed = ImageRef::parse(given);
        let key = parsed.as_ref().map_or(given.to_string(), ToString::to_string);
        if let Some(first) = seen.get(&key) {
            warnings.push(format!("{given} is the same image as {first}: prefetched once"));
            continue;
        }
        seen.insert(key, given.to_string());
        items.push(Item {
            given: given.to_string(),
            parsed,
        });
    }
    items
}

/// Per-image call bookkeeping that survives the timeout cancelling the work.
#[derive(Default)]
struct Tracker {
    pulls: AtomicU32,
    last_error: Mutex<Option<String>>,
    auth: Mutex<Option<String>>,
}

/// One image, start to end: waits its turn, then checks, pulls and pins within
/// `--timeout-per-image`; the report says how it went.
async fn one_image(ctx: &Ctx<'_>, idx: usize, item: &Item) -> ImageReport {
    let mut rep = ImageReport::new(&item.given, item.parsed.as_ref().ok().map(ToString::to_string));
    let image = match &item.parsed {
        Ok(r) => r,
        Err(e) => {
            rep.error = Some(e.to_string());
            ctx.board.finish(idx, "failed", 0.0);
            log_result(ctx, &rep);
            return rep;
        }
    };
    let _repo_turn = match ctx.repo_locks.get(&image.repo()) {
        Some(lock) => Some(lock.lock().await),
        None => None,
    };
    let _slot = ctx.slots.acquire().await.expect("semaphore is never closed");
    let started = Instant::now();
    rep.started_at = ctx.started.elapsed().as_secs_f64();
    ctx.board.set(idx, "checking");
    let tracker = Tracker::default();
    let bound = ctx.opts.timeout_per_image;
    match tokio::time::timeout(bound, work(ctx, idx, image, &tracker, &mut rep)).await {
        Ok(Ok(state)) => rep.state = state,
        Ok(Err(e)) => {
            rep.state = ImageState::Failed;
            rep.error = Some(e.to_string());
        }
        Err(_) => {
            rep.state = ImageState::Failed;
            rep.error = Some(timed_out(bound, &tracker));
        }
    }
    finish_image(ctx, idx, &mut rep, &tracker, started);
    rep
}

/// Completes the report from what the tracker saw, and tells the board or the log.
fn finish_image(ctx: &Ctx<'_>, idx: usize, rep: &mut ImageReport, tracker: &Tracker, started: Instant) {
    rep.attempts = tracker.pulls.load(Ordering::Relaxed);
    if rep.auth.is_none() {
        rep.auth = tracker.auth.lock().expect("tracker lock").clone();
    }
    rep.seconds = started.elapsed().as_secs_f64();
    ctx.board.finish(idx, rep.state.as_str(), rep.seconds);
    log_result(ctx, rep);
}

/// The error of an image whose work outlived `bound`, with the last call error seen.
fn timed_out(bound: Duration, tracker: &Tracker) -> String {
    let last = tracker.last_error.lock().expect("tracker lock").clone();
    match last {
        Some(l) => format!(
            "timed out after {} s (--timeout-per-image); last error: {l}",
            bound.as_secs_f64()
        ),
        None => format!("timed out after {} s (--timeout-per-image)", bound.as_secs_f64()),
    }
}

/// One structured log line per image (off a terminal).
fn log_result(ctx: &Ctx<'_>, rep: &ImageReport) {
    if ctx.board.enabled() {
        return;
    }
    let image = rep.name();
    let state = rep.state.as_str();
    let bytes = rep.bytes.unwrap_or(0);
    let auth = rep.auth.as_deref().unwrap_or("none");
    match &rep.error {
        None => tracing::info!(
            image,
            state,
            bytes,
            seconds = rep.seconds,
            attempts = rep.attempts,
            auth,
            "image {state}"
        ),
        Some(error) => tracing::warn!(
            image,
            state,
            seconds = rep.seconds,
            attempts = rep.attempts,
            auth,
            error = error.as_str(),
            "image failed"
        ),
    }
}

/// Makes the image present (a hit, or pulled), pins or unpins it, and fetches other platforms.
async fn work(
    ctx: &Ctx<'_>,
    idx: usize,
    image: &ImageRef,
    tracker: &Tracker,
    rep: &mut ImageReport,
) -> Result<ImageState, ImageError> {
    let reference = image.to_string();
    let Some((state, found, mut credential)) = present(ctx, idx, image, &reference, tracker).await? else {
        return Ok(ImageState::Absent);
    };
    rep.image_id = Some(found.id.clone());
    rep.bytes = Some(found.size);
    if ctx.opts.pin != PinMode::Keep {
        rep.pinned = Some(pin(ctx, idx, tracker, &found, state).await?);
    }
    if !ctx.opts.platforms.is_empty() && ctx.opts.pin != PinMode::Unpin {
        if state == ImageState::Hit && credential.is_none() {
            credential = ctx.keyring.lookup(image).await.credential;
        }
        for platform in &ctx.opts.platforms {
            let p = other_platform(ctx, idx, &reference, platform, credential.as_ref()).await;
            rep.platforms.push(p);
        }
    }
    Ok(state)
}

/// The image as CRI has it: a hit, or pulled now (with the credential the pull used).
/// `None` when it is absent and the run only unpins.
async fn present(
    ctx: &Ctx<'_>,
    idx: usize,
    image: &ImageRef,
    reference: &str,
    tracker: &Tracker,
) -> Result<Option<(ImageState, Image, Option<Credential>)>, ImageError> {
    match retry(ctx, idx, tracker, "ImageStatus", None, || ctx.cri.status(reference)).await? {
        Some(found) => Ok(Some((ImageState::Hit, found, None))),
        None if ctx.opts.pin == PinMode::Unpin => Ok(None),
        None => {
            let (found, credential) = pull(ctx, idx, image, reference, tracker).await?;
            Ok(Some((ImageState::Pulled, found, credential)))
        }
    }
}

/// Pulls the image with the credentials the keyring finds, then looks it up again.
async fn pull(
    ctx: &Ctx<'_>,
    idx: usize,
    image: &ImageRef,
    reference: &str,
    tracker: &Tracker,
) -> Result<(Image, Option<Credential>), ImageError> {
    let resolved = ctx.keyring.lookup(image).await;
    *tracker.auth.lock().expect("tracker lock") = Some(resolved.source.clone());
    let credential = resolved.credential;
    ctx.board.set(idx, "pulling");
    let pulled = retry(ctx, idx, tracker, "PullImage", Some(&tracker.pulls), || {
        ctx.cri.pull(reference, credential.as_ref())
    })
    .await;
    if let Err(e) = pulled {
        return Err(match resolved.note {
            Some(note) => ImageError::Pull {
                error: Box::new(e),
                note,
            },
            None => e,
        });
    }
    let found = retry(ctx, idx, tracker, "ImageStatus", None, || ctx.cri.status(reference))
        .await?
        .ok_or_else(|| ImageError::Vanished(reference.to_string()))?;
    Ok((found, credential))
}

/// Sets (`--pin`) or removes (`--unpin`) the pinned label on every name of `found`; returns which.
async fn pin(
    ctx: &Ctx<'_>,
    idx: usize,
    tracker: &Tracker,
    found: &Image,
    state: ImageState,
) -> Result<bool, ImageError> {
    let pinned = ctx.opts.pin == PinMode::Pin;
    ctx.board.set(idx, if pinned { "pinning" } else { "unpinning" });
    let names = pin::record_names(found);
    retry(ctx, idx, tracker, "pin", None, || {
        pin::set_pinned(&ctx.containerd, &names, pinned)
    })
    .await
    .map_err(|e| ImageError::Pin {
        state: state.as_str(),
        error: Box::new(e),
    })?;
    Ok(pinned)
}

/// Bake mode, one platform: this node's is already pulled; another's content is fetched.
async fn other_platform(
    ctx: &Ctx<'_>,
    idx: usize,
    reference: &str,
    platform: &str,
    credential: Option<&Credential>,
) -> PlatformReport {
    if platform == bake::native_platform() {
        return PlatformReport {
            platform: platform.to_string(),
            state: PlatformState::Native,
            error: None,
        };
    }
    ctx.board.set(idx, "fetching");
    ctx.board.note(idx, platform);
    let pin = ctx.opts.pin == PinMode::Pin;
    bake::fetch_platform(&ctx.containerd, reference, platform, credential, pin).await
}

/// Calls `call` until it succeeds, fails for good, or `retries` extra
/// attempts on transient errors are spent (backoff doubling from
/// `retry_backoff` to 30 s, with up to 25 % jitter).
async fn retry<T, F, Fut>(
    ctx: &Ctx<'_>,
    idx: usize,
    tracker: &Tracker,
    what: &'static str,
    counter: Option<&AtomicU32>,
    mut call: F,
) -> Result<T, ImageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let err = match call().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        *tracker.last_error.lock().expect("tracker lock") = Some(err.message.clone());
        if !err.transient || attempt > ctx.opts.retries {
            return Err(ImageError::Call {
                what,
                error: err,
                attempts: attempt,
            });
        }
        let delay = backoff(ctx.opts.retry_backoff, attempt);
        note_retry(ctx, idx, what, attempt, delay, &err);
        tokio::time::sleep(delay).await;
    }
}

/// Shows a retry on the board, or logs it (off a terminal).
fn note_retry(ctx: &Ctx<'_>, idx: usize, what: &str, attempt: u32, delay: Duration, err: &CallError) {
    if ctx.board.enabled() {
        ctx.board.note(idx, &format!("retry {attempt}: {}", err.message));
    } else {
        tracing::info!(
            call = what,
            attempt,
            delay_seconds = delay.as_secs_f64(),
            error = err.message.as_str(),
            "transient error, retrying"
        );
    }
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    exp + exp.mul_f64(fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupes_by_normalized_reference() {
        let mut w = Vec::new();
        let images = ["nginx", "docker.io/library/nginx:latest", "a:1", "Bad/Ref", "a:1"].map(String::from);
        let items = dedupe(&images, &mut w);
        let given: Vec<&str> = items.iter().map(|i| i.given.as_str()).collect();
        assert_eq!(given, ["nginx", "a:1", "Bad/Ref"]);
        assert_eq!(w.len(), 2);
        assert!(items[2].parsed.is_err());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Duration::from_secs(1);
        assert!(backoff(b, 1) >= b && backoff(b, 1) <= b.mul_f64(1.25));
        assert!(backoff(b, 3) >= Duration::from_secs(4));
        assert!(backoff(b, 30) <= BACKOFF_CAP.mul_f64(1.25));
    }
}
