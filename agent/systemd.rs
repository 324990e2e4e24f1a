//! A small typed client for systemd's D-Bus API on the system bus (no `systemctl` subprocess).
//!
//! [`Systemd`] holds one bus connection and a per-operation bound. Job operations
//! ([`Systemd::start`], [`Systemd::restart`], [`Systemd::stop`]) follow the rule from
//! systemd's docs: `Subscribe()` once per connection, open the `JobRemoved` stream *before*
//! calling `StartUnit`/`RestartUnit`/`StopUnit`, then wait for the signal naming the job path
//! the call returned. A job that does not end in `done` becomes [`SystemdError::JobFailed`]
//! carrying the unit's state; one that does not end in time becomes [`SystemdError::Timeout`].
//!
//! After a `done` start or restart, a `Type=notify` service has sent `READY=1` and is active.

use crate::paths::SYSTEM_BUS;
use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::proxy::CacheProperties;
use zbus::{ObjectPath, OwnedObjectPath};

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("no system bus at {address}: {source} (is this a booted systemd host? use --no-start to only write files)")]
    NoBus { address: String, source: zbus::Error },
    #[error("systemd {method}({unit}) failed: {source}")]
    Call {
        method: &'static str,
        unit: String,
        source: zbus::Error,
    },
    #[error("{op} {unit}: job failed (result={result}; {state})")]
    JobFailed {
        unit: String,
        op: &'static str,
        /// The `JobRemoved` result: `failed`, `timeout`, `dependency`, `canceled` or `skipped`.
        result: String,
        state: UnitState,
    },
    #[error("{op} {unit}: no job result within {waited:?} ({})", describe(state.as_ref()))]
    Timeout {
        unit: String,
        op: &'static str,
        waited: Duration,
        state: Option<UnitState>,
    },
}

fn describe(state: Option<&UnitState>) -> String {
    state.map_or_else(|| "unit state unknown".to_owned(), UnitState::to_string)
}

/// A snapshot of a unit's properties (`org.freedesktop.systemd1.Unit`, plus
/// `org.freedesktop.systemd1.Service` for services).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UnitState {
    /// The unit's primary name (`Id`), e.g. `containerd.service`.
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// `Service.Result` (`success`, `exit-code`, `timeout`, ...); empty for non-services.
    pub result: String,
    pub unit_file_state: String,
    /// `InvocationID` as 32 hex digits; empty when the unit never ran. Changes on every start.
    pub invocation_id: String,
    pub need_daemon_reload: bool,
    /// `Service.MainPID` (in systemd's pid namespace); 0 when not running or not a service.
    pub main_pid: u32,
    pub n_restarts: u32,
    pub fragment_path: String,
    pub drop_in_paths: Vec<String>,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }
}

/// `ActiveState=failed SubState=failed Result=exit-code` (no `Result=` for non-services).
impl fmt::Display for UnitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActiveState={} SubState={}", self.active_state, self.sub_state)?;
        if !self.result.is_empty() {
            write!(f, " Result={}", self.result)?;
        }
        Ok(())
    }
}

/// One entry of what `EnableUnitFiles`/`DisableUnitFiles` changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnitFileChange {
    /// `symlink` or `unlink`.
    pub kind: String,
    /// The symlink created or removed.
    pub path: String,
    /// Its target (empty for `unlink`).
    pub source: String,
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    fn enable_unit_files(
        &self,
        files: &[&str],
        runtime: bool,
        force: bool,
    ) -> zbus::Result<(bool, Vec<(String, String, String)>)>;
    fn disable_unit_files(&self, files: &[&str], runtime: bool) -> zbus::Result<Vec<(String, String, String)>>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: ObjectPath<'_>, unit: &str, result: &str) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn unit_file_state(&self) -> zbus::Result<String>;
    #[zbus(property, name = "InvocationID")]
    fn invocation_id(&self) -> zbus::Result<Vec<u8>>;
    #[zbus(property)]
    fn need_daemon_reload(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn fragment_path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn drop_in_paths(&self) -> zbus::Result<Vec<String>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn n_restarts(&self) -> zbus::Result<u32>;
}

/// The job operations, named as in errors (`start x.service: ...`).
#[derive(Clone, Copy)]
enum JobOp {
    Start,
    Restart,
    Stop,
}

