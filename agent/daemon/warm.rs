//! Keeping the `[prefetch]` images warm, off the reconcile path (a pull can
//! take minutes; the health checks go on meanwhile). Each reconcile kicks a
//! warm cycle when none is running:
//!
//! 1. with `[daemon] refresh`, every tag whose time has come is re-resolved
//!    in its registry (`resolve`), one image at a time; the next time is
//!    `refresh` plus up to a tenth of it (at most 15 min) of random jitter,
//!    so a fleet does not hit the registry at once. A tag that moved has its
//!    new digest pulled through `crate::prefetch::prefetch` (and pinned with
//!    `pin = true`); the old image is then unpinned so kubelet's GC can
//!    reclaim it. From then on the image is kept warm by digest.
//! 2. every configured image goes through `prefetch` (hits are one CRI
//!    `ImageStatus` each; missing ones are pulled, pinned as configured),
//!    with `[prefetch] concurrency` images at once.
//!
//! On reload the list is re-aligned with the configuration: kept images keep
//! what is known of them, removed ones are forgotten, new ones are warmed at
//! once. One status entry per configured image: memory does not grow with
//! time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::config::Config;
use super::state::{ImageStatus, Shared, lock, unix_now};
use crate::prefetch::{ImageRef, ImageReport, PinMode, prefetch};

const RESOLVE_BOUND: Duration = Duration::from_secs(30);
const MAX_JITTER: Duration = Duration::from_secs(900);

/// The warm task, when one runs.
#[derive(Default)]
pub struct Warmer {
    handle: Option<tokio::task::JoinHandle<()>>,
    again: Arc<AtomicBool>,
}

/// `refresh` plus jitter from now, unix seconds.
fn next_refresh(period: Duration) -> f64 {
    let jitter = (period / 10).min(MAX_JITTER).as_secs_f64() * fastrand::f64();
    unix_now() + period.as_secs_f64() + jitter
}

/// A tag reference (no digest) worth re-resolving.
fn tag_ref(image: &str) -> Option<ImageRef> {
    ImageRef::parse(image)
        .ok()
        .filter(|r| r.digest.is_none() && r.tag.is_some())
}

/// What to pull and pin: the resolved digest once refresh knows it, else the image as configured.
fn effective(st: &ImageStatus) -> String {
    match (&st.digest, tag_ref(&st.image)) {
        (Some(d), Some(r)) => format!("{}/{}@{d}", r.registry, r.repository),
        _ => st.image.clone(),
    }
}

impl Warmer {
    /// Aligns the shared image list with `cfg`; returns true when images were added.
    pub fn sync(shared: &Shared, cfg: &Config) -> bool {
        let mut live = lock(shared);
        let old = std::mem::take(&mut live.images);
        let mut seen = Vec::new();
        let mut added = false;
        for given in &cfg.prefetch.images {
            let given = given.trim();
            let reference = ImageRef::parse(given).ok().map(|r| r.to_string());
            let key = reference.clone().unwrap_or_else(|| given.to_string());
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let mut st = match old.iter().find(|o| o.image == given) {
                Some(o) => o.clone(),
                None => {
                    added = true;
                    ImageStatus::pending(given, reference)
                }
            };
            if cfg.refresh.is_none() {
                // Without refresh the tag itself is kept warm again, wherever it points.
                st.digest = None;
            }
            st.next_refresh_at = match cfg.refresh {
                Some(p) if tag_ref(given).is_some() => st.next_refresh_at.or_else(|| Some(next_refresh(p))),
                _ => None,
            };
            live.images.push(st);
        }
        added
    }

