//! live.*: the SOCI socket accepts a connection; containerd lists the soci
//! snapshotter and reaches it (a `Snapshots.List` through it); the pause
//! image is unpacked in soci when the node has `/etc/eks/pause.tar`. Skipped
//! with `--no-live`. Never socket-activates an idle SOCI service.

use super::ids;
use crate::paths::{CONTAINERD_SERVICE, CONTAINERD_SOCKET, PAUSE_ARCHIVE, SOCI_SERVICE, SOCI_SOCKET_UNIT};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::node::Node;
use super::pause::{self, PauseState};
use super::{Check, DoctorContext};
use crate::health::probe::{self, Reach};

const CONNECT_BOUND: Duration = Duration::from_millis(500);
const QUERY_BOUND: Duration = Duration::from_secs(15);

pub async fn checks(ctx: &DoctorContext, node: &Node) -> Vec<Check> {
    if !ctx.live {
        return [ids::SOCI_SOCKET, ids::CONTAINERD_SOCI, "live.pause-image"]
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
        Check::skip(PAUSE_IMAGE_ID, "containerd not reachable (see live.containerd-soci)")
    } else {
        pause_image(node, &containerd).await
    };
    vec![soci_socket(ctx, node).await, reach, pause]
}

async fn soci_socket(ctx: &DoctorContext, node: &Node) -> Check {
    const ID: &str = ids::SOCI_SOCKET;
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

const CONTAINERD_SOCI_ID: &str = ids::CONTAINERD_SOCI;

/// `live.containerd-soci`: containerd lists the soci snapshotter and a call reaches the daemon.
async fn containerd_soci(ctx: &DoctorContext, node: &Node, socket: &Path) -> Check {
    const ID: &str = CONTAINERD_SOCI_ID;
    if let Some(skipped) = containerd_absent(ctx, node, socket) {
        return skipped;
    }
    let soci = soci_dial_path(ctx, node);
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
                format!("cannot talk to containerd at {shown}: {}", crate::exit::error_chain(&e)),
                "see journalctl -u containerd",
            );
        }
        Ok(Ok(x)) => x,
    };
    reach_check(&format!("containerd {v} at {shown}"), &soci, reach)
}

/// Why containerd is not asked: it is not running, or has no socket here.
fn containerd_absent(ctx: &DoctorContext, node: &Node, socket: &Path) -> Option<Check> {
    let flag = ctx.containerd_socket.is_some();
    if !flag && node.bus.unit(CONTAINERD_SERVICE).is_some_and(|s| !s.is_active()) {
        return Some(Check::skip(
            CONTAINERD_SOCI_ID,
            format!("{CONTAINERD_SERVICE} is not running (D-Bus)"),
        ));
    }
    if socket.exists() {
        return None;
    }
    let evidence = format!("no containerd socket at {}", socket.display());
    if flag || node.root.is_host() {
        return Some(Check::fail(
            CONTAINERD_SOCI_ID,
            evidence,
            format!("start containerd: systemctl start {CONTAINERD_SERVICE}"),
        ));
    }
    Some(Check::skip(
        CONTAINERD_SOCI_ID,
        format!("{evidence} (--root is not /: the node is not running here)"),
    ))
}

/// The SOCI socket to dial directly: `--soci-socket`, else containerd's proxy address, else the unit's.
fn soci_dial_path(ctx: &DoctorContext, node: &Node) -> PathBuf {
    match (&ctx.soci_socket, proxy_address(node)) {
        (Some(p), _) => p.clone(),
        (None, Some(a)) => node.root.path(a),
        (None, None) => node.root.path(&node.soci_socket.value),
    }
}

