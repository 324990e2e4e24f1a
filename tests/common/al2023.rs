//! An EKS AL2023-shaped node: the AMI's real units (nodeadm-config, nodeadm-run, kubelet, the
//! SOCI service and socket), real nodeadm enabled at boot against the IMDS/EC2 stand-ins,
//! containerd 2.2.9 installed but not enabled (nodeadm-run starts it), stubs for what is not
//! under test (kubelet, iptables, the ECR credential provider), and the pause image archive.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::archive::oci_image_tar;
use super::imds::AwsStandIn;
use super::nspawn::NodeOptions;
use super::real::{self, NodeContainerdConfig, with_containerd};
use super::registry::base64;

pub const CONTAINERD_VERSION: &str = "2.2.9";
pub const KUBELET_VERSION: &str = "v1.34.2";
pub const NODEADM_CONFIG: &str = "nodeadm-config.service";
pub const NODEADM_RUN: &str = "nodeadm-run.service";
pub const UNITS: &str = "/etc/systemd/system";
/// The stand-ins' drop-in on the nodeadm units (IMDS and EC2 endpoints on loopback).
pub const AWS_DROPIN: &str = "90-e2e-aws-standin.conf";
pub const CERTS_D: &str = "/etc/containerd/certs.d";
pub const PAUSE_ARCHIVE: &str = "/etc/eks/pause.tar";
pub const PAUSE_IMAGE: &str = "localhost/kubernetes/pause:latest";
pub const SOCI_SOCKET: &str = "soci-snapshotter.socket";

/// The AMI's runtime files this node gets, under `/etc/systemd/system`.
pub const AMI_UNITS: [&str; 7] = [
    "nodeadm-config.service",
    "nodeadm-run.service",
    "kubelet.service",
    "soci-snapshotter.service",
    "soci-snapshotter.socket",
    "runtime.slice",
    "containerd.service.d/00-runtime-slice.conf",
];

/// A CA certificate for the cluster fields. nodeadm only decodes and writes it.
const CLUSTER_CA: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBdzCCAR2gAwIBAgIBADAKBggqhkjOPQQDAjAVMRMwEQYDVQQDEwprdWJlcm5ldGVz\n\
-----END CERTIFICATE-----\n";

const KUBELET_STUB: &str = "#!/bin/sh\n\
# Test stub for kubelet (not under test): reports a version; otherwise idles, so that\n\
# kubelet.service is active with the command line nodeadm gave it.\n\
case \"$1\" in --version) echo \"Kubernetes v1.34.2-eks-e2e\"; exit 0;; esac\n\
trap 'exit 0' TERM INT\n\
while :; do sleep 3600 & wait $!; done\n";

const IPTABLES_STUB: &str = "#!/bin/sh\n# Test stub (kubelet.service's ExecStartPre).\nexit 0\n";

const ECR_PROVIDER_STUB: &str = "#!/bin/sh\n# Test stub for the ECR credential provider (nodeadm checks it exists).\necho 'not on AWS' >&2\nexit 1\n";

/// EKS-style user data: MIME multipart with the cluster NodeConfig (its containerd fragment
/// sets the CRI registry `config_path` in version-3 table names), and, when `install` is not
/// empty, the shell part cloud-final would run, which nodeadm skips.
pub fn user_data(install: &[String]) -> Vec<u8> {
    let nodeconfig = format!(
        "---\n\
         apiVersion: node.eks.aws/v1alpha1\n\
         kind: NodeConfig\n\
         spec:\n  \
           cluster:\n    \
             name: soci-e2e\n    \
             apiServerEndpoint: https://E2E5A0C1A9E47B01E2E5A0C1A9E47B01.gr7.us-west-2.eks.amazonaws.com\n    \
             certificateAuthority: {ca}\n    \
             cidr: 10.100.0.0/16\n  \
           containerd:\n    \
             config: |\n      \
               [plugins.'io.containerd.cri.v1.images'.registry]\n      \
               config_path = '{CERTS_D}'\n",
        ca = base64(CLUSTER_CA.as_bytes()),
    );
    let script = if install.is_empty() {
        String::new()
    } else {
        format!(
            "--//\r\n\
             Content-Type: text/x-shellscript; charset=\"us-ascii\"\r\n\
             \r\n\
             #!/bin/bash\nset -euo pipefail\n{}\n\r\n",
            install.join(" ")
        )
    };
    format!(
        "MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"//\"\r\n\
         \r\n\
         --//\r\n\
         Content-Type: application/node.eks.aws\r\n\
         \r\n\
         {nodeconfig}\r\n\
         {script}\
         --//--\r\n"
    )
    .into_bytes()
}

