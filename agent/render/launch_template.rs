//! `render launch-template`: user data for an EKS managed node group's
//! launch template (AL2023: MIME is required). EKS merges its own NodeConfig
//! with the cluster fields into it, except for a custom AMI: then the user
//! data must carry them (`--custom-ami` + the four cluster options).

use std::net::IpAddr;

use clap::Args;

use super::ec2nodeclass::check_cluster_name;
use super::mime::{NODE_CONFIG, Part};
use super::userdata::{self, UserdataArgs};
use super::yaml;
use super::{RenderError, Rendered, invalid};
use serde::Serialize;

#[derive(Debug, Clone, Args)]
pub struct LaunchTemplateArgs {
    /// The launch template sets its own AMI (ImageId): EKS then merges nothing, so the user data
    /// carries the cluster NodeConfig (--cluster-name, --api-server-endpoint,
    /// --certificate-authority, --cidr become required).
    #[arg(long)]
    pub custom_ami: bool,

    /// EKS cluster name (spec.cluster.name). Only with --custom-ami.
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,

    /// API server endpoint, https://... (aws eks describe-cluster: cluster.endpoint). Only with --custom-ami.
    #[arg(long, value_name = "URL")]
    pub api_server_endpoint: Option<String>,

    /// Cluster CA, base64 (cluster.certificateAuthority.data). Only with --custom-ami.
    #[arg(long, value_name = "BASE64")]
    pub certificate_authority: Option<String>,

    /// Service CIDR (cluster.kubernetesNetworkConfig.serviceIpv4Cidr), e.g. 10.100.0.0/16.
    /// Only with --custom-ami.
    #[arg(long, value_name = "CIDR")]
    pub cidr: Option<String>,

    #[command(flatten)]
    pub data_volume: super::DataVolumeArgs,

    #[command(flatten)]
    pub userdata: UserdataArgs,
}

pub(super) fn render(a: &LaunchTemplateArgs) -> Result<Rendered, RenderError> {
    let mut notes = Vec::new();
    let leading = leading_parts(a)?;
    let mut ud = a.userdata.clone();
    let mapping = a.data_volume.apply(&mut ud, &mut notes)?;
    let text = userdata::build(&ud, leading, &mut notes)?;
    if let Some(m) = &mapping {
        notes.push(format!(
            "add to the launch template's BlockDeviceMappings (keep the root volume's mapping, /dev/xvda): {}",
            block_device_mapping(m)
        ));
    }
    if a.custom_ami {
        notes.push(
            "custom AMI: this user data carries the cluster NodeConfig, since EKS merges nothing; \
             the AMI must be an EKS AL2023 AMI (nodeadm)"
                .into(),
        );
    } else {
        notes.push(
            "EKS merges its own NodeConfig (cluster fields) into this user data; leave ImageId out of \
             the launch template (or render with --custom-ami)"
                .into(),
        );
    }
    notes.push("the launch template takes it base64-encoded: base64 -w0 FILE".into());
    Ok(Rendered { text, notes })
}

/// The parts before the agent's: the cluster NodeConfig with `--custom-ami` (every cluster
/// option then required), none without it (and no cluster option allowed).
fn leading_parts(a: &LaunchTemplateArgs) -> Result<Vec<Part>, RenderError> {
    let cluster_opts = [
        ("--cluster-name", &a.cluster_name),
        ("--api-server-endpoint", &a.api_server_endpoint),
        ("--certificate-authority", &a.certificate_authority),
        ("--cidr", &a.cidr),
    ];
    if !a.custom_ami {
        if let Some((option, Some(v))) = cluster_opts.iter().find(|(_, v)| v.is_some()) {
            return Err(invalid(
                option,
                v,
                "only with --custom-ami: without it EKS supplies the cluster fields",
            ));
        }
        return Ok(Vec::new());
    }
    for (option, v) in cluster_opts {
        if v.is_none() {
            return Err(RenderError::Missing {
                option,
                reason: "with --custom-ami (EKS does not merge its cluster NodeConfig into a custom AMI's user data)",
            });
        }
    }
    Ok(vec![cluster_part(a)?])
}

