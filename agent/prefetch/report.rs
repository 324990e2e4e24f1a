//! The prefetch report: JSON for machines (`--output json`), a listing and a
//! summary line for people. It names credential sources, never secrets.

use serde::Serialize;

use super::bake::{PlatformReport, PlatformState};
use super::options::PinMode;

/// Exit code when some images failed.
pub const EXIT_SOME_FAILED: u8 = 4;
/// Exit code for a usage or configuration error (nothing was pulled).
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// Already present: nothing pulled (a snapshot cache, or an earlier run).
    Hit,
    /// Pulled through CRI by this run.
    Pulled,
    /// Could not be checked, pulled or pinned; `error` says why.
    Failed,
    /// `--unpin` of an image that is not present (not an error).
    Absent,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Hit => "hit",
            ImageState::Pulled => "pulled",
            ImageState::Failed => "failed",
            ImageState::Absent => "absent",
        }
    }
}

/// One image's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    /// The reference as given.
    pub image: String,
    /// The normalized reference (`docker.io/library/x:1`); absent when invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub state: ImageState,
    /// CRI image ID (`sha256:<config digest>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// `ImageStatus.image.size`: the image's size in bytes as CRI reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// When work on the image began (it had its turn and a slot), in seconds
    /// after the run started.
    pub started_at: f64,
    /// How long the image took from then.
    pub seconds: f64,
    /// `PullImage` calls made (0 for a hit).
    pub attempts: u32,
    /// Where the pull credentials came from: `auth-file`,
    /// `credential-provider:<name>` or `anonymous` (absent when nothing was pulled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Label state after the run, with --pin or --unpin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bake mode, per extra platform.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformReport>,
}

impl ImageReport {
    pub fn new(image: &str, reference: Option<String>) -> Self {
        ImageReport {
            image: image.to_string(),
            reference,
            state: ImageState::Failed,
            image_id: None,
            bytes: None,
            started_at: 0.0,
            seconds: 0.0,
            attempts: 0,
            auth: None,
            pinned: None,
            error: None,
            platforms: Vec::new(),
        }
    }

    /// The normalized reference, else the text as given.
    pub fn name(&self) -> &str {
        self.reference.as_deref().unwrap_or(&self.image)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub images: usize,
    pub hit: usize,
    pub pulled: usize,
    pub failed: usize,
    pub absent: usize,
    /// Sum of `bytes` over pulled images.
    pub bytes_pulled: u64,
}

/// What [`super::prefetch`] did; `exit_code` is 0 (all hit or pulled), 4
/// (some failed: see [`PrefetchReport::failed`]) or 2 (the options or
/// credential configuration were unusable, nothing was attempted).
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchReport {
    pub command: &'static str,
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub concurrency: usize,
    pub pin: PinMode,
    /// `[prefetch] strict`, passed through for the boot path.
    pub strict: bool,
    /// Whether images of one repository were serialized (SOCI issue 2035 guard).
    pub serialized_repos: Vec<String>,
    pub images: Vec<ImageReport>,
    pub summary: Summary,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

impl PrefetchReport {
    pub fn new(concurrency: usize, pin: PinMode, strict: bool) -> Self {
        PrefetchReport {
            command: "prefetch",
            exit_code: 0,
            error: None,
            concurrency,
            pin,
            strict,
            serialized_repos: Vec::new(),
            images: Vec::new(),
            summary: Summary::default(),
            warnings: Vec::new(),
            seconds: 0.0,
        }
    }

    /// The images that failed.
    pub fn failed(&self) -> impl Iterator<Item = &ImageReport> {
        self.images.iter().filter(|i| i.state == ImageState::Failed)
    }

    /// True when nothing failed and no configuration error stopped the run.
    pub fn all_ok(&self) -> bool {
        self.exit_code == 0
    }

    /// Fills `summary` and `exit_code` from `images` (and `error`).
    pub fn finish(&mut self) {
        let mut s = Summary {
            images: self.images.len(),
            ..Summary::default()
        };
        for i in &self.images {
            match i.state {
                ImageState::Hit => s.hit += 1,
                ImageState::Pulled => {
                    s.pulled += 1;
                    s.bytes_pulled += i.bytes.unwrap_or(0);
                }
                ImageState::Failed => s.failed += 1,
                ImageState::Absent => s.absent += 1,
            }
        }
        self.exit_code = if self.error.is_some() {
            EXIT_USAGE
        } else if s.failed > 0 {
            EXIT_SOME_FAILED
        } else {
            0
        };
        self.summary = s;
    }

    /// `prefetch: 4 images: 1 hit, 2 pulled, 1 failed; 24.6 MiB pulled in 3.4 s`
    pub fn summary_line(&self) -> String {
        let s = &self.summary;
        if let Some(e) = &self.error {
            return format!("prefetch: not started: {e}");
        }
        if s.images == 0 {
            return "prefetch: nothing to do: no images (arguments, --from or [prefetch] images)".to_string();
        }
        let mut parts = vec![format!("{} hit", s.hit), format!("{} pulled", s.pulled)];
        if s.absent > 0 {
            parts.push(format!("{} absent", s.absent));
        }
        parts.push(format!("{} failed", s.failed));
        format!(
            "prefetch: {} image{}: {}; {} pulled in {:.1} s",
            s.images,
            if s.images == 1 { "" } else { "s" },
            parts.join(", "),
            human_bytes(s.bytes_pulled),
            self.seconds
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let width = self.images.iter().map(|i| i.name().len()).max().unwrap_or(0);
        for i in &self.images {
            out.push_str(self.image_line(i, width).trim_end());
            out.push('\n');
            if let Some(e) = &i.error {
                out.push_str(&format!("          error: {e}\n"));
            }
            for p in &i.platforms {
                out.push_str(&format!("          {}: {}\n", p.platform, platform_state(p)));
            }
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out.push_str(&self.summary_line());
        out.push('\n');
        out
    }

    /// One image's line: state, name (padded to `width`), size, seconds, auth, pinned.
    fn image_line(&self, i: &ImageReport, width: usize) -> String {
        let bytes = i.bytes.map(human_bytes).unwrap_or_default();
        let mut line = format!(
            "  {:<7} {:<width$}  {:>10}  {:>6.1} s",
            i.state.as_str(),
            i.name(),
            bytes,
            i.seconds
        );
        if let Some(a) = i.auth.as_deref().filter(|a| *a != "anonymous") {
            line.push_str(&format!("  auth: {a}"));
        }
        match i.pinned {
            Some(true) => line.push_str("  pinned"),
            Some(false) if self.pin == PinMode::Unpin => line.push_str("  unpinned"),
            _ => {}
        }
        line
    }
}

/// How one bake-mode platform went, in words.
fn platform_state(p: &PlatformReport) -> String {
    match (&p.state, &p.error) {
        (PlatformState::Native, _) => "native (pulled through CRI)".to_string(),
        (PlatformState::Fetched, _) => "content fetched".to_string(),
        (_, Some(e)) => e.clone(),
        (s, None) => format!("{s:?}").to_lowercase(),
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
