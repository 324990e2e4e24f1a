//! TEST ONLY. A stand-in for SOCI's `soci-snapshotter-grpc`, used by soci-agent's end-to-end tests
//! because the real binary cannot be downloaded here. It is never shipped.
//!
//! It looks like the real daemon to systemd and containerd, and nothing more: the same flags
//! (Go `flag` style), the same config-file check at start, socket activation (`--address fd://`),
//! sd_notify `READY=1` / `STOPPING=1`, and containerd's snapshots gRPC API served by a plain
//! copy-based snapshotter (see `store.rs`). No lazy loading, no parallel pull: it only logs the
//! line the real daemon logs when the config enables parallel mode.
//!
//! A config file containing the line `# standin: fail-at-start` makes it exit 1 at once, so tests
//! can simulate a broken snapshotter.

mod store;

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic;
use containerd_snapshots::{Info, Snapshotter, Usage};

use store::{Error, Store};

const DEFAULT_ADDRESS: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
const DEFAULT_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
const DEFAULT_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
const VERSION: &str = match option_env!("SOCI_STANDIN_VERSION") {
    Some(v) => v,
    None => "0.15.0",
};
/// Marker line that makes the stand-in refuse to start.
const FAIL_MARKER: &str = "# standin: fail-at-start";
/// First fd passed by systemd socket activation (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: i32 = 3;

// ---------------------------------------------------------------------------------------------
// Logging: logrus-like `level=info msg="..."` lines on stderr (journald adds the timestamps).

static LOG_LEVEL: AtomicU8 = AtomicU8::new(2);
const LEVELS: [&str; 5] = ["trace", "debug", "info", "warning", "error"];

fn log(level: u8, msg: &str) {
    if level >= LOG_LEVEL.load(Ordering::Relaxed) {
        eprintln!("level={} msg={msg:?}", LEVELS[usize::from(level)]);
    }
}
macro_rules! debug { ($($t:tt)*) => { $crate::log(1, &format!($($t)*)) } }
macro_rules! info { ($($t:tt)*) => { $crate::log(2, &format!($($t)*)) } }
macro_rules! warn { ($($t:tt)*) => { $crate::log(3, &format!($($t)*)) } }
macro_rules! error { ($($t:tt)*) => { $crate::log(4, &format!($($t)*)) } }
pub(crate) use debug;

