//! HTTP downloads of release artifacts, with retries, stall detection and
//! progress, streamed straight into [`extract_verified`].
//!
//! The body is never held in memory or on disk as a whole: an async task reads
//! the response and hands chunks over a bounded channel to a blocking task
//! that hashes, gunzips and untars them. A transport error mid-body is passed
//! down the channel so extraction stops, and it is reported as the (transient)
//! cause. Verification failures and 404s are never retried.

use std::io::{self, IsTerminal as _, Read, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use crate::release::Sha256Hex;
use crate::release::extract::{ExtractError, Extracted, extract_verified};

/// Chunks in flight between the network task and the extraction task.
const CHANNEL_DEPTH: usize = 8;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Limit for establishing a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Longest wait for the response headers or for the next body chunk.
    /// Enforced around each network await rather than with reqwest's
    /// `read_timeout`, whose timer keeps running while a slow disk holds the
    /// download back (the extraction channel is full), which would look like
    /// a stalled server.
    pub stall_timeout: Duration,
    /// Extra attempts after the first, for transient errors only.
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub progress: Progress,
    /// Bound on one download, all attempts and backoff included.
    pub deadline: Duration,
    /// A body slower than this (bytes per second, measured over each
    /// `stall_timeout` window) counts as stalled: a server dripping a byte a
    /// second never trips the per-chunk timeout.
    pub min_rate: u64,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(600),
            min_rate: 1024,
            retries: 4,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(8),
            progress: Progress::Log,
        }
    }
}

/// How download progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// One updating line on stderr, at most ~5 updates per second.
    Tty,
    /// A log line at each 25% (every 16 MiB when the size is unknown).
    Log,
    Quiet,
}

impl Progress {
    /// `Tty` when stderr is a terminal, `Log` otherwise.
    pub fn detect() -> Self {
        if io::stderr().is_terminal() {
            Progress::Tty
        } else {
            Progress::Log
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "404 Not Found: {url} does not exist on the mirror (check --soci-version, --arch, --flavor and --release-url)"
    )]
    NotFound { url: String },
    #[error("HTTP {status} from {url}")]
    Status { url: String, status: u16 },
    #[error("{} {url}", transport_kind(.source))]
    Transport { url: String, source: reqwest::Error },
    #[error("no data from {url} for {}s (stalled)", .after.as_secs_f64())]
    Stalled { url: String, after: Duration },
    #[error(
        "{url} sent {bytes} bytes in {}s, below the minimum of {min_rate} bytes/s (stalled)",
        .window.as_secs_f64()
    )]
    TooSlow {
        url: String,
        bytes: u64,
        window: Duration,
        min_rate: u64,
    },
    #[error(
        "cannot resolve {host} (DNS) to fetch {url}: check the node's DNS and network, or install offline \
         with --archive, from a reachable mirror with --release-url, or through a proxy with HTTPS_PROXY"
    )]
    Resolve { host: String, url: String },
    #[error("fetching {url} did not finish within {}s (the download deadline); giving up", .after.as_secs_f64())]
    Deadline { url: String, after: Duration },
    #[error("refusing the redirect from {from} to {to}: an https download must not continue over plain http")]
    Downgrade { from: String, to: String },
    #[error("{url} is larger than the {limit}-byte limit; refusing it")]
    TooLarge { url: String, limit: usize },
    #[error("{} {url}", extract_verb(.source))]
    Extract { url: String, source: ExtractError },
    #[error("cannot open local archive {path}")]
    OpenLocal { path: PathBuf, source: io::Error },
    #[error("{} local archive {path}", extract_verb(.source))]
    LocalArchive { path: PathBuf, source: ExtractError },
    #[error("cannot prepare extraction directory {path}")]
    PrepareDest { path: PathBuf, source: io::Error },
    #[error("cannot build the HTTP client")]
    Client { source: reqwest::Error },
    #[error("extraction task for {what} died")]
    Join {
        what: String,
        source: tokio::task::JoinError,
    },
}

fn transport_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out fetching"
    } else if e.is_connect() {
        "cannot connect to fetch"
    } else if e.is_body() || e.is_decode() {
        "connection broke while downloading"
    } else {
        "request failed for"
    }
}

