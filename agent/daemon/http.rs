//! A deliberately tiny HTTP/1.1 responder for `/metrics` on a TCP address
//! or a unix socket: it reads one request head (at most 8 KiB, within 1 s,
//! so slow clients holding connections open cannot starve scrapes),
//! answers `GET`/`HEAD /metrics` with the exposition text, `/` with a
//! pointer, anything else with 404 or 405, and closes the connection. No
//! keep-alive, no request bodies, a bounded number of clients at once.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use super::config::MetricsAddress;
use super::state::{Shared, lock};

const HEAD_LIMIT: usize = 8 * 1024;
/// The whole request head must arrive within this (a scraper sends it at once).
const HEAD_BOUND: Duration = Duration::from_secs(1);
/// Writing the answer (scrapers read promptly).
const CLIENT_BOUND: Duration = Duration::from_secs(5);
/// Connections served at once; with [`HEAD_BOUND`] a slot frees within a
/// second even when every client dawdles.
const MAX_CLIENTS: usize = 128;
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub enum Bound {
    Tcp(TcpListener),
    /// The listener (its socket file is removed by `cleanup` when the server stops).
    Unix(UnixListener),
}

impl Bound {
    /// Removes a unix socket file left behind.
    pub fn cleanup(path: &std::path::Path) {
        let _ = std::fs::remove_file(path);
    }
}

/// Binds `addr`; a unix socket gets mode 0660 (root and its group may scrape).
pub async fn bind(addr: &MetricsAddress) -> std::io::Result<Bound> {
    match addr {
        MetricsAddress::Tcp(a) => Ok(Bound::Tcp(TcpListener::bind(a).await?)),
        MetricsAddress::Unix(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if std::fs::symlink_metadata(p).is_ok() {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("something already answers on {}", p.display()),
                    ));
                }
                std::fs::remove_file(p)?;
            }
            let l = UnixListener::bind(p)?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))?;
            Ok(Bound::Unix(l))
        }
    }
}

/// Serves until the task is aborted.
pub async fn serve(bound: Bound, shared: Shared) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        let accepted = match &bound {
            Bound::Tcp(l) => l.accept().await.map(|(s, _)| {
                tokio::spawn(async move {
                    let _permit = permit;
                    answer(s, &shared).await;
                })
            }),
            Bound::Unix(l) => l.accept().await.map(|(s, _)| {
                tokio::spawn(async move {
                    let _permit = permit;
                    answer(s, &shared).await;
                })
            }),
        };
        if let Err(e) = accepted {
            tracing::warn!(error = %e, "metrics: accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The response to one request head (status line, content type, body).
pub fn respond(head: &[u8], render: impl FnOnce() -> String) -> (&'static str, &'static str, String, bool) {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let Some((method, target)) = method
        .zip(target)
        .filter(|_| version.is_some_and(|v| v.starts_with("HTTP/1.")))
    else {
        return ("400 Bad Request", "text/plain", "bad request\n".into(), false);
    };
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".into(),
            false,
        );
    }
    match path {
        "/metrics" => ("200 OK", CONTENT_TYPE, render(), head_only),
        "/" => (
            "200 OK",
            "text/plain",
            "soci-agent daemon: see /metrics\n".into(),
            head_only,
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
            head_only,
        ),
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: &Shared) {
    let read_head = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > HEAD_LIMIT {
                break;
            }
        }
        Ok::<_, std::io::Error>(head)
    };
    let Ok(Ok(head)) = tokio::time::timeout(HEAD_BOUND, read_head).await else {
        return; // too slow or broken: drop it, free the slot
    };
    let work = async {
        let (status, ctype, body, head_only) = respond(&head, || super::metrics::render(&lock(shared)));
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if status.starts_with("405") {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&body);
        }
        s.write_all(out.as_bytes()).await?;
        s.shutdown().await
    };
    let _ = tokio::time::timeout(CLIENT_BOUND, work).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |head: &str| {
            let (status, _, body, head_only) = respond(head.as_bytes(), || "m 1\n".into());
            (status, body, head_only)
        };
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("200 OK", "m 1\n".into(), false)
        );
        assert_eq!(r("GET /metrics?x=1 HTTP/1.0\r\n\r\n").0, "200 OK");
        assert!(r("HEAD /metrics HTTP/1.1\r\n\r\n").2);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n").0, "405 Method Not Allowed");
        assert_eq!(r("GET /other HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(r("garbage\r\n\r\n").0, "400 Bad Request");
        assert_eq!(r("").0, "400 Bad Request");
    }
}