impl JobOp {
    fn name(self) -> &'static str {
        match self {
            JobOp::Start => "start",
            JobOp::Restart => "restart",
            JobOp::Stop => "stop",
        }
    }
    fn method(self) -> &'static str {
        match self {
            JobOp::Start => "StartUnit",
            JobOp::Restart => "RestartUnit",
            JobOp::Stop => "StopUnit",
        }
    }
}

/// A connection to systemd's manager on a bus, with a bound for every operation.
pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    timeout: Duration,
}

impl Systemd {
    /// Connects to the system bus at [`SYSTEM_BUS`]; the attempt and every later operation are
    /// bounded by `timeout`.
    pub async fn connect(timeout: Duration) -> Result<Self, SystemdError> {
        Self::open(&format!("unix:path={SYSTEM_BUS}"), SYSTEM_BUS, timeout).await
    }

    /// Connects to the bus at a D-Bus address such as `unix:path=/some/dir/system_bus_socket`.
    pub async fn connect_address(address: &str, timeout: Duration) -> Result<Self, SystemdError> {
        Self::open(address, address, timeout).await
    }

    async fn open(address: &str, shown: &str, timeout: Duration) -> Result<Self, SystemdError> {
        let no_bus = |source| SystemdError::NoBus {
            address: shown.to_owned(),
            source,
        };
        let connecting = async {
            let conn = zbus::connection::Builder::address(address)
                .method_timeout(timeout)
                .build()
                .await?;
            let manager = ManagerProxy::new(&conn).await?;
            Ok::<_, zbus::Error>((conn, manager))
        };
        let (conn, manager) = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| no_bus(timed_out(timeout)))?
            .map_err(no_bus)?;
        // systemd sends JobRemoved only while some client is subscribed: be one.
        manager.subscribe().await.map_err(call("Subscribe", ""))?;
        Ok(Systemd { conn, manager, timeout })
    }

    /// `daemon-reload`: re-reads unit files and drop-ins. Returns once the reload is done.
    pub async fn reload(&self) -> Result<(), SystemdError> {
        self.manager.reload().await.map_err(call("Reload", ""))
    }

    /// Enables `units` (persistent, without `--force`): creates their `[Install]` symlinks.
    /// Like `systemctl enable`, follow with [`Systemd::reload`]: until then the manager keeps
    /// the old dependencies and, for loaded units, the old `UnitFileState`.
    pub async fn enable(&self, units: &[&str]) -> Result<Vec<UnitFileChange>, SystemdError> {
        let (_, changes) = self
            .manager
            .enable_unit_files(units, false, false)
            .await
            .map_err(call("EnableUnitFiles", &units.join(" ")))?;
        Ok(changes.into_iter().map(UnitFileChange::from).collect())
    }

    /// Disables `units` (persistent): removes their `[Install]` symlinks. Follow with
    /// [`Systemd::reload`], as for [`Systemd::enable`].
    pub async fn disable(&self, units: &[&str]) -> Result<Vec<UnitFileChange>, SystemdError> {
        let changes = self
            .manager
            .disable_unit_files(units, false)
            .await
            .map_err(call("DisableUnitFiles", &units.join(" ")))?;
        Ok(changes.into_iter().map(UnitFileChange::from).collect())
    }

    /// Starts `unit` (mode `replace`) and waits for its job to finish.
    pub async fn start(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_job(JobOp::Start, unit).await
    }

    /// Restarts `unit` (starts it if it was not running) and waits for its job to finish.
    pub async fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_job(JobOp::Restart, unit).await
    }

    /// Stops `unit` and waits for its job to finish.
    pub async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.run_job(JobOp::Stop, unit).await
    }

    async fn run_job(&self, op: JobOp, unit: &str) -> Result<(), SystemdError> {
        let job = async {
            // Listen first: the job may finish before the call's reply reaches us.
            let mut removed = self
                .manager
                .receive_job_removed()
                .await
                .map_err(call("AddMatch(JobRemoved)", unit))?;
            let path = match op {
                JobOp::Start => self.manager.start_unit(unit, "replace").await,
                JobOp::Restart => self.manager.restart_unit(unit, "replace").await,
                JobOp::Stop => self.manager.stop_unit(unit, "replace").await,
            }
            .map_err(call(op.method(), unit))?;
            while let Some(signal) = removed.next().await {
                let args = signal.args().map_err(call("JobRemoved", unit))?;
                if *args.job() == *path {
                    return Ok(args.result().to_string());
                }
            }
            Err(call("JobRemoved", unit)(zbus::Error::Failure(
                "signal stream ended (connection closed)".into(),
            )))
        };
        let result = match tokio::time::timeout(self.timeout, job).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(SystemdError::Timeout {
                    unit: unit.to_owned(),
                    op: op.name(),
                    waited: self.timeout,
                    state: tokio::time::timeout(self.timeout, self.unit_state(unit))
                        .await
                        .ok()
                        .and_then(Result::ok),
                });
            }
        };
        if result == "done" {
            return Ok(());
        }
        Err(SystemdError::JobFailed {
            unit: unit.to_owned(),
            op: op.name(),
            result,
            state: self.unit_state(unit).await?,
        })
    }

    /// Loads `unit` if needed and reads its state. Units without a file have
    /// `load_state == "not-found"`; that is not an error.
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let path = self.manager.load_unit(unit).await.map_err(call("LoadUnit", unit))?;
        let get = call("Get", unit);
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(&get)?;
        let name = u.id().await.map_err(&get)?;
        let mut state = UnitState {
            load_state: u.load_state().await.map_err(&get)?,
            active_state: u.active_state().await.map_err(&get)?,
            sub_state: u.sub_state().await.map_err(&get)?,
            result: String::new(),
            unit_file_state: u.unit_file_state().await.map_err(&get)?,
            invocation_id: hex(&u.invocation_id().await.map_err(&get)?),
            need_daemon_reload: u.need_daemon_reload().await.map_err(&get)?,
            main_pid: 0,
            n_restarts: 0,
            fragment_path: u.fragment_path().await.map_err(&get)?,
            drop_in_paths: u.drop_in_paths().await.map_err(&get)?,
            name,
        };
        // Only service objects carry the Service interface (not sockets, targets, ...).
        if state.name.ends_with(".service") {
            let s = ServiceProxy::builder(&self.conn)
                .path(path)
                .cache_properties(CacheProperties::No)
                .build()
                .await
                .map_err(&get)?;
            state.result = s.result().await.map_err(&get)?;
            state.main_pid = s.main_pid().await.map_err(&get)?;
            state.n_restarts = s.n_restarts().await.map_err(&get)?;
        }
        Ok(state)
    }
}

