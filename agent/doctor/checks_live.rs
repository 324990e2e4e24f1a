//! live.*: the SOCI socket accepts a connection; containerd lists the soci
//! snapshotter and reaches it (a `Snapshots.List` through it); the pause
//! image is unpacked in soci when the node has `/etc/eks/pause.tar`. Skipped
//! with `--no-live`. Never socket-activates an idle SOCI service.

use crate::paths::{CONTAINERD_SERVICE, CONTAINERD_SOCKET, PAUSE_ARCHIVE, SOCI_SERVICE, SOCI_SOCKET_UNIT};
use std::path::PathBuf;
use std::time::Duration;

use super::node::Node;
use super::pause::{self, PauseState};
use super::{Check, DoctorContext};
use crate::health::probe::{self, Reach};

const CONNECT_BOUND: Duration = Duration::from_millis(500);
const QUERY_BOUND: Duration = Duration::from_secs(15);

pub async fn checks(ctx: &DoctorContext, node: &Node) -> Vec<Check> {
    if !ctx.live {
        return ["live.soci-socket", "live.containerd-soci", "live.pause-image"]
            .into_iter()
            .map(|id| Check::skip(id, "--no-live"))
            .collect();
    }
    let containerd = ctx
        .containerd_socket
        .clone()
        .unwrap_or_else(|| node.root.path(CONTAINERD_SOCKET));
    let reach = containerd_soci(ctx, node, &containerd).await;
    let pause = if reach.verdict == super::Verdict::Skip {
        Check::skip(
            "live.pause-image",
            "containerd not reachable (see live.containerd-soci)",
        )
    } else {
        pause_image(node, &containerd).await
    };
    vec![soci_socket(ctx, node).await, reach, pause]
}

async fn soci_socket(ctx: &DoctorContext, node: &Node) -> Check {
    const ID: &str = "live.soci-socket";
    let explicit = ctx.soci_socket.is_some();
    let path: PathBuf = ctx
        .soci_socket
        .clone()
        .unwrap_or_else(|| node.root.path(&node.soci_socket.value));
    if !explicit && would_activate(node) {
        return Check::skip(
            ID,
            format!(
                "{SOCI_SERVICE} is inactive and {SOCI_SOCKET_UNIT} listens: connecting would socket-activate it (on nodeadm hosts \
                 before nodeadm-run, ahead of the local disk setup); not connecting"
            ),
        );
    }
    if !path.exists() {
        let evidence = format!("no socket at {}", path.display());
        if explicit || node.root.is_host() {
            return Check::fail(
                ID,
                format!("{evidence}: the daemon is not running and no socket unit listens"),
                format!("systemctl start {SOCI_SOCKET_UNIT} {SOCI_SERVICE}; see journalctl -u {SOCI_SERVICE}"),
            );
        }
        return Check::skip(
            ID,
            format!("{evidence} (--root is not /: the node is not running here)"),
        );
    }
    match crate::health::wait_for_socket(&path, CONNECT_BOUND).await {
        Ok(_) => Check::ok(ID, format!("{} accepted a connection", path.display())),
        Err(e) => Check::fail(
            ID,
            e.to_string(),
            format!("see systemctl status {SOCI_SERVICE} and journalctl -u {SOCI_SERVICE}"),
        ),
    }
}

/// The address containerd dials for soci, from the containerd config file.
fn proxy_address(node: &Node) -> Option<String> {
    let doc: toml_edit::DocumentMut = node.containerd_config.found()?.parse().ok()?;
    let a = doc.get("proxy_plugins")?.get("soci")?.get("address")?.as_str()?;
    Some(a.trim_start_matches("unix://").to_string())
}

/// Connecting would socket-activate an idle SOCI service.
fn would_activate(node: &Node) -> bool {
    node.bus.unit(SOCI_SERVICE).is_some_and(|s| !s.is_active())
        && node.bus.unit(SOCI_SOCKET_UNIT).is_some_and(|s| s.is_active())
}

