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
//!   OpenMetrics text on `[daemon] metrics_address` (`metrics`, built with
//!   prometheus-client; `http`, served by hyper).
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
mod service;
mod state;
mod status;
mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Config, ConfigError, DEFAULT_INTERVAL, MetricsAddress, Overrides};
pub use http::CONTENT_TYPE as METRICS_CONTENT_TYPE;
pub use notify::Notifier;
pub use state::Live;

use reconcile::Endpoints;

/// How long shutdown may take once SIGTERM arrives (the unit's TimeoutStopSec is above it).
pub const STOP_BOUND: Duration = Duration::from_secs(10);

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

/// Runs until SIGTERM or SIGINT; returns the exit code.
pub async fn run(args: &DaemonArgs) -> u8 {
    use crate::exit::ExitKindOf;
    let root = crate::rootfs::Root::new(&args.root);
    let overrides = args.overrides();
    if args.query {
        return query(args, &root, &overrides).await;
    }
    let cfg = match config::load(&root, &overrides) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %crate::exit::error_chain(&e), "invalid configuration: not starting");
            return e.exit_kind().code();
        }
    };
    let ends = Endpoints {
        bus_address: args.bus_address.clone(),
        containerd_socket: args.containerd_socket.clone(),
        soci_socket: args.soci_socket.clone(),
    };
    match service::serve(root, ends, cfg, overrides).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = crate::exit::error_chain(&e).as_str(), "cannot start");
            e.exit_kind().code()
        }
    }
}

/// `--query`: prints the running daemon's state; 0, or 1 when no daemon answers.
async fn query(args: &DaemonArgs, root: &crate::rootfs::Root, overrides: &Overrides) -> u8 {
    let path = match &args.state_socket {
        Some(p) => p.clone(),
        None => config::load(root, overrides).map_or(root.path(crate::paths::DAEMON_STATE_SOCKET), |c| c.state_socket),
    };
    match status::query(&path).await {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("soci-agent daemon --query: {}", crate::exit::error_chain(&e));
            1
        }
    }
}
