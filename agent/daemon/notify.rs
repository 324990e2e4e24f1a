//! sd_notify through the `sd-notify` crate (no libsystemd): `READY=1` after
//! the first reconcile, `RELOADING=1` (with `MONOTONIC_USEC`) / `READY=1`
//! around a reload, `WATCHDOG=1` every half `$WATCHDOG_USEC`, `STOPPING=1`
//! on SIGTERM, `STATUS=...` with a one-line summary. The crate reads
//! `$NOTIFY_SOCKET` (a path or an `@abstract` name) at each call; without it
//! (not under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Debug, Clone, Default)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The watchdog from `WATCHDOG_USEC` and `WATCHDOG_PID` (ours only when
    /// `WATCHDOG_PID` is unset or names this process).
    pub fn from_env() -> Self {
        Notifier {
            watchdog: sd_notify::watchdog_enabled().filter(|w| !w.is_zero()),
        }
    }

    /// Half the watchdog timeout: how often to send `WATCHDOG=1`.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Sends `states` in one datagram. Failures are logged at debug level:
    /// notification is best effort.
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, ?states, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }
    pub fn reloading(&self) {
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the configuration"),
        ];
        // Type=notify-reload (systemd >= 253) wants the clock with RELOADING=1.
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        self.send(&states);
    }
    pub fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// A `STATUS=` value is one line.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(one_line("first reconcile:\n3 ok"), "first reconcile: 3 ok");
    }
}