async fn containerd_soci(ctx: &DoctorContext, node: &Node, socket: &std::path::Path) -> Check {
    const ID: &str = "live.containerd-soci";
    let flag = ctx.containerd_socket.is_some();
    let explicit = flag || node.root.is_host();
    if !flag && node.bus.unit(CONTAINERD_SERVICE).is_some_and(|s| !s.is_active()) {
        return Check::skip(ID, format!("{CONTAINERD_SERVICE} is not running (D-Bus)"));
    }
    if !socket.exists() {
        let evidence = format!("no containerd socket at {}", socket.display());
        if explicit {
            return Check::fail(
                ID,
                evidence,
                format!("start containerd: systemctl start {CONTAINERD_SERVICE}"),
            );
        }
        return Check::skip(
            ID,
            format!("{evidence} (--root is not /: the node is not running here)"),
        );
    }
    let soci: PathBuf = match (&ctx.soci_socket, proxy_address(node)) {
        (Some(p), _) => p.clone(),
        (None, Some(a)) => node.root.path(a),
        (None, None) => node.root.path(&node.soci_socket.value),
    };
    let may_dial = ctx.soci_socket.is_some() || !would_activate(node);
    let shown = socket.display();
    let (v, reach) = match tokio::time::timeout(QUERY_BOUND, probe::probe(socket, &soci, may_dial)).await {
        Err(_) => {
            return Check::fail(
                ID,
                format!("containerd at {shown}: no answer within {QUERY_BOUND:?}"),
                "see journalctl -u containerd",
            );
        }
        Ok(Err(e)) => {
            return Check::fail(
                ID,
                format!("cannot talk to containerd at {shown}: {e}"),
                "see journalctl -u containerd",
            );
        }
        Ok(Ok(x)) => x,
    };
    let unserved = format!(
        "nothing serves proxy_plugins.soci.address: start {SOCI_SERVICE} (journalctl -u {SOCI_SERVICE}), and check the \
         address equals the daemon's socket"
    );
    match reach {
        Reach::Stat { ns, key } => Check::ok(
            ID,
            format!("containerd {v} at {shown} lists soci and reaches it (Snapshots.Stat of {key} in {ns})"),
        ),
        Reach::Direct => Check::ok(
            ID,
            format!(
                "containerd {v} at {shown} lists soci (no soci snapshot yet to probe through it); the daemon at {} \
                 answers Snapshots.List",
                soci.display()
            ),
        ),
        Reach::NotProbed => Check::warn(
            ID,
            format!(
                "containerd {v} at {shown} lists soci; no soci snapshot to probe through it, and {SOCI_SERVICE} is idle"
            ),
            format!("systemctl start {SOCI_SERVICE}, then run doctor again"),
        ),
        Reach::Unreachable { call, error } => Check::fail(
            ID,
            format!("containerd {v} at {shown} lists soci but cannot reach it ({call}: {error})"),
            unserved,
        ),
        Reach::DirectFailed(error) => Check::fail(
            ID,
            format!("containerd {v} at {shown} lists soci but cannot reach it: {error}"),
            unserved,
        ),
        Reach::InitError(err) => Check::fail(
            ID,
            format!("containerd {v} at {shown}: the soci snapshotter failed to load: {err}"),
            "fix [proxy_plugins.soci] and restart containerd",
        ),
        Reach::NotListed => Check::fail(
            ID,
            format!(
                "containerd {v} at {shown} lists no soci snapshotter: the config it loaded has no [proxy_plugins.soci]"
            ),
            "wire containerd (soci-agent install), then restart it; containerd config dump shows what it loaded",
        ),
    }
}

async fn pause_image(node: &Node, containerd: &std::path::Path) -> Check {
    const ID: &str = "live.pause-image";
    let archive = node.root.path(PAUSE_ARCHIVE);
    if !archive.is_file() {
        return Check::skip(ID, format!("no {PAUSE_ARCHIVE} on this node"));
    }
    let names = match pause::archive_names(&archive) {
        Ok(n) if !n.is_empty() => n,
        Ok(_) => {
            return Check::skip(ID, format!("{PAUSE_ARCHIVE} names no image (no index.json annotation)"));
        }
        Err(e) => return Check::skip(ID, format!("cannot read {PAUSE_ARCHIVE}: {e}")),
    };
    let arch = crate::release::Arch::from_machine(&node.facts.machine).map_or("amd64", |a| a.as_str());
    let import = format!(
        "systemctl start soci-agent-boot.service (it imports {PAUSE_ARCHIVE} into soci), or \
         ctr -n k8s.io images import --snapshotter soci {PAUSE_ARCHIVE}"
    );
    match tokio::time::timeout(QUERY_BOUND, pause::state(containerd, &names, arch)).await {
        Err(_) => Check::fail(
            ID,
            format!("containerd: no answer within {QUERY_BOUND:?}"),
            "see journalctl -u containerd",
        ),
        Ok(Err(e)) => Check::fail(ID, e, "see journalctl -u containerd"),
        Ok(Ok(PauseState::InSoci { name, chain_id })) => Check::ok(
            ID,
            format!("{name} (from {PAUSE_ARCHIVE}) is unpacked in soci (snapshot {chain_id}, namespace k8s.io)"),
        ),
        Ok(Ok(PauseState::Elsewhere { name, snapshotters })) => Check::fail(
            ID,
            format!(
                "{name} is in k8s.io but not unpacked in soci (unpacked in: {})",
                if snapshotters.is_empty() {
                    "none".into()
                } else {
                    snapshotters.join(", ")
                }
            ),
            format!("with snapshotter = \"soci\" the sandbox cannot start and the node stays NotReady: {import}"),
        ),
        Ok(Ok(PauseState::Absent { names })) => Check::fail(
            ID,
            format!("{} is not in containerd's k8s.io namespace", names.join(", ")),
            format!("pods cannot get a sandbox until it is imported: {import}"),
        ),
    }
}