/// The cluster NodeConfig part (first, so the agent's part and Karpenter's
/// conventions keep their usual order after it).
fn cluster_part(a: &LaunchTemplateArgs) -> Result<Part, RenderError> {
    let name = a.cluster_name.as_deref().unwrap_or_default();
    let endpoint = a.api_server_endpoint.as_deref().unwrap_or_default();
    let ca = a.certificate_authority.as_deref().unwrap_or_default();
    let cidr = a.cidr.as_deref().unwrap_or_default();
    check_cluster_name("--cluster-name", name)?;
    check_endpoint(endpoint)?;
    check_base64(ca)?;
    check_cidr(cidr)?;
    Ok(Part {
        content_type: NODE_CONFIG,
        body: yaml::document(
            &[],
            &ClusterNodeConfig {
                api_version: "node.eks.aws/v1alpha1",
                kind: "NodeConfig",
                spec: ClusterSpec {
                    cluster: Cluster {
                        name,
                        api_server_endpoint: endpoint,
                        certificate_authority: ca,
                        cidr,
                    },
                },
            },
        ),
    })
}

/// The cluster fields' NodeConfig (what EKS merges for a managed AMI).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterNodeConfig<'a> {
    api_version: &'a str,
    kind: &'a str,
    spec: ClusterSpec<'a>,
}

#[derive(Serialize)]
struct ClusterSpec<'a> {
    cluster: Cluster<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Cluster<'a> {
    name: &'a str,
    api_server_endpoint: &'a str,
    certificate_authority: &'a str,
    cidr: &'a str,
}

/// The data volume's `BlockDeviceMappings` entry (launch template JSON).
fn block_device_mapping(m: &super::data_volume::Mapping) -> String {
    let mut ebs = serde_json::json!({
        "VolumeType": "gp3",
        "Iops": 6000,
        "Throughput": 600,
        "Encrypted": true,
        "DeleteOnTermination": true,
    });
    if let Some(s) = &m.snapshot {
        ebs["SnapshotId"] = s.clone().into();
    }
    if let Some(g) = m.size_gib {
        ebs["VolumeSize"] = g.into();
    }
    serde_json::json!({ "DeviceName": m.device, "Ebs": ebs }).to_string()
}

fn check_endpoint(v: &str) -> Result<(), RenderError> {
    let ok = v
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && super::is_printable_word(v);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--api-server-endpoint",
            v,
            "must be the cluster's https:// endpoint (printable ASCII, no spaces)",
        ))
    }
}

fn check_base64(v: &str) -> Result<(), RenderError> {
    let ok = !v.is_empty()
        && v.len() % 4 == 0
        && v.trim_end_matches('=').len() + 2 >= v.len()
        && v.trim_end_matches('=')
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--certificate-authority",
            v,
            "must be the base64 CA data on one line (aws eks describe-cluster: cluster.certificateAuthority.data)",
        ))
    }
}

fn check_cidr(v: &str) -> Result<(), RenderError> {
    let ok = v.split_once('/').is_some_and(|(ip, prefix)| {
        let max = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => 32,
            Ok(IpAddr::V6(_)) => 128,
            Err(_) => return false,
        };
        !prefix.is_empty()
            && prefix.len() <= 3
            && prefix.bytes().all(|c| c.is_ascii_digit())
            && prefix.parse::<u32>().is_ok_and(|p| p <= max)
    });
    if ok {
        Ok(())
    } else {
        Err(invalid("--cidr", v, "must be a CIDR, e.g. 10.100.0.0/16 or fd00::/108"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_values() {
        assert!(check_cidr("10.100.0.0/16").is_ok());
        assert!(check_cidr("fd00:1::/108").is_ok());
        for bad in ["10.100.0.0", "10.100.0.0/33", "x/16", "10.0.0.0/"] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
        assert!(check_base64("TFMwdA==").is_ok());
        assert!(check_base64("TFMw dA==").is_err());
        assert!(check_base64("TFMwd").is_err());
        assert!(check_endpoint("https://ABC.gr7.eu-west-1.eks.amazonaws.com").is_ok());
        assert!(check_endpoint("http://x").is_err());
    }
}