impl From<(String, String, String)> for UnitFileChange {
    fn from((kind, path, source): (String, String, String)) -> Self {
        UnitFileChange { kind, path, source }
    }
}

/// Builds the `map_err` closure for a failed call of `method` about `unit`.
fn call(method: &'static str, unit: &str) -> impl Fn(zbus::Error) -> SystemdError {
    let unit = unit.to_owned();
    move |source| SystemdError::Call {
        method,
        unit: unit.clone(),
        source,
    }
}

fn timed_out(after: Duration) -> zbus::Error {
    let io = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {after:?}"));
    zbus::Error::InputOutput(io.into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(active: &str, sub: &str, result: &str) -> UnitState {
        UnitState {
            name: "soci-snapshotter.service".into(),
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            result: result.into(),
            unit_file_state: "enabled".into(),
            ..UnitState::default()
        }
    }

    #[test]
    fn job_failed_names_unit_operation_and_state() {
        let e = SystemdError::JobFailed {
            unit: "soci-snapshotter.service".into(),
            op: "start",
            result: "failed".into(),
            state: state("failed", "failed", "exit-code"),
        };
        assert_eq!(
            e.to_string(),
            "start soci-snapshotter.service: job failed (result=failed; ActiveState=failed SubState=failed Result=exit-code)"
        );
    }

    #[test]
    fn timeout_without_state_says_so() {
        let e = SystemdError::Timeout {
            unit: "x.service".into(),
            op: "stop",
            waited: Duration::from_secs(2),
            state: None,
        };
        assert_eq!(
            e.to_string(),
            "stop x.service: no job result within 2s (unit state unknown)"
        );
    }

    #[test]
    fn non_service_state_has_no_result() {
        let s = state("active", "listening", "");
        assert_eq!(s.to_string(), "ActiveState=active SubState=listening");
    }

    #[test]
    fn invocation_id_is_lower_hex() {
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
        assert_eq!(hex(&[]), "");
    }
}