/// Copies `from` to `node_path` in the node's tree `root` with `mode`.
pub fn copy_into(root: &Path, from: &Path, node_path: &str, mode: u32) {
    let to = root.join(node_path.trim_start_matches('/'));
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    let _ = fs::remove_file(&to);
    fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    fs::set_permissions(&to, fs::Permissions::from_mode(mode)).unwrap();
}

/// `systemctl enable` by hand: `unit` wanted by `target`.
pub fn enable_link(root: &Path, target: &str, unit: &str) {
    let wants = root.join("etc/systemd/system").join(format!("{target}.wants"));
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(format!("{UNITS}/{unit}"), wants.join(unit)).unwrap();
}

/// The node's tree: the AMI's units and files, the stand-ins' drop-in on the nodeadm units, the
/// stubs, real nodeadm, the registry at `registry_host` trusted over plain HTTP; with
/// `old_soci`, the older real SOCI in /usr/bin (as the AMI ships one).
pub fn ami_node(aws: &AwsStandIn, registry_host: String, old_soci: bool) -> NodeOptions {
    let ami = real::ami_runtime().join("rootfs/etc/systemd/system");
    let old_soci = old_soci.then(|| real::soci_daemon(real::SOCI_OLD_VERSION));
    let mut opts = with_containerd(
        NodeOptions::new().al2023_like(),
        CONTAINERD_VERSION,
        NodeContainerdConfig::None,
    );
    for name in AMI_UNITS {
        let bytes = fs::read(ami.join(name)).unwrap_or_else(|e| panic!("AMI {name}: {e}"));
        opts = opts.file(&format!("{UNITS}/{name}"), bytes);
    }
    let aws_dropin = aws.systemd_dropin();
    opts.file(&format!("{UNITS}/{NODEADM_CONFIG}.d/{AWS_DROPIN}"), &aws_dropin)
        .file(&format!("{UNITS}/{NODEADM_RUN}.d/{AWS_DROPIN}"), &aws_dropin)
        .file("/etc/eks/containerd-version.txt", format!("{CONTAINERD_VERSION}\n"))
        .file(
            "/etc/eks/kubelet-version.txt",
            format!("Kubernetes {KUBELET_VERSION}-eks-e2e\n"),
        )
        .file_mode("/usr/bin/kubelet", KUBELET_STUB, 0o755)
        .file_mode("/usr/sbin/iptables", IPTABLES_STUB, 0o755)
        .file_mode(
            "/etc/eks/image-credential-provider/ecr-credential-provider",
            ECR_PROVIDER_STUB,
            0o755,
        )
        .file(PAUSE_ARCHIVE, oci_image_tar(PAUSE_IMAGE))
        .prepare(move |root: &Path| {
            copy_into(root, &real::nodeadm(), "/usr/bin/nodeadm", 0o755);
            if let Some(old_soci) = &old_soci {
                copy_into(root, old_soci, "/usr/bin/soci-snapshotter-grpc", 0o755);
                copy_into(root, &old_soci.with_file_name("soci"), "/usr/bin/soci", 0o755);
            }
            fs::create_dir_all(root.join("etc/eks/nodeadm.d")).unwrap();
            enable_link(root, "sockets.target", SOCI_SOCKET);
            enable_link(root, "multi-user.target", NODEADM_CONFIG);
            real::trust_plain_http(root, &registry_host);
        })
}