fn extract_verb(e: &ExtractError) -> &'static str {
    if e.is_verification_failure() {
        "refusing"
    } else {
        "cannot unpack"
    }
}

impl crate::exit::ExitKindOf for FetchError {
    /// A refused artifact is a verification failure (exit 3); anything else
    /// (unreachable, missing) failed with the node as it was (exit 1).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        if self.is_verification_failure() {
            crate::exit::ExitKind::Verification
        } else {
            crate::exit::ExitKind::Failed
        }
    }
}

impl FetchError {
    /// The artifact was refused (digest mismatch, hostile or corrupt archive).
    pub fn is_verification_failure(&self) -> bool {
        match self {
            FetchError::Extract { source, .. } | FetchError::LocalArchive { source, .. } => {
                source.is_verification_failure()
            }
            _ => false,
        }
    }

    /// Worth another attempt: connection failures, timeouts, stalls, bodies
    /// cut short, 408, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Transport { source: e, .. } => {
                !e.is_builder()
                    && !e.is_redirect()
                    && (e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode())
            }
            FetchError::Stalled { .. } | FetchError::TooSlow { .. } | FetchError::Resolve { .. } => true,
            FetchError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }
}

/// Renders an error with its `source()` chain, for log lines.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cur = s.source();
    }
    out
}

/// HTTP client for release artifacts.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    opts: HttpOptions,
}

