//! sd_notify without libsystemd: one datagram per message to `$NOTIFY_SOCKET`
//! (a path, or an abstract name written `@name`), from an unbound unix
//! datagram socket. `READY=1` after the first reconcile, `RELOADING=1` /
//! `READY=1` around a reload, `WATCHDOG=1` every half `$WATCHDOG_USEC`,
//! `STOPPING=1` on SIGTERM, `STATUS=...` with a one-line summary. Without
//! `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog is
    /// ours only when `WATCHDOG_PID` is unset or names this process).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::from_values(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    fn from_values(socket: Option<&str>, usec: Option<&str>, wd_pid: Option<&str>, pid: u32) -> Self {
        let target = socket.map(|s| match s.strip_prefix('@') {
            Some(name) => Target::Abstract(name.as_bytes().to_vec()),
            None => Target::Path(PathBuf::from(s)),
        });
        let ours = wd_pid.is_none_or(|p| p.trim().parse() == Ok(pid));
        let watchdog = usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Half the watchdog timeout: how often to send `WATCHDOG=1`.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments). Failures are
    /// logged at debug level: notification is best effort.
    pub fn send(&self, state: &str) {
        let Some(target) = &self.target else { return };
        if let Err(e) = send_to(target, state.as_bytes()) {
            tracing::debug!(error = %e, state, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }
    pub fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=reloading the configuration");
    }
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn send_to(target: &Target, msg: &[u8]) -> std::io::Result<usize> {
    let sock = UnixDatagram::unbound()?;
    match target {
        Target::Path(p) => sock.send_to(msg, p),
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_environment() {
        let n = Notifier::from_values(Some("@sd/notify"), Some("2000000"), None, 7);
        assert_eq!(n.target, Some(Target::Abstract(b"sd/notify".to_vec())));
        assert_eq!(n.watchdog_period(), Some(Duration::from_secs(1)));
        let n = Notifier::from_values(Some("/run/n.sock"), Some("2000000"), Some("8"), 7);
        assert_eq!(n.target, Some(Target::Path("/run/n.sock".into())));
        assert_eq!(n.watchdog_period(), None, "the watchdog belongs to pid 8");
        assert_eq!(Notifier::from_values(None, Some("x"), None, 1).watchdog_period(), None);
    }

    #[test]
    fn sends_datagrams_to_a_path_and_an_abstract_name() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_values(path.to_str(), None, None, 1);
        n.ready("first reconcile:\n3 ok");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=first reconcile: 3 ok");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("soci-agent-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::from_values(Some(&format!("@{name}")), None, None, 1).stopping();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=stopping");
    }
}
