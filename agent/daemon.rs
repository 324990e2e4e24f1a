//! `soci-agent daemon`: keeps the node's image-pull setup healthy and warm
//! after boot. Runs as `soci-agent.service` (`Type=notify`, unit in
//! `systemd/soci-agent.service`):
//!
//! - **Reconcile** every `[daemon] interval` (default 5 min) and on SIGHUP
//!   (`reconcile`): doctor's checks (sockets, containerd reaching soci,
//!   systemd over D-Bus, config files), plus `agent.drift`: the files the
//!   install record lists compared with what `plan::build` would write now
//!   (`drift`). Each verdict change is logged once. With `repair = true`, a
//!   drifted file is put back atomically and a snapshotter that is down is
//!   started over D-Bus, within `max_repairs_per_hour` and an exponential
//!   backoff per target (`repair`, `units`); containerd is never restarted
//!   (directly, or through a restart of the snapshotter it `Requires=`)
//!   without `restart_containerd = true`.
//! - **Warm images** (`warm`): the `[prefetch]` images are kept present (and
//!   pinned with `pin = true`) through `crate::prefetch::prefetch`, off the
//!   reconcile path; with `refresh`, tags are re-resolved (`resolve`) and a
//!   moved tag's new digest is pulled and pinned, the old one unpinned.
//! - **Tell**: `READY=1` after the first reconcile, `WATCHDOG=1` at half of
//!   `WATCHDOG_USEC`, `RELOADING=1` on SIGHUP, `STOPPING=1` on SIGTERM
//!   (`notify`); the status socket (`status`, default
//!   `/run/soci-agent/daemon.sock`, mode 0600) answers the live state as one
//!   JSON object (`soci-agent daemon --query` prints it); `/metrics` in
//!   Prometheus text on `[daemon] metrics_address` (`metrics`, `http`).
//! - **Reload** (SIGHUP, `systemctl reload soci-agent`): the config file is
//!   read again; if anything in it is invalid, the running configuration
//!   stays and the error is logged and shown in the status
//!   (`config_error`). New images are warmed at once.
//! - **Stop** (SIGTERM/SIGINT): `STOPPING=1`, in-flight work dropped, sockets
//!   removed, exit 0 within [`STOP_BOUND`].
//!
//! The daemon never makes `install`, `uninstall` or `boot` wait: it only
//! tries the install lock ([`INSTALL_LOCK`], shared, non-blocking) around its
//! file writes and skips repairs while install or uninstall hold it; and it
//! repairs only drift it saw happen (a file already different at start, or
//! right after an install run, is reported, not "put back": install may have
//! used other settings). Its state is bounded (one entry per check, owned
//! file, configured image and report; the last 20 repairs).

mod config;
mod drift;
mod figures;
mod http;
mod metrics;
mod notify;
mod reconcile;
mod repair;
mod resolve;
mod state;
mod status;
mod warm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};

pub use config::{Config, ConfigError, DEFAULT_INTERVAL, MetricsAddress, Overrides};
pub use http::CONTENT_TYPE as METRICS_CONTENT_TYPE;
pub use notify::Notifier;
pub use state::Live;

use reconcile::{Endpoints, Reconciler};
use state::{ConfigProblem, Shared, lock, unix_now};
use warm::Warmer;

