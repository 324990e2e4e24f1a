//! nginx in front of a registry with a per-connection `limit_rate` (how S3/ECR serve
//! blobs), logging every request so a test can count blob downloads.
//!
//! nginx 1.22 applies the limit to proxied responses only with buffering on, and with
//! `proxy_max_temp_file_size 0` only fully with buffers larger than the default (measured:
//! 82 MB/s through a 25m limit with 8 x 4k, 26.5 MB/s with 8 x 64k).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::containerd::{Daemon, wait_until};
use super::registry::free_port;

/// A running rate-limited front.
pub struct Front {
    pub port: u16,
    pub access_log: PathBuf,
    _daemon: Daemon,
}

impl Front {
    /// nginx under `dir` proxying to `upstream` (`127.0.0.1:PORT`) at `limit` per connection.
    pub fn start(dir: &Path, upstream: &str, limit: &str) -> Front {
        let bin = Path::new("/usr/sbin/nginx");
        assert!(bin.exists(), "needs nginx: apt-get install -y nginx");
        let dir = dir.join("nginx");
        fs::create_dir_all(dir.join("logs")).unwrap();
        let port = free_port();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {d}/logs/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                   client_max_body_size 0;\n\
                   server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                     proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n\
                     proxy_set_header Host $http_host;\n      proxy_buffering on;\n\
                     proxy_max_temp_file_size 0;\n      proxy_buffers 8 64k;\n      limit_rate {limit};\n    }}\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let mut daemon = Daemon::spawn(
            "nginx",
            Command::new(bin).arg("-c").arg(&conf).arg("-p").arg(&dir),
            dir.join("logs/stdout.log"),
        );
        wait_until(
            "nginx listening",
            Duration::from_secs(10),
            || {
                daemon.assert_running();
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
            String::new,
        );
        Front {
            port,
            access_log: dir.join("logs/access.log"),
            _daemon: daemon,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Access-log lines so far.
    pub fn lines(&self) -> Vec<String> {
        fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Blob GETs (layer or config downloads) in `lines`.
    pub fn blob_gets(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .cloned()
            .collect()
    }
}