impl Fetcher {
    /// Proxies come from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`; plain
    /// `http://` URLs work (warning about them is the caller's job).
    pub fn new(opts: HttpOptions) -> Result<Self, FetchError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("soci-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(opts.connect_timeout)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let from = attempt.previous().last().cloned();
                match from.map(|f| check_redirect(&f, attempt.url())) {
                    Some(Err(e)) => attempt.error(e),
                    _ if attempt.previous().len() > MAX_REDIRECTS => attempt.error("too many redirects"),
                    _ => attempt.follow(),
                }
            }))
            .build()
            .map_err(|source| FetchError::Client { source })?;
        Ok(Fetcher { client, opts })
    }

    pub fn options(&self) -> &HttpOptions {
        &self.opts
    }

    /// GETs a small text (the `.sha256sum`), with retries; refuses bodies
    /// over `limit` bytes.
    pub async fn get_small(&self, url: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
        self.bounded(url, self.with_retries(url, || self.try_get_small(url, limit)))
            .await
    }

    /// `work` within the download deadline.
    async fn bounded<T>(&self, url: &str, work: impl Future<Output = Result<T, FetchError>>) -> Result<T, FetchError> {
        let after = self.opts.deadline;
        tokio::time::timeout(after, work)
            .await
            .map_err(|_| FetchError::Deadline {
                url: url.to_string(),
                after,
            })?
    }

    /// Downloads `url` and streams it through [`extract_verified`] into `dest`,
    /// which is recreated empty for each attempt (so it need not exist).
    /// Transient errors are retried with capped exponential backoff and full
    /// jitter; a verification failure or a 404 is not. On error `dest` is left
    /// empty (or absent); the caller deletes it.
    pub async fn download_release(
        &self,
        url: &str,
        expected: &Sha256Hex,
        dest: &Path,
    ) -> Result<Extracted, FetchError> {
        self.bounded(url, self.with_retries(url, || self.try_download(url, expected, dest)))
            .await
    }

    async fn with_retries<T, F, Fut>(&self, url: &str, mut attempt_once: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, FetchError>>,
    {
        let attempts = self.opts.retries.saturating_add(1);
        let mut attempt = 1;
        loop {
            match attempt_once().await {
                Err(e) if attempt < attempts && e.is_transient() => {
                    let delay = backoff_delay(&self.opts, attempt);
                    tracing::warn!(
                        url,
                        attempt,
                        attempts,
                        "fetching {url} failed (attempt {attempt}/{attempts}): {}; retrying in {:.1}s",
                        chain(&e),
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Sends a GET and maps the status; headers must arrive within the stall timeout.
    async fn get(&self, url: &str) -> Result<reqwest::Response, FetchError> {
        self.send(url, self.client.get(url)).await
    }

    /// Asks whether `url` exists without downloading it: one HEAD (or, from
    /// a server that refuses HEAD, a GET of its first byte), no retries,
    /// each wait bounded by the stall timeout.
    pub async fn exists(&self, url: &str) -> Result<(), FetchError> {
        match self.send(url, self.client.head(url)).await {
            Err(FetchError::Status { status: 405 | 501, .. }) => {
                let first_byte = self.client.get(url).header(reqwest::header::RANGE, "bytes=0-0");
                self.send(url, first_byte).await.map(drop)
            }
            answered => answered.map(drop),
        }
    }

    /// Sends `request` for `url`; a non-2xx answer is an error.
    async fn send(&self, url: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, FetchError> {
        let stall = self.opts.stall_timeout;
        let response = tokio::time::timeout(stall, request.send())
            .await
            .map_err(|_| FetchError::Stalled {
                url: url.to_string(),
                after: stall,
            })?
            .map_err(|e| transport_error(url, e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(FetchError::NotFound { url: url.to_string() });
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        Ok(response)
    }

    async fn try_get_small(&self, url: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
        let too_large = || FetchError::TooLarge {
            url: url.to_string(),
            limit,
        };
        let response = self.get(url).await?;
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        let mut rate = RateWindow::new(&self.opts);
        while let Some(chunk) = self.next_chunk(url, &mut stream, &mut rate).await? {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Next body chunk, or a stall (nothing for `stall_timeout`, or less than
    /// `min_rate` over a window) / transport error.
    async fn next_chunk<S, B>(&self, url: &str, stream: &mut S, rate: &mut RateWindow) -> Result<Option<B>, FetchError>
    where
        S: futures_util::Stream<Item = reqwest::Result<B>> + Unpin,
        B: AsRef<[u8]>,
    {
        let stall = self.opts.stall_timeout;
        match tokio::time::timeout(stall, stream.next()).await {
            Err(_) => Err(FetchError::Stalled {
                url: url.to_string(),
                after: stall,
            }),
            Ok(None) => Ok(None),
            Ok(Some(Ok(chunk))) => {
                rate.add(chunk.as_ref().len() as u64, url)?;
                Ok(Some(chunk))
            }
            Ok(Some(Err(e))) => Err(FetchError::Transport {
                url: url.to_string(),
                source: e.without_url(),
            }),
        }
    }

    async fn try_download(&self, url: &str, expected: &Sha256Hex, dest: &Path) -> Result<Extracted, FetchError> {
        reset_dir(dest)?;
        let response = self.get(url).await?;
        let mut meter = Meter::new(self.opts.progress, url, response.content_length());
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let task = {
            let (dest, expected) = (dest.to_path_buf(), expected.clone());
            tokio::task::spawn_blocking(move || extract_verified(ChannelReader::new(rx), &dest, &expected))
        };
        let mut stream = response.bytes_stream();
        let mut fetch_error = None;
        let mut rate = RateWindow::new(&self.opts);
        loop {
            match self.next_chunk(url, &mut stream, &mut rate).await {
                Ok(Some(chunk)) => {
                    meter.advance(chunk.len());
                    if tx.send(Ok(chunk)).await.is_err() {
                        break; // extraction stopped early; its error tells why
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    fetch_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        drop(stream);
        meter.finish();
        // Always wait for extraction, so it has cleaned up before a retry.
        let extracted = task.await.map_err(|source| FetchError::Join {
            what: url.to_string(),
            source,
        })?;
        if let Some(e) = fetch_error {
            return Err(e);
        }
        extracted.map_err(|source| FetchError::Extract {
            url: url.to_string(),
            source,
        })
    }
}

/// Redirects followed at most (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// A redirect may not take an https download to plain http (a downgrade an
/// on-path attacker could force); any other hop is fine.
pub fn check_redirect(from: &reqwest::Url, to: &reqwest::Url) -> Result<(), FetchError> {
    if from.scheme() == "https" && to.scheme() == "http" {
        return Err(FetchError::Downgrade {
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    Ok(())
}

/// Maps a reqwest error, surfacing a refused redirect and a name that does
/// not resolve as themselves (not as the resolver's raw query struct).
fn transport_error(url: &str, e: reqwest::Error) -> FetchError {
    let mut cause: Option<&dyn std::error::Error> = Some(&e);
    while let Some(c) = cause {
        if let Some(FetchError::Downgrade { from, to }) = c.downcast_ref::<FetchError>() {
            return FetchError::Downgrade {
                from: from.clone(),
                to: to.clone(),
            };
        }
        if e.is_connect() && c.to_string().starts_with("dns error") {
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            return FetchError::Resolve {
                host,
                url: url.to_string(),
            };
        }
        cause = c.source();
    }
    FetchError::Transport {
        url: url.to_string(),
        source: e.without_url(),
    }
}

/// Bytes received in the current `stall_timeout` window; a window that ends
/// below `min_rate` bytes per second is a stall.
struct RateWindow {
    window: Duration,
    min_rate: u64,
    started: tokio::time::Instant,
    bytes: u64,
}

impl RateWindow {
    fn new(opts: &HttpOptions) -> Self {
        RateWindow {
            window: opts.stall_timeout,
            min_rate: opts.min_rate,
            started: tokio::time::Instant::now(),
            bytes: 0,
        }
    }

    fn add(&mut self, n: u64, url: &str) -> Result<(), FetchError> {
        self.bytes += n;
        let elapsed = self.started.elapsed();
        if elapsed < self.window {
            return Ok(());
        }
        let floor = (self.min_rate as f64 * elapsed.as_secs_f64()) as u64;
        if self.bytes < floor {
            return Err(FetchError::TooSlow {
                url: url.to_string(),
                bytes: self.bytes,
                window: elapsed,
                min_rate: self.min_rate,
            });
        }
        self.started = tokio::time::Instant::now();
        self.bytes = 0;
        Ok(())
    }
}

/// Same pipeline for a local file (offline `--archive`), without retries.
/// `dest` is recreated empty first; on error it is left empty.
pub async fn extract_local(path: &Path, expected: &Sha256Hex, dest: &Path) -> Result<Extracted, FetchError> {
    reset_dir(dest)?;
    let (path, expected, dest) = (path.to_path_buf(), expected.clone(), dest.to_path_buf());
    let what = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|source| FetchError::OpenLocal {
            path: path.clone(),
            source,
        })?;
        extract_verified(file, &dest, &expected).map_err(|source| FetchError::LocalArchive { path, source })
    })
    .await
    .map_err(|source| FetchError::Join { what, source })?
}

/// Removes `dir` if present and creates it empty.
fn reset_dir(dir: &Path) -> Result<(), FetchError> {
    let err = |source| FetchError::PrepareDest {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir(dir).map_err(err)?;
    // Explicitly, not from the umask: the directory becomes the store entry.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)
}

/// Capped exponential backoff with full jitter: uniform in
/// `[0, min(cap, base * 2^(attempt-1))]`, `attempt` counting from 1.
pub fn backoff_delay(opts: &HttpOptions, attempt: u32) -> Duration {
    let exp = opts
        .backoff_base
        .saturating_mul(1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX));
    let ceiling = exp.min(opts.backoff_cap).as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(fastrand::u64(0..=ceiling))
}

/// Blocking `Read` over the chunks sent by the network task. An `Err` item is
/// returned as the read error; a closed channel is end of input.
struct ChannelReader<B> {
    rx: mpsc::Receiver<io::Result<B>>,
    chunk: Option<B>,
    pos: usize,
}

impl<B> ChannelReader<B> {
    fn new(rx: mpsc::Receiver<io::Result<B>>) -> Self {
        ChannelReader {
            rx,
            chunk: None,
            pos: 0,
        }
    }
}

impl<B: AsRef<[u8]>> Read for ChannelReader<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(chunk) = &self.chunk {
                let rest = &chunk.as_ref()[self.pos..];
                if !rest.is_empty() {
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    self.pos += n;
                    return Ok(n);
                }
                self.chunk = None;
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = Some(chunk);
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
    }
}

/// Progress display for one download attempt.
struct Meter {
    mode: Progress,
    url: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    /// Next byte count that triggers a log line.
    next_log: u64,
}

const LOG_STEP_UNKNOWN: u64 = 16 * 1024 * 1024;
const TTY_INTERVAL: Duration = Duration::from_millis(200);

impl Meter {
    fn new(mode: Progress, url: &str, total: Option<u64>) -> Self {
        let mut meter = Meter {
            mode,
            url: url.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            last_draw: None,
            next_log: 0,
        };
        meter.next_log = meter.log_step();
        meter
    }

    fn log_step(&self) -> u64 {
        match self.total {
            Some(t) => (t / 4).max(1),
            None => LOG_STEP_UNKNOWN,
        }
    }

    fn advance(&mut self, n: usize) {
        self.done += n as u64;
        match self.mode {
            Progress::Quiet => {}
            Progress::Tty => {
                if self.last_draw.is_none_or(|t| t.elapsed() >= TTY_INTERVAL) {
                    self.draw(false);
                }
            }
            Progress::Log => {
                if self.done >= self.next_log {
                    let step = self.log_step();
                    while self.next_log <= self.done {
                        self.next_log += step;
                    }
                    self.log();
                }
            }
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / MIB / self.started.elapsed().as_secs_f64().max(0.001)
    }

    fn draw(&mut self, last: bool) {
        let done = self.done as f64 / MIB;
        let total = self
            .total
            .map(|t| format!("/{:.1}", t as f64 / MIB))
            .unwrap_or_default();
        let end = if last { "\n" } else { "" };
        let mut err = io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2Kdownloading {}: {done:.1}{total} MiB ({:.1} MiB/s){end}",
            self.url.rsplit('/').next().unwrap_or(&self.url),
            self.rate()
        );
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
    }

    fn log(&self) {
        let done = self.done as f64 / MIB;
        match self.total {
            Some(t) if t > 0 => {
                let pct = (self.done.min(t) * 100 / t) as u32;
                tracing::info!(url = %self.url, "downloaded {pct}% ({done:.1}/{:.1} MiB, {:.1} MiB/s)", t as f64 / MIB, self.rate());
            }
            _ => {
                tracing::info!(url = %self.url, "downloaded {done:.1} MiB ({:.1} MiB/s)", self.rate())
            }
        }
    }

    fn finish(&mut self) {
        if self.mode == Progress::Tty && self.last_draw.is_some() {
            self.draw(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let opts = HttpOptions {
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(8),
            ..Default::default()
        };
        for attempt in 1..=40 {
            let ceiling = Duration::from_millis(500)
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(Duration::from_secs(8));
            for _ in 0..20 {
                assert!(backoff_delay(&opts, attempt) <= ceiling, "attempt {attempt}");
            }
        }
    }

    #[test]
    fn channel_reader_forwards_bytes_then_errors() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"ab".to_vec())).unwrap();
        tx.try_send(Ok(Vec::new())).unwrap();
        tx.try_send(Ok(b"cde".to_vec())).unwrap();
        tx.try_send(Err(io::Error::other("cut"))).unwrap();
        drop(tx);
        let mut reader = ChannelReader::new(rx);
        let mut buf = [0u8; 2];
        let mut got = Vec::new();
        let err = loop {
            match reader.read(&mut buf) {
                Ok(0) => panic!("EOF before the error"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        assert_eq!(got, b"abcde");
        assert_eq!(err.to_string(), "cut");
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn transient_classification() {
        let status = |s| FetchError::Status {
            url: "u".into(),
            status: s,
        };
        assert!(status(500).is_transient() && status(503).is_transient() && status(429).is_transient());
        assert!(!status(403).is_transient());
        assert!(!FetchError::NotFound { url: "u".into() }.is_transient());
        assert!(
            FetchError::Stalled {
                url: "u".into(),
                after: Duration::from_secs(1)
            }
            .is_transient()
        );
        let nf = FetchError::NotFound {
            url: "https://m/x.tar.gz".into(),
        }
        .to_string();
        assert!(
            nf.starts_with("404 Not Found: https://m/x.tar.gz does not exist"),
            "{nf}"
        );
    }

    #[test]
    fn log_meter_steps_by_quarters() {
        let mut m = Meter::new(Progress::Log, "u", Some(100));
        assert_eq!(m.next_log, 25);
        m.advance(60);
        assert_eq!(m.next_log, 75);
        let unknown = Meter::new(Progress::Log, "u", None);
        assert_eq!(unknown.next_log, LOG_STEP_UNKNOWN);
    }
}