/// How long shutdown may take once SIGTERM arrives (the unit's TimeoutStopSec is above it).
pub const STOP_BOUND: Duration = Duration::from_secs(10);
/// A reconcile running longer than this stops the watchdog pings (systemd then restarts us).
const HANG_BOUND: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Config: the [daemon] table of the agent config file: interval (\"5m\"), repair (false), \
max_repairs_per_hour (6), repair_backoff (\"30s\"), restart_containerd (false), refresh (off, e.g. \"6h\"), \
metrics_address (off, e.g. \"127.0.0.1:9400\" or a unix socket path), state_socket; the [prefetch] images \
are kept warm; [install] says what install writes.\n\
Signals: SIGHUP re-reads the config (a bad one is refused, the old one keeps running); SIGTERM stops.\n\
Exit codes: 0 stopped by a signal; 1 cannot start (socket in use, no signals); 2 invalid config at start."
)]
pub struct DaemonArgs {
    /// Agent config file ([daemon], [prefetch], [install] tables).
    /// [default: /etc/soci-agent/config.toml under --root, when present]
    #[arg(long, value_name = "FILE", env = "SOCI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory every node path is resolved under (tests, an image root).
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Reconcile period in seconds, over [daemon] interval (tests, benchmarks: 0.01 works).
    #[arg(long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// The status socket, a path as seen from here. [default: [daemon] state_socket, else
    /// /run/soci-agent/daemon.sock under --root]
    #[arg(long, value_name = "PATH")]
    pub state_socket: Option<PathBuf>,
    /// D-Bus address of systemd, e.g. unix:path=/run/dbus/system_bus_socket.
    /// [default: the system bus when --root is /; none otherwise]
    #[arg(long, value_name = "ADDRESS")]
    pub bus_address: Option<String>,
    /// containerd's socket as seen from here (checks, and the prefetch CRI endpoint).
    /// [default: /run/containerd/containerd.sock under --root; [prefetch] cri_endpoint for pulls]
    #[arg(long, value_name = "PATH")]
    pub containerd_socket: Option<PathBuf>,
    /// The SOCI socket as seen from here. [default: the socket the unit listens on, under --root]
    #[arg(long, value_name = "PATH")]
    pub soci_socket: Option<PathBuf>,
    /// Print the running daemon's state (one JSON object from the status socket) and exit
    /// (0, or 1 when no daemon answers).
    #[arg(long)]
    pub query: bool,
}

impl DaemonArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            interval: self.interval,
            state_socket: self.state_socket.clone(),
            containerd_socket: self.containerd_socket.clone(),
        }
    }
}

/// The metrics listener, when configured.
#[derive(Default)]
struct MetricsServer {
    address: Option<MetricsAddress>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MetricsServer {
    async fn bind(address: Option<&MetricsAddress>) -> Result<Option<http::Bound>, String> {
        match address {
            None => Ok(None),
            Some(a) => http::bind(a)
                .await
                .map(Some)
                .map_err(|e| format!("metrics_address {a}: {e}")),
        }
    }
    fn run(address: Option<MetricsAddress>, bound: Option<http::Bound>, shared: &Shared) -> Self {
        let task = bound.map(|b| tokio::spawn(http::serve(b, shared.clone())));
        if let Some(a) = &address {
            tracing::info!(address = %a, "serving /metrics");
        }
        MetricsServer { address, task }
    }
    /// Stops serving; returns once the listener is closed (the aborted task
    /// has been dropped), so a reload never reports a listener still open.
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        if let Some(MetricsAddress::Unix(p)) = self.address.take() {
            http::Bound::cleanup(&p);
        }
    }
}

/// Runs until SIGTERM or SIGINT; returns the exit code.
pub async fn run(args: &DaemonArgs) -> u8 {
    let root = crate::rootfs::Root::new(&args.root);
    let overrides = args.overrides();
    if args.query {
        let path = match &args.state_socket {
            Some(p) => p.clone(),
            None => {
                config::load(&root, &overrides).map_or(root.path(crate::paths::DAEMON_STATE_SOCKET), |c| c.state_socket)
            }
        };
        return match status::query(&path).await {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(e) => {
                eprintln!("soci-agent daemon --query: {e}");
                1
            }
        };
    }
    let cfg = match config::load(&root, &overrides) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %crate::exit::error_chain(&e), "invalid configuration: not starting");
            return 2;
        }
    };
    let ends = Endpoints {
        bus_address: args.bus_address.clone(),
        containerd_socket: args.containerd_socket.clone(),
        soci_socket: args.soci_socket.clone(),
    };
    match serve(root, ends, cfg, overrides).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = e.as_str(), "cannot start");
            1
        }
    }
}