fn parse_level(s: &str) -> Option<u8> {
    Some(match s.to_ascii_lowercase().as_str() {
        "trace" => 0,
        "debug" => 1,
        "info" => 2,
        "warn" | "warning" => 3,
        "error" | "fatal" | "panic" => 4,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Command line, parsed like Go's `flag` package: `-f v`, `-f=v`, `--f v`, `--f=v`; parsing stops
// at `--` or the first non-flag argument. Errors exit 2, `-h`/`-help` exits 0.

#[derive(Debug)]
struct Cli {
    address: String,
    config: PathBuf,
    root: PathBuf,
    log_level: String,
    version: bool,
}

enum CliError {
    Help,
    Usage(String),
}

const USAGE: &str = "Usage of soci-snapshotter-grpc (TEST-ONLY stand-in):
  -address string
    \taddress for the snapshotter's GRPC server; fd:// for systemd socket activation (default \"/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock\")
  -config string
    \tpath to the configuration file (default \"/etc/soci-snapshotter-grpc/config.toml\")
  -log-level string
    \tset the logging level [trace, debug, info, warn, error, fatal, panic] (default \"info\")
  -root string
    \tpath to the root directory for this snapshotter (default \"/var/lib/soci-snapshotter-grpc\")
  -version
    \tshow the soci-snapshotter-grpc version and exit";

fn parse_cli(args: &[String]) -> Result<Cli, CliError> {
    let mut cli = Cli {
        address: DEFAULT_ADDRESS.into(),
        config: DEFAULT_CONFIG.into(),
        root: DEFAULT_ROOT.into(),
        log_level: "info".into(),
        version: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            break;
        }
        let Some(flag) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|f| !f.is_empty())
        else {
            // Go's flag package stops at the first non-flag; the daemon takes no arguments.
            return Err(CliError::Usage(format!("unexpected argument: {arg}")));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let mut value = |name: &str| match inline.clone().or_else(|| it.next().cloned()) {
            Some(v) => Ok(v),
            None => Err(CliError::Usage(format!("flag needs an argument: -{name}"))),
        };
        match name {
            "address" => cli.address = value(name)?,
            "config" => cli.config = value(name)?.into(),
            "root" => cli.root = value(name)?.into(),
            "log-level" => cli.log_level = value(name)?,
            "version" => {
                cli.version = match inline.as_deref() {
                    None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => true,
                    Some("false" | "0" | "f" | "F" | "FALSE" | "False") => false,
                    Some(v) => {
                        return Err(CliError::Usage(format!("invalid boolean value {v:?} for -version")));
                    }
                }
            }
            "h" | "help" => return Err(CliError::Help),
            _ => return Err(CliError::Usage(format!("flag provided but not defined: -{name}"))),
        }
    }
    Ok(cli)
}

// ---------------------------------------------------------------------------------------------
// Config file: must exist (like v0.11.0), must parse as TOML; nothing else is interpreted.

fn check_config(path: &Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("failed to load config file {}: {e}", path.display()))?;
    if text.lines().any(|l| l.trim() == FAIL_MARKER) {
        return Err(format!(
            "config {} asks the stand-in to fail at start ({FAIL_MARKER})",
            path.display()
        ));
    }
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("failed to parse config file {}: {e}", path.display()))?;
    let parallel = table
        .get("pull_modes")
        .and_then(|t| t.get("parallel_pull_unpack"))
        .and_then(|t| t.get("enable"))
        .and_then(toml::Value::as_bool)
        .unwrap_or(false);
    if parallel {
        info!("Parallel image pull enabled");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Listener: a unix socket path, or fd 3 from systemd socket activation.

/// Returns the activated listener when systemd passed one to this process (and unsets the
/// `LISTEN_*` variables so children do not see them), like go-systemd's `activation.Listeners`.
fn activated_listener() -> Option<std::os::unix::net::UnixListener> {
    let pid = std::env::var("LISTEN_PID").ok().and_then(|v| v.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS").ok().and_then(|v| v.parse::<u32>().ok());
    // SAFETY: called before the runtime or any other thread starts.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if pid != Some(std::process::id()) || fds.unwrap_or(0) < 1 {
        return None;
    }
    // SAFETY: systemd hands fds starting at 3 to this process, which owns them from now on.
    let fd = unsafe { OwnedFd::from_raw_fd(SD_LISTEN_FDS_START) };
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    if let Err(e) = fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        warn!("cannot set FD_CLOEXEC on activated socket: {e}");
    }
    Some(fd.into())
}

/// The listener plus the socket path to unlink at exit (none for an activated socket).
fn listen(address: &str) -> Result<(std::os::unix::net::UnixListener, Option<PathBuf>), String> {
    let path = if address == "fd://" {
        if let Some(l) = activated_listener() {
            info!("listening on socket passed by systemd (fd {SD_LISTEN_FDS_START})");
            return Ok((l, None));
        }
        warn!("no socket passed by systemd; falling back to {DEFAULT_ADDRESS}");
        DEFAULT_ADDRESS
    } else {
        address.strip_prefix("unix://").unwrap_or(address)
    };
    let path = PathBuf::from(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("failed to create directory {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("failed to remove stale socket {}: {e}", path.display()));
        }
        _ => {}
    }
    let l = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| format!("failed to listen on {}: {e}", path.display()))?;
    info!("listening on {}", path.display());
    Ok((l, Some(path)))
}

// ---------------------------------------------------------------------------------------------
// sd_notify: one datagram to $NOTIFY_SOCKET (a path, or an abstract name written `@name`).

fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    match sent {
        Ok(_) => debug!("sd_notify {state:?} sent"),
        Err(e) => warn!("sd_notify {state:?} to {target:?} failed: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The snapshots service: the synchronous store behind a mutex, run on the blocking pool.

struct Standin {
    store: Arc<Mutex<Store>>,
}

impl Standin {
    async fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, Error> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&mut store.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| Error::Internal(format!("snapshot task failed: {e}")))?
    }
}

#[tonic::async_trait]
impl Snapshotter for Standin {
    type Error = Error;
    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, Error>>>;

    async fn stat(&self, key: String) -> Result<Info, Error> {
        debug!("stat {key}");
        self.run(move |s| s.stat(&key)).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Error> {
        debug!("update {} {fieldpaths:?}", info.name);
        self.run(move |s| s.update(info, fieldpaths.unwrap_or_default())).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Error> {
        debug!("usage {key}");
        self.run(move |s| s.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        debug!("mounts {key}");
        self.run(move |s| s.mounts(&key)).await
    }

    async fn prepare(&self, key: String, parent: String, labels: HashMap<String, String>) -> Result<Vec<Mount>, Error> {
        debug!("prepare {key} parent={parent:?}");
        self.run(move |s| s.create(store::Kind::Active, key, parent, labels))
            .await
    }

    async fn view(&self, key: String, parent: String, labels: HashMap<String, String>) -> Result<Vec<Mount>, Error> {
        debug!("view {key} parent={parent:?}");
        self.run(move |s| s.create(store::Kind::View, key, parent, labels))
            .await
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), Error> {
        debug!("commit {key} -> {name}");
        self.run(move |s| s.commit(name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        debug!("remove {key}");
        self.run(move |s| s.remove(&key)).await
    }

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream, Error> {
        // Filters are not interpreted: containerd's metadata layer lists from its own database and
        // only walks the backend unfiltered (garbage collection).
        debug!("list (filters ignored: {filters:?})");
        let infos = self.run(|s| Ok(s.list())).await?;
        Ok(tokio_stream::iter(infos.into_iter().map(Ok).collect::<Vec<_>>()))
    }
}

async fn serve(listener: std::os::unix::net::UnixListener, store: Arc<Mutex<Store>>) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| format!("listener: {e}"))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| format!("listener: {e}"))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let service = containerd_snapshots::server(Arc::new(Standin { store }));
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(incoming);
    // The socket is bound and listening already: connections queue until the server polls it.
    sd_notify("READY=1");
    info!("soci-snapshotter-grpc (stand-in) v{VERSION} successfully started");
    tokio::select! {
        r = server => r.map_err(|e| format!("gRPC server failed: {e}")),
        _ = term.recv() => { info!("received SIGTERM"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { info!("received SIGINT"); Ok(()) }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match parse_cli(&args) {
        Ok(cli) => cli,
        Err(CliError::Help) => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(CliError::Usage(msg)) => {
            eprintln!("{msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if cli.version {
        println!("soci-snapshotter-grpc version v{VERSION} standin");
        return ExitCode::SUCCESS;
    }
    match parse_level(&cli.log_level) {
        Some(l) => LOG_LEVEL.store(l, Ordering::Relaxed),
        None => {
            error!("invalid log level {:?}", cli.log_level);
            return ExitCode::FAILURE;
        }
    }
    info!("starting soci-snapshotter-grpc TEST-ONLY stand-in v{VERSION}");
    if let Err(e) = check_config(&cli.config) {
        error!("{e}");
        return ExitCode::FAILURE;
    }
    let store = match Store::open(&cli.root) {
        Ok(s) => Arc::new(Mutex::new(s)),
        Err(e) => {
            error!("failed to open snapshot store under {}: {e}", cli.root.display());
            return ExitCode::FAILURE;
        }
    };
    let (listener, socket_path) = match listen(&cli.address) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(listener, store.clone()));
    sd_notify("STOPPING=1");
    // Wait for an operation in flight (a copy, a metadata write) to finish, and keep the lock so
    // none starts, then leave without waiting for the runtime.
    let _quiesced = store.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(()) => {
            info!("exiting");
            std::process::exit(0)
        }
        Err(e) => {
            error!("{e}");
            std::process::exit(1)
        }
    }
}
