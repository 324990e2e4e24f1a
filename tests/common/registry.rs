//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) serving a temp storage directory on a loopback
//! port, optionally behind `htpasswd` basic auth (bcrypt, `htpasswd -Bbn`
//! from apache2-utils). It can be stopped and started again on the same
//! port and storage (the "registry down, then up" case).
//!
//! Test images are built here: small OCI images of a few random gzip
//! layers, pushed with the registry's HTTP API (blob upload POST then PUT
//! with the digest, then the manifest PUT), over a minimal HTTP/1.1 client.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use super::containerd::{Daemon, run_ok, wait_until};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A running (or stopped) registry.
pub struct Registry {
    pub port: u16,
    dir: PathBuf,
    /// (user, password) when htpasswd auth is on.
    pub auth: Option<(String, String)>,
    daemon: Option<Daemon>,
    starts: u32,
}

/// A pushed image.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// `127.0.0.1:PORT/repo:tag`
    pub reference: String,
    pub manifest_digest: String,
    /// Compressed bytes of every layer.
    pub layer_bytes: u64,
    /// `sha256:...` of each (compressed) layer blob, in manifest order.
    pub layer_digests: Vec<String>,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Registry {
    /// Writes the config under `dir` for a free port; does not start it.
    pub fn new(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "needs Debian's docker-registry: apt-get install -y docker-registry"
        );
        fs::create_dir_all(dir.join("storage")).unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        if let Some((user, password)) = auth {
            let line = run_ok(
                Command::new("htpasswd").args(["-Bbn", user, password]),
                Duration::from_secs(30),
            );
            fs::write(dir.join("htpasswd"), line.trim_end().to_string() + "\n").unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: soci-agent-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
        }
        fs::write(dir.join("config.yml"), config).unwrap();
        Registry {
            port,
            dir: dir.to_path_buf(),
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            daemon: None,
            starts: 0,
        }
    }

    /// New and started.
    pub fn start_new(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        let mut r = Registry::new(dir, auth);
        r.start();
        r
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the registry and waits (bounded) until `/v2/` answers.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "registry already running");
        self.starts += 1;
        let daemon = Daemon::spawn(
            "docker-registry",
            Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(self.dir.join("config.yml")),
            self.dir.join("registry.log"),
        );
        let log = daemon.log.clone();
        let daemon = std::cell::RefCell::new(daemon);
        let port = self.port;
        wait_until(
            "registry answering /v2/",
            Duration::from_secs(20),
            || {
                daemon.borrow_mut().assert_running();
                http(port, "GET", "/v2/", &[], &[], None).is_ok_and(|r| r.status == 200 || r.status == 401)
            },
            || fs::read_to_string(&log).unwrap_or_default(),
        );
        self.daemon = Some(daemon.into_inner());
    }

    /// Stops (kills) the registry; storage stays.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }

    fn basic(&self) -> Option<String> {
        self.auth
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())))
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        http(self.port, method, path, headers, body, self.basic().as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Uploads one blob (monolithic: POST, then PUT with the digest).
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex(&Sha256::digest(data)));
        let r = self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[]);
        assert_eq!(r.status, 202, "blob upload start: {}", r.text());
        let location = r.header("location").expect("upload Location");
        let path = location
            .split_once("://")
            .map_or(location.as_str(), |(_, rest)| &rest[rest.find('/').unwrap_or(0)..])
            .to_string();
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = self.request(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        );
        assert_eq!(r.status, 201, "blob upload PUT: {}", r.text());
        digest
    }

    /// Builds an OCI image of `layers` random layers of `layer_size` bytes
    /// (incompressible), pushes it as `repo:tag`.
    pub fn push_random_image(&self, repo: &str, tag: &str, layers: usize, layer_size: usize) -> Pushed {
        let mut diff_ids = Vec::new();
        let mut descriptors = Vec::new();
        let mut layer_bytes = 0u64;
        let mut layer_digests = Vec::new();
        for i in 0..layers {
            let (tar, gz) = random_layer(&format!("{repo}-{tag}-{i}"), layer_size);
            diff_ids.push(format!("sha256:{}", hex(&Sha256::digest(&tar))));
            let digest = self.push_blob(repo, &gz);
            layer_digests.push(digest.clone());
            layer_bytes += gz.len() as u64;
            descriptors.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": gz.len(),
            }));
        }
        let config = serde_json::json!({
            "architecture": native_arch(),
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        let config_digest = self.push_blob(repo, config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": descriptors,
        })
        .to_string();
        let r = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", MANIFEST_TYPE)],
            manifest.as_bytes(),
        );
        assert_eq!(r.status, 201, "manifest PUT: {}", r.text());
        Pushed {
            reference: format!("{}/{repo}:{tag}", self.host()),
            manifest_digest: format!("sha256:{}", hex(&Sha256::digest(manifest.as_bytes()))),
            layer_bytes,
            layer_digests,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    }
}

/// A layer tar holding one file of random bytes, and its gzip.
pub fn random_layer(name: &str, size: usize) -> (Vec<u8>, Vec<u8>) {
    let mut data = vec![0u8; size];
    fastrand::fill(&mut data);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(
            &mut header,
            format!("data/{}.bin", name.replace(['/', ':'], "_")),
            &data[..],
        )
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&tar).unwrap();
    (tar.clone(), gz.finish().unwrap())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                T[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

/// A response of the minimal client.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    pub fn text(&self) -> String {
        format!("{} {}", self.status, String::from_utf8_lossy(&self.body))
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with `Connection: close`.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    authorization: Option<&str>,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}