    /// Starts a warm cycle unless one runs (then it runs one more when done).
    pub fn kick(&mut self, shared: &Shared, cfg: &Arc<Config>) {
        if cfg.prefetch.images.is_empty() {
            return;
        }
        if self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            self.again.store(true, Ordering::SeqCst);
            return;
        }
        let (shared, cfg, again) = (shared.clone(), cfg.clone(), self.again.clone());
        self.handle = Some(tokio::spawn(async move {
            loop {
                cycle(&shared, &cfg).await;
                if !again.swap(false, Ordering::SeqCst) {
                    break;
                }
            }
        }));
    }

    /// Stops a running cycle (shutdown).
    pub fn abort(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

async fn cycle(shared: &Shared, cfg: &Config) {
    if let Some(period) = cfg.refresh {
        refresh_due(shared, cfg, period).await;
    }
    let refs: Vec<String> = lock(shared).images.iter().map(effective).collect();
    if refs.is_empty() {
        return;
    }
    let mut opts = cfg.prefetch.clone();
    opts.images = refs;
    let report = prefetch(&opts).await;
    let mut live = lock(shared);
    for st in live.images.iter_mut() {
        let eff = effective(st);
        match report.images.iter().find(|r| r.image == eff) {
            Some(r) => apply(st, r),
            None => {
                if let Some(e) = &report.error {
                    st.state = "failed";
                    st.error = Some(e.clone());
                }
            }
        }
    }
}

fn apply(st: &mut ImageStatus, r: &ImageReport) {
    st.state = r.state.as_str();
    st.bytes = r.bytes.or(st.bytes);
    st.seconds = r.seconds;
    st.image_id = r.image_id.clone().or(st.image_id.take());
    st.pinned = r.pinned.or(st.pinned);
    st.error = r.error.clone();
    st.checked_at = Some(unix_now());
    if r.state == crate::prefetch::ImageState::Pulled {
        st.pulls += 1;
    }
}

async fn refresh_due(shared: &Shared, cfg: &Config, period: Duration) {
    let now = unix_now();
    let due: Vec<(String, Option<String>, Option<String>)> = lock(shared)
        .images
        .iter()
        .filter(|i| i.next_refresh_at.is_some_and(|t| t <= now))
        .map(|i| (i.image.clone(), i.digest.clone(), i.image_id.clone()))
        .collect();
    for (given, digest, image_id) in due {
        let Some(r) = tag_ref(&given) else { continue };
        let outcome = refresh_one(cfg, &r, digest.as_deref(), image_id.as_deref()).await;
        let mut live = lock(shared);
        let Some(st) = live.images.iter_mut().find(|i| i.image == given) else {
            continue;
        };
        st.refreshed_at = Some(unix_now());
        st.next_refresh_at = Some(next_refresh(period));
        match outcome {
            Ok(Refreshed::Same) => st.refresh_error = None,
            Ok(Refreshed::Resolved {
                digest: d,
                report,
                moved,
            }) => {
                if moved {
                    st.moves += 1;
                    st.previous_digest = st.digest.clone();
                }
                st.digest = Some(d);
                apply(st, &report);
                st.refresh_error = None;
            }
            Err(e) => {
                let e = crate::exit::error_chain(&e);
                tracing::warn!(image = given.as_str(), error = e.as_str(), "refresh failed");
                st.refresh_error = Some(e);
            }
        }
    }
}

enum Refreshed {
    /// The tag names the digest it named before.
    Same,
    /// The tag's digest is now known (first time, or it moved), pulled and pinned as configured.
    Resolved {
        digest: String,
        report: Box<ImageReport>,
        moved: bool,
    },
}

/// Why a tag could not be refreshed.
#[derive(Debug, thiserror::Error)]
enum RefreshError {
    #[error(transparent)]
    Resolve(#[from] super::resolve::ResolveError),
    #[error("{image}: {message}")]
    Pull { image: String, message: String },
}

async fn refresh_one(
    cfg: &Config,
    r: &ImageRef,
    known: Option<&str>,
    known_id: Option<&str>,
) -> Result<Refreshed, RefreshError> {
    let digest = super::resolve::digest(r, cfg.prefetch.auth_file.as_deref(), RESOLVE_BOUND).await?;
    if known == Some(digest.as_str()) {
        return Ok(Refreshed::Same);
    }
    let by_digest = format!("{}/{}@{digest}", r.registry, r.repository);
    let mut opts = cfg.prefetch.clone();
    opts.images = vec![by_digest.clone()];
    let report = prefetch(&opts).await;
    let pull_failed = |message: String| RefreshError::Pull {
        image: by_digest.clone(),
        message,
    };
    let img = report
        .images
        .into_iter()
        .next()
        .ok_or_else(|| pull_failed(report.error.unwrap_or_default()))?;
    if let Some(e) = &img.error {
        return Err(pull_failed(e.clone()));
    }
    let moved = known_id.is_some_and(|old| img.image_id.as_deref() != Some(old));
    if moved {
        tracing::info!(image = %r, from = known.unwrap_or("(as pulled before)"), to = digest.as_str(), "tag moved: new digest pulled");
        if cfg.prefetch.pin == PinMode::Pin {
            unpin_old(cfg, r, known, img.image_id.as_deref()).await;
        }
    }
    Ok(Refreshed::Resolved {
        digest,
        report: Box::new(img),
        moved,
    })
}

/// Unpins the images the tag named before: its previous digest, and the tag's
/// local record while it still names an old image.
async fn unpin_old(cfg: &Config, r: &ImageRef, previous: Option<&str>, new_id: Option<&str>) {
    let mut refs: Vec<String> = previous
        .map(|d| format!("{}/{}@{d}", r.registry, r.repository))
        .into_iter()
        .collect();
    let mut look = cfg.prefetch.clone();
    look.images = vec![r.to_string()];
    look.pin = PinMode::Keep;
    let tag = prefetch(&look).await;
    if tag
        .images
        .first()
        .is_some_and(|t| t.image_id.is_some() && t.image_id.as_deref() != new_id)
    {
        refs.push(r.to_string());
    }
    if refs.is_empty() {
        return;
    }
    let mut unpin = cfg.prefetch.clone();
    unpin.images = refs;
    unpin.pin = PinMode::Unpin;
    let report = prefetch(&unpin).await;
    for i in &report.images {
        match &i.error {
            None => tracing::info!(image = i.name(), "unpinned the image a moved tag named before"),
            Some(e) => tracing::warn!(image = i.name(), error = e.as_str(), "could not unpin the old image"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_reference_follows_the_resolved_digest() {
        let mut st = ImageStatus::pending("r.example:5000/app:1", None);
        assert_eq!(effective(&st), "r.example:5000/app:1");
        st.digest = Some("sha256:abc".into());
        assert_eq!(effective(&st), "r.example:5000/app@sha256:abc");
        let pinned = ImageStatus::pending("r.example/app@sha256:def", None);
        assert_eq!(effective(&pinned), "r.example/app@sha256:def");
        assert!(tag_ref("nginx").is_some() && tag_ref("a@sha256:0000").is_none());
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        let p = Duration::from_secs(600);
        for _ in 0..100 {
            let t = next_refresh(p) - unix_now();
            assert!((599.0..=661.0).contains(&t), "{t}");
        }
    }
}
