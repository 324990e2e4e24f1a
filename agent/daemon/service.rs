//! The running daemon: binds its sockets, reconciles every interval (and
//! reloads on SIGHUP) until SIGTERM or SIGINT, then shuts down within
//! `STOP_BOUND` (see the parent module's docs for the whole lifecycle).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;

use super::config::{self, Config, ConfigError, MetricsAddress, Overrides};
use super::http;
use super::notify::Notifier;
use super::reconcile::{Endpoints, Reconciler};
use super::state::{ConfigProblem, Live, Shared, lock, unix_now};
use super::status;
use super::warm::Warmer;
use crate::rootfs::Root;

/// A reconcile running longer than this stops the watchdog pings (systemd then restarts us).
const HANG_BOUND: Duration = Duration::from_secs(600);

/// Why the daemon cannot start (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot handle signals")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    StatusSocket(#[from] status::SocketError),
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
}

impl crate::exit::ExitKindOf for StartError {
    /// The daemon could not start serving (exit 1).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            StartError::Signals(_) | StartError::StatusSocket(_) | StartError::Metrics(_) => ExitKind::Failed,
        }
    }
}

/// The configured metrics address cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind metrics_address {address}")]
pub struct MetricsBindError {
    address: MetricsAddress,
    #[source]
    error: std::io::Error,
}

/// Why a reload was refused (the running configuration stays).
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
}

/// The metrics listener, when configured.
#[derive(Default)]
struct MetricsServer {
    address: Option<MetricsAddress>,
    task: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `address` (nothing to bind when metrics are off).
    async fn bind(address: Option<&MetricsAddress>) -> Result<Option<http::Bound>, MetricsBindError> {
        match address {
            None => Ok(None),
            Some(a) => http::bind(a).await.map(Some).map_err(|error| MetricsBindError {
                address: a.clone(),
                error,
            }),
        }
    }
    /// Serves `/metrics` on what [`MetricsServer::bind`] bound.
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

/// SIGTERM and SIGINT: either stops the daemon.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Resolves when SIGTERM or SIGINT arrives.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Installs the handlers: SIGHUP (reload), then SIGTERM and SIGINT (stop).
fn signals() -> Result<(Signal, StopSignals), StartError> {
    let handle = |k| signal(k).map_err(StartError::Signals);
    let hup = handle(SignalKind::hangup())?;
    let term = handle(SignalKind::terminate())?;
    let int = handle(SignalKind::interrupt())?;
    Ok((hup, StopSignals { term, int }))
}

/// Since when a reconcile runs (milliseconds after `base`; 0 = none), for the watchdog.
#[derive(Clone)]
struct Busy {
    base: Instant,
    since: Arc<AtomicU64>,
}

impl Busy {
    fn new() -> Self {
        Busy {
            base: Instant::now(),
            since: Arc::new(AtomicU64::new(0)),
        }
    }
    /// A reconcile starts now.
    fn start(&self) {
        self.since
            .store(self.base.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
    }
    /// The reconcile is over.
    fn done(&self) {
        self.since.store(0, Ordering::Relaxed);
    }
    /// A reconcile has run longer than [`HANG_BOUND`].
    fn stuck(&self) -> bool {
        let since = self.since.load(Ordering::Relaxed);
        since != 0 && self.base.elapsed().as_millis() as u64 - since > HANG_BOUND.as_millis() as u64
    }
}

/// Pings the watchdog every half `WATCHDOG_USEC` unless a reconcile hangs (none without a watchdog).
fn spawn_watchdog(notifier: &Notifier, busy: &Busy) -> Option<JoinHandle<()>> {
    notifier.watchdog_period().map(|period| {
        let (n, busy) = (notifier.clone(), busy.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if !busy.stuck() {
                    n.watchdog();
                }
            }
        })
    })
}

/// The one log line at start.
fn log_start(cfg: &Config) {
    tracing::info!(
        config = ?cfg.file,
        interval_seconds = cfg.interval.as_secs_f64(),
        repair = cfg.repair,
        restart_containerd = cfg.restart_containerd,
        images = cfg.prefetch.images.len(),
        state_socket = %cfg.state_socket.display(),
        "soci-agent daemon starting"
    );
}

/// Everything the running daemon holds between reconciles.
struct Daemon {
    root: Root,
    overrides: Overrides,
    cfg: Arc<Config>,
    shared: Shared,
    notifier: Notifier,
    rec: Reconciler,
    metrics: MetricsServer,
    warmer: Warmer,
}

