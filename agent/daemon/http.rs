//! The `/metrics` endpoint on a TCP address or a unix socket, served by
//! hyper's HTTP/1.1 server: `GET`/`HEAD /metrics` answers the exposition
//! text, `/` a pointer, anything else 404 or 405. The request head must
//! arrive within 1 s (so slow clients holding connections open cannot starve
//! scrapes), a connection lives at most 5 s and is closed after one answer
//! (no keep-alive), and a bounded number of clients are served at once.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::OwnedSemaphorePermit;

use super::config::MetricsAddress;
use super::state::{Shared, lock};

/// The whole request head must arrive within this (a scraper sends it at once).
const HEAD_BOUND: Duration = Duration::from_secs(1);
/// The whole exchange, head to last byte of the answer (scrapers read promptly).
const CLIENT_BOUND: Duration = Duration::from_secs(5);
/// Connections served at once; with [`HEAD_BOUND`] a slot frees within a
/// second even when every client dawdles.
const MAX_CLIENTS: usize = 128;
pub use super::metrics::CONTENT_TYPE;

/// A bound metrics listener.
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
            Bound::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| tokio::spawn(connection(s, shared, permit))),
            Bound::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| tokio::spawn(connection(s, shared, permit))),
        };
        if let Err(e) = accepted {
            tracing::warn!(error = %e, "metrics: accept failed");
            // Out of file descriptors and the like: give the node a moment, not a busy loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One connection: one request, one answer, closed; its slot is freed on return.
async fn connection<S>(stream: S, shared: Shared, _slot: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            let render = || super::metrics::render(&lock(&shared));
            Ok::<_, Infallible>(respond(req.method(), req.uri().path(), render))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_BOUND)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CLIENT_BOUND, conn).await {
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics: connection ended"),
        Err(_) => tracing::debug!("metrics: connection took longer than {CLIENT_BOUND:?}"),
        Ok(Ok(())) => {}
    }
}

/// The answer to `method path` (`render` is called only for `/metrics`).
/// hyper leaves out the body of an answer to `HEAD`.
pub fn respond(method: &Method, path: &str, render: impl FnOnce() -> String) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(ctype));
        r
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".into(),
        );
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, render()),
        "/" => reply(StatusCode::OK, "text/plain", "soci-agent daemon: see /metrics\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn routes() {
        async fn r(method: Method, path: &str) -> (StatusCode, String, String) {
            let resp = respond(&method, path, || "m 1\n".into());
            let status = resp.status();
            let ctype = resp.headers()[CONTENT_TYPE_HEADER].to_str().unwrap().to_string();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, ctype, String::from_utf8(body.to_vec()).unwrap())
        }
        assert_eq!(
            r(Method::GET, "/metrics").await,
            (StatusCode::OK, CONTENT_TYPE.to_string(), "m 1\n".into())
        );
        assert_eq!(r(Method::HEAD, "/metrics").await.0, StatusCode::OK);
        assert_eq!(r(Method::GET, "/").await.0, StatusCode::OK);
        let post = respond(&Method::POST, "/metrics", || unreachable!("not rendered"));
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[ALLOW], "GET, HEAD");
        assert_eq!(r(Method::GET, "/other").await.0, StatusCode::NOT_FOUND);
    }
}