/// The check for what the probe found; `containerd` names the daemon and its socket.
fn reach_check(containerd: &str, soci: &Path, reach: Reach) -> Check {
    const ID: &str = CONTAINERD_SOCI_ID;
    match reach {
        Reach::Stat { ns, key } => Check::ok(
            ID,
            format!("{containerd} lists soci and reaches it (Snapshots.Stat of {key} in {ns})"),
        ),
        Reach::Direct => Check::ok(
            ID,
            format!(
                "{containerd} lists soci (no soci snapshot yet to probe through it); the daemon at {} \
                 answers Snapshots.List",
                soci.display()
            ),
        ),
        Reach::NotProbed => Check::warn(
            ID,
            format!("{containerd} lists soci; no soci snapshot to probe through it, and {SOCI_SERVICE} is idle"),
            format!("systemctl start {SOCI_SERVICE}, then run doctor again"),
        ),
        Reach::Unreachable { call, error } => cannot_reach(containerd, &format!(" ({call}: {error})")),
        Reach::DirectFailed(error) => cannot_reach(containerd, &format!(": {error}")),
        Reach::InitError(err) => Check::fail(
            ID,
            format!("{containerd}: the soci snapshotter failed to load: {err}"),
            "fix [proxy_plugins.soci] and restart containerd",
        ),
        Reach::NotListed => Check::fail(
            ID,
            format!("{containerd} lists no soci snapshotter: the config it loaded has no [proxy_plugins.soci]"),
            "wire containerd (soci-agent install), then restart it; containerd config dump shows what it loaded",
        ),
    }
}

/// containerd lists soci but a call through it, or to the daemon's socket, failed (`why`).
fn cannot_reach(containerd: &str, why: &str) -> Check {
    Check::fail(
        CONTAINERD_SOCI_ID,
        format!("{containerd} lists soci but cannot reach it{why}"),
        format!(
            "nothing serves proxy_plugins.soci.address: start {SOCI_SERVICE} (journalctl -u {SOCI_SERVICE}), and check the \
             address equals the daemon's socket"
        ),
    )
}

const PAUSE_IMAGE_ID: &str = "live.pause-image";

/// `live.pause-image`: the image in the node's pause archive is unpacked in soci.
async fn pause_image(node: &Node, containerd: &Path) -> Check {
    let names = match pause_names(node) {
        Ok(names) => names,
        Err(skipped) => return skipped,
    };
    let arch = crate::release::Arch::from_machine(&node.facts.machine).map_or("amd64", |a| a.as_str());
    match tokio::time::timeout(QUERY_BOUND, pause::state(containerd, &names, arch)).await {
        Err(_) => Check::fail(
            PAUSE_IMAGE_ID,
            format!("containerd: no answer within {QUERY_BOUND:?}"),
            "see journalctl -u containerd",
        ),
        Ok(Err(e)) => Check::fail(
            PAUSE_IMAGE_ID,
            crate::exit::error_chain(&e),
            "see journalctl -u containerd",
        ),
        Ok(Ok(state)) => pause_state_check(state),
    }
}

/// The image names in the node's pause archive, or why there are none to look up.
fn pause_names(node: &Node) -> Result<Vec<String>, Check> {
    let archive = node.root.path(PAUSE_ARCHIVE);
    if !archive.is_file() {
        return Err(Check::skip(PAUSE_IMAGE_ID, format!("no {PAUSE_ARCHIVE} on this node")));
    }
    match pause::archive_names(&archive) {
        Ok(n) if !n.is_empty() => Ok(n),
        Ok(_) => Err(Check::skip(
            PAUSE_IMAGE_ID,
            format!("{PAUSE_ARCHIVE} names no image (no index.json annotation)"),
        )),
        Err(e) => Err(Check::skip(
            PAUSE_IMAGE_ID,
            format!("cannot read {PAUSE_ARCHIVE}: {}", crate::exit::error_chain(&e)),
        )),
    }
}

/// The check for what containerd holds of the pause image.
fn pause_state_check(state: PauseState) -> Check {
    let import = format!(
        "systemctl start soci-agent-boot.service (it imports {PAUSE_ARCHIVE} into soci), or \
         ctr -n k8s.io images import --snapshotter soci {PAUSE_ARCHIVE}"
    );
    match state {
        PauseState::InSoci { name, chain_id } => Check::ok(
            PAUSE_IMAGE_ID,
            format!("{name} (from {PAUSE_ARCHIVE}) is unpacked in soci (snapshot {chain_id}, namespace k8s.io)"),
        ),
        PauseState::Elsewhere { name, snapshotters } => Check::fail(
            PAUSE_IMAGE_ID,
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
        PauseState::Absent { names } => Check::fail(
            PAUSE_IMAGE_ID,
            format!("{} is not in containerd's k8s.io namespace", names.join(", ")),
            format!("pods cannot get a sandbox until it is imported: {import}"),
        ),
    }
}