async fn serve(
    root: crate::rootfs::Root,
    ends: Endpoints,
    mut cfg: Arc<Config>,
    overrides: Overrides,
) -> Result<(), String> {
    let notifier = Notifier::from_env();
    let shared: Shared = Arc::new(Mutex::new(Live::new(cfg.shown(), cfg.max_repairs_per_hour, cfg.repair)));
    let signals = |k| signal(k).map_err(|e| format!("cannot handle signals: {e}"));
    let (mut hup, mut term, mut int) = (
        signals(SignalKind::hangup())?,
        signals(SignalKind::terminate())?,
        signals(SignalKind::interrupt())?,
    );
    let listener = status::bind(&cfg.state_socket).map_err(|e| crate::exit::error_chain(&e))?;
    let state_socket = cfg.state_socket.clone();
    let status_task = tokio::spawn(status::serve(listener, shared.clone()));
    let bound = MetricsServer::bind(cfg.metrics_address.as_ref()).await?;
    let mut metrics = MetricsServer::run(cfg.metrics_address.clone(), bound, &shared);
    tracing::info!(
        config = ?cfg.file,
        interval_seconds = cfg.interval.as_secs_f64(),
        repair = cfg.repair,
        restart_containerd = cfg.restart_containerd,
        images = cfg.prefetch.images.len(),
        state_socket = %state_socket.display(),
        "soci-agent daemon starting"
    );
    let base = Instant::now();
    let busy_since = Arc::new(AtomicU64::new(0));
    let watchdog = notifier.watchdog_period().map(|period| {
        let (n, busy) = (notifier.clone(), busy_since.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let since = busy.load(Ordering::Relaxed);
                let stuck = since != 0 && base.elapsed().as_millis() as u64 - since > HANG_BOUND.as_millis() as u64;
                if !stuck {
                    n.watchdog();
                }
            }
        })
    });
    let mut warmer = Warmer::default();
    Warmer::sync(&shared, &cfg);
    warmer.kick(&shared, &cfg);
    let mut rec = Reconciler::new(root.clone(), ends, cfg.clone(), shared.clone());
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = hup.recv() => reload(&root, &overrides, &mut cfg, &mut rec, &mut metrics, &mut warmer, &shared, &notifier).await,
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            warmer.kick(&shared, &cfg);
        }
        busy_since.store(base.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
        let stopped = tokio::select! {
            _ = rec.run_once() => false,
            _ = term.recv() => true,
            _ = int.recv() => true,
        };
        busy_since.store(0, Ordering::Relaxed);
        if stopped {
            break;
        }
        let line = lock(&shared).status_line();
        if first {
            notifier.ready(&line);
            tracing::info!(status = line.as_str(), "first reconcile done: ready");
            first = false;
        } else {
            notifier.status(&line);
        }
    }
    let stopping = Instant::now();
    notifier.stopping();
    tracing::info!("stopping");
    warmer.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    metrics.stop().await;
    status_task.abort();
    let _ = status_task.await;
    let _ = std::fs::remove_file(&state_socket);
    tracing::info!(seconds = stopping.elapsed().as_secs_f64(), "stopped");
    Ok(())
}

/// SIGHUP: re-reads everything; a configuration that does not load (or whose
/// new metrics address cannot be bound) is refused and the old one stays.
#[allow(clippy::too_many_arguments)]
async fn reload(
    root: &crate::rootfs::Root,
    overrides: &Overrides,
    cfg: &mut Arc<Config>,
    rec: &mut Reconciler,
    metrics: &mut MetricsServer,
    warmer: &mut Warmer,
    shared: &Shared,
    notifier: &Notifier,
) {
    notifier.reloading();
    let loaded = match config::load(root, overrides) {
        Ok(new) if new.metrics_address != cfg.metrics_address => {
            match MetricsServer::bind(new.metrics_address.as_ref()).await {
                Ok(bound) => Ok((new, Some(bound))),
                Err(e) => Err(e),
            }
        }
        Ok(new) => Ok((new, None)),
        Err(e) => Err(crate::exit::error_chain(&e)),
    };
    match loaded {
        Ok((new, rebound)) => {
            let changes = new.changes_from(cfg);
            if new.state_socket != cfg.state_socket {
                tracing::warn!("state_socket changed: it takes effect at the next start");
            }
            if let Some(bound) = rebound {
                metrics.stop().await;
                *metrics = MetricsServer::run(new.metrics_address.clone(), bound, shared);
            }
            *cfg = Arc::new(new);
            rec.set_config(cfg.clone());
            {
                let mut live = lock(shared);
                live.config = cfg.shown();
                live.config_generation += 1;
                live.config_error = None;
            }
            if Warmer::sync(shared, cfg) {
                warmer.kick(shared, cfg);
            }
            tracing::info!(changes = ?changes, "configuration reloaded");
        }
        Err(error) => {
            tracing::error!(
                error = error.as_str(),
                "reload refused: the running configuration stays"
            );
            let mut live = lock(shared);
            live.config_error = Some(ConfigProblem { at: unix_now(), error });
            live.config_errors += 1;
        }
    }
    let line = lock(shared).status_line();
    notifier.ready(&line);
}