/// Binds the sockets, then reconciles until SIGTERM or SIGINT; `Err` when it cannot start.
pub async fn serve(root: Root, ends: Endpoints, cfg: Arc<Config>, overrides: Overrides) -> Result<(), StartError> {
    let notifier = Notifier::from_env();
    let shared: Shared = Arc::new(Mutex::new(Live::new(cfg.shown(), cfg.max_repairs_per_hour, cfg.repair)));
    let (mut hup, mut stop) = signals()?;
    let listener = status::bind(&cfg.state_socket)?;
    let state_socket = cfg.state_socket.clone();
    let status_task = tokio::spawn(status::serve(listener, shared.clone()));
    let bound = MetricsServer::bind(cfg.metrics_address.as_ref()).await?;
    let metrics = MetricsServer::run(cfg.metrics_address.clone(), bound, &shared);
    log_start(&cfg);
    let busy = Busy::new();
    let watchdog = spawn_watchdog(&notifier, &busy);
    let mut warmer = Warmer::default();
    Warmer::sync(&shared, &cfg);
    warmer.kick(&shared, &cfg);
    let rec = Reconciler::new(root.clone(), ends, cfg.clone(), shared.clone());
    let mut daemon = Daemon {
        root,
        overrides,
        cfg,
        shared,
        notifier,
        rec,
        metrics,
        warmer,
    };
    daemon.reconcile_until_stopped(&mut hup, &mut stop, &busy).await;
    daemon.shut_down(watchdog, status_task, &state_socket).await;
    Ok(())
}

impl Daemon {
    /// The loop: a reconcile now, then one per interval; SIGHUP reloads in between.
    async fn reconcile_until_stopped(&mut self, hup: &mut Signal, stop: &mut StopSignals, busy: &Busy) {
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.interval) => {}
                    _ = hup.recv() => self.reload().await,
                    _ = stop.recv() => break,
                }
                self.warmer.kick(&self.shared, &self.cfg);
            }
            busy.start();
            let stopped = tokio::select! {
                _ = self.rec.run_once() => false,
                _ = stop.recv() => true,
            };
            busy.done();
            if stopped {
                break;
            }
            self.announce(&mut first);
        }
    }

    /// Tells systemd the status line; `READY=1` after the first reconcile.
    fn announce(&self, first: &mut bool) {
        let line = lock(&self.shared).status_line();
        if *first {
            self.notifier.ready(&line);
            tracing::info!(status = line.as_str(), "first reconcile done: ready");
            *first = false;
        } else {
            self.notifier.status(&line);
        }
    }

    /// `STOPPING=1`, in-flight work dropped, listeners closed, the status socket removed.
    async fn shut_down(&mut self, watchdog: Option<JoinHandle<()>>, status_task: JoinHandle<()>, state_socket: &Path) {
        let stopping = Instant::now();
        self.notifier.stopping();
        tracing::info!("stopping");
        self.warmer.abort();
        if let Some(w) = watchdog {
            w.abort();
        }
        self.metrics.stop().await;
        status_task.abort();
        let _ = status_task.await;
        let _ = std::fs::remove_file(state_socket);
        tracing::info!(seconds = stopping.elapsed().as_secs_f64(), "stopped");
    }

    /// SIGHUP: re-reads everything; a configuration that does not load (or whose
    /// new metrics address cannot be bound) is refused and the old one stays.
    async fn reload(&mut self) {
        self.notifier.reloading();
        match self.load_new().await {
            Ok((new, rebound)) => self.apply(new, rebound).await,
            Err(e) => self.refuse(crate::exit::error_chain(&e)),
        }
        let line = lock(&self.shared).status_line();
        self.notifier.ready(&line);
    }

    /// The new configuration and, when its metrics address changed, what was bound for it
    /// (`Some(None)`: metrics are off now).
    async fn load_new(&self) -> Result<(Config, Option<Option<http::Bound>>), ReloadError> {
        let new = config::load(&self.root, &self.overrides)?;
        if new.metrics_address == self.cfg.metrics_address {
            return Ok((new, None));
        }
        let bound = MetricsServer::bind(new.metrics_address.as_ref()).await?;
        Ok((new, Some(bound)))
    }

    /// Switches to `new` (and to its metrics listener, when rebound) and warms new images.
    async fn apply(&mut self, new: Config, rebound: Option<Option<http::Bound>>) {
        let changes = new.changes_from(&self.cfg);
        if new.state_socket != self.cfg.state_socket {
            tracing::warn!("state_socket changed: it takes effect at the next start");
        }
        if let Some(bound) = rebound {
            self.metrics.stop().await;
            self.metrics = MetricsServer::run(new.metrics_address.clone(), bound, &self.shared);
        }
        self.cfg = Arc::new(new);
        self.rec.set_config(self.cfg.clone());
        {
            let mut live = lock(&self.shared);
            live.config = self.cfg.shown();
            live.config_generation += 1;
            live.config_error = None;
        }
        if Warmer::sync(&self.shared, &self.cfg) {
            self.warmer.kick(&self.shared, &self.cfg);
        }
        tracing::info!(changes = ?changes, "configuration reloaded");
    }

    /// Keeps the running configuration; the error is logged and shown in the status.
    fn refuse(&self, error: String) {
        tracing::error!(
            error = error.as_str(),
            "reload refused: the running configuration stays"
        );
        let mut live = lock(&self.shared);
        live.config_error = Some(ConfigProblem { at: unix_now(), error });
        live.config_errors += 1;
    }
}
