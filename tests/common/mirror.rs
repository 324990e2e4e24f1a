//! A loopback HTTP/1.1 release mirror with scripted faults.
//!
//! Serves a map `path -> body` on `127.0.0.1:<random port>` from a background
//! thread (one thread per connection, `Connection: close` on every response).
//! Each path has a queue of [`Fault`]s: each request takes the next one, and
//! once the queue is empty the path is served normally. Every request is
//! counted per path (before it is answered), so tests can assert how many
//! attempts a client made. The server stops when the [`Mirror`] is dropped.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// What to do instead of (or before) answering one request normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a short text body.
    Status(u16),
    /// Answer 404 even though the path has a body.
    NotFound,
    /// Announce the full `Content-Length`, send only the first `n` bytes, close.
    Truncate(usize),
    /// Send half the body with chunked encoding, then close without the last
    /// chunk (no `Content-Length`, so the client cannot know the size).
    DropMidBody,
    /// Sleep this long before sending anything, then answer normally (the
    /// client has usually given up by then).
    SlowFirstByte(Duration),
    /// Send the headers and half the body, sleep this long, send the rest.
    StallMidBody(Duration),
    /// Send the headers, then one byte of the body every this long (never trips a
    /// per-chunk timeout longer than the interval).
    Drip(Duration),
    /// Answer 302 with this `Location`.
    Redirect(String),
}

#[derive(Default)]
struct State {
    bodies: HashMap<String, Arc<Vec<u8>>>,
    faults: HashMap<String, VecDeque<Fault>>,
    requests: HashMap<String, usize>,
    /// Per `"METHOD path"`.
    by_method: HashMap<String, usize>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

pub struct Mirror {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Mirror {
    /// Binds `127.0.0.1:0` and starts serving (nothing yet: every path is 404).
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback mirror");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let shared = Arc::clone(&shared);
                        thread::spawn(move || handle(conn, &shared));
                    }
                }
            })
        };
        Mirror {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// Serves `body` at `path` (replacing any previous body).
    pub fn put(&self, path: &str, body: impl Into<Vec<u8>>) {
        assert!(path.starts_with('/'), "mirror paths start with '/': {path}");
        self.lock().bodies.insert(path.to_string(), Arc::new(body.into()));
    }

    /// Publishes a release archive and its `.sha256sum` sibling under
    /// `/v{version}/{archive_name}`, the upstream layout (so
    /// `ReleaseSpec::archive_url(&mirror.base_url())` points at it).
    /// Returns the archive's path.
    pub fn publish(&self, version: &str, archive_name: &str, archive: &[u8]) -> String {
        let path = format!("/v{version}/{archive_name}");
        self.put(&path, archive.to_vec());
        self.put(
            &format!("{path}.sha256sum"),
            super::archive::sha256sum_line(archive, archive_name),
        );
        path
    }

    /// Queues `fault` for the next not-yet-faulted request to `path`.
    pub fn fault(&self, path: &str, fault: Fault) {
        self.lock().faults.entry(path.to_string()).or_default().push_back(fault);
    }

    /// Queues several faults for `path`, in order.
    pub fn faults(&self, path: &str, faults: impl IntoIterator<Item = Fault>) {
        for f in faults {
            self.fault(path, f);
        }
    }

    /// Requests received for `path` so far (faulted ones included).
    pub fn requests(&self, path: &str) -> usize {
        self.lock().requests.get(path).copied().unwrap_or(0)
    }

    /// Requests received for all paths.
    /// How many `method` requests `path` got (e.g. `HEAD`).
    pub fn requests_by(&self, method: &str, path: &str) -> usize {
        self.lock()
            .by_method
            .get(&format!("{method} {path}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn total_requests(&self) -> usize {
        self.lock().requests.values().sum()
    }

    /// Faults still queued for `path`.
    pub fn pending_faults(&self, path: &str) -> usize {
        self.lock().faults.get(path).map_or(0, VecDeque::len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the acceptor sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Reads the request head; returns the method and the path (query string removed).
fn read_request(conn: &mut TcpStream) -> Option<(String, String)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head).lines().next()?.to_string();
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?;
    Some((method, target.split('?').next().unwrap_or(target).to_string()))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        403 => "Forbidden",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Injected",
    }
}

fn head(status: u16, extra: &str) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n{extra}\r\n",
        reason(status)
    )
}

fn respond(conn: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    conn.write_all(head(status, &format!("Content-Length: {}\r\n", body.len())).as_bytes())?;
    conn.write_all(body)
}

fn handle(mut conn: TcpStream, shared: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let Some((method, path)) = read_request(&mut conn) else {
        return;
    };
    let (fault, body) = {
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        *state.requests.entry(path.clone()).or_default() += 1;
        *state.by_method.entry(format!("{method} {path}")).or_default() += 1;
        let fault = state.faults.get_mut(&path).and_then(VecDeque::pop_front);
        (fault, state.bodies.get(&path).cloned())
    };
    let _ = match (fault, body) {
        (Some(Fault::Status(code)), _) => respond(&mut conn, code, format!("injected {code}\n").as_bytes()),
        (Some(Fault::NotFound), _) | (_, None) => respond(&mut conn, 404, b"not found\n"),
        (Some(Fault::Truncate(n)), Some(body)) => conn
            .write_all(head(200, &format!("Content-Length: {}\r\n", body.len())).as_bytes())
            .and_then(|()| conn.write_all(&body[..n.min(body.len())])),
        (Some(Fault::DropMidBody), Some(body)) => {
            let half = &body[..body.len() / 2];
            conn.write_all(head(200, "Transfer-Encoding: chunked\r\n").as_bytes())
                .and_then(|()| conn.write_all(format!("{:x}\r\n", half.len()).as_bytes()))
                .and_then(|()| conn.write_all(half))
                .and_then(|()| conn.write_all(b"\r\n"))
        }
        (Some(Fault::SlowFirstByte(delay)), Some(body)) => {
            thread::sleep(delay);
            respond(&mut conn, 200, &body)
        }
        (Some(Fault::StallMidBody(delay)), Some(body)) => {
            let (first, rest) = body.split_at(body.len() / 2);
            conn.write_all(head(200, &format!("Content-Length: {}\r\n", body.len())).as_bytes())
                .and_then(|()| conn.write_all(first))
                .and_then(|()| conn.flush())
                .and_then(|()| {
                    thread::sleep(delay);
                    conn.write_all(rest)
                })
        }
        (Some(Fault::Drip(every)), Some(body)) => conn
            .write_all(head(200, &format!("Content-Length: {}\r\n", body.len())).as_bytes())
            .and_then(|()| {
                for b in body.iter() {
                    conn.write_all(std::slice::from_ref(b))?;
                    conn.flush()?;
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    thread::sleep(every);
                }
                Ok(())
            }),
        (Some(Fault::Redirect(location)), _) => {
            conn.write_all(head(302, &format!("Location: {location}\r\nContent-Length: 0\r\n")).as_bytes())
        }
        (None, Some(body)) if method == "HEAD" => {
            conn.write_all(head(200, &format!("Content-Length: {}\r\n", body.len())).as_bytes())
        }
        (None, Some(body)) => respond(&mut conn, 200, &body),
    };
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Both);
}
