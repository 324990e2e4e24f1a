//! `render ec2nodeclass`: a Karpenter `EC2NodeClass` (karpenter.k8s.aws/v1,
//! AL2023) with a gp3 root volume fast enough for parallel unpack and the
//! user data embedded as a literal block scalar, written with serde_yaml_ng.

use crate::paths::SOCI_ROOT;
use clap::Args;

use super::userdata::{self, UserdataArgs};
use super::yaml;
use super::{RenderError, Rendered, invalid};
use serde::Serialize;

pub const API_VERSION: &str = "karpenter.k8s.aws/v1";
/// gp3 limits this renderer enforces (MiB/s, IOPS).
const THROUGHPUT: std::ops::RangeInclusive<u32> = 125..=1000;
const IOPS: std::ops::RangeInclusive<u32> = 3000..=16000;
/// The AL2023 EKS AMI's root snapshot is 20 GiB; gp3 volumes end at 16 TiB.
const VOLUME_GIB: std::ops::RangeInclusive<u64> = 20..=16384;

#[derive(Debug, Clone, Args)]
pub struct Ec2NodeClassArgs {
    /// metadata.name of the EC2NodeClass (a NodePool's nodeClassRef.name).
    #[arg(long, value_name = "NAME", default_value = "soci")]
    pub name: String,

    /// IAM role name of the nodes (spec.role), e.g. KarpenterNodeRole-my-cluster.
    #[arg(long, value_name = "ROLE")]
    pub role: String,

    /// Cluster name: subnets and security groups are selected by the tag
    /// karpenter.sh/discovery=<CLUSTER>.
    #[arg(long, value_name = "CLUSTER")]
    pub cluster: String,

    /// AMI selector alias (AL2023 family), e.g. al2023@latest or al2023@v20260714.
    #[arg(long, value_name = "ALIAS", default_value = "al2023@latest")]
    pub ami_alias: String,

    /// Root volume (/dev/xvda, gp3) throughput in MiB/s, 125..=1000; parallel unpack wants >= 600.
    #[arg(long, value_name = "MIBPS", default_value_t = 600)]
    pub ebs_throughput: u32,

    /// Root volume IOPS, 3000..=16000, at least 4 per MiB/s of throughput.
    #[arg(long, value_name = "IOPS", default_value_t = 6000)]
    pub ebs_iops: u32,

    /// Root volume size (Gi or Ti), at least 20Gi (the AMI's snapshot).
    #[arg(long, value_name = "SIZE", default_value = "100Gi")]
    pub volume_size: String,

    /// Set instanceStorePolicy: RAID0 (nodeadm puts containerd's and SOCI's
    /// state on the instance-store RAID).
    #[arg(long)]
    pub instance_store_raid0: bool,

    #[command(flatten)]
    pub data_volume: super::DataVolumeArgs,

    #[command(flatten)]
    pub userdata: UserdataArgs,
}

pub(super) fn render(a: &Ec2NodeClassArgs) -> Result<Rendered, RenderError> {
    check_name(&a.name)?;
    check_role(&a.role)?;
    check_cluster_name("--cluster", &a.cluster)?;
    check_alias(&a.ami_alias)?;
    check_volume(a)?;
    let mut notes = Vec::new();
    let mut ud = a.userdata.clone();
    let mapping = a.data_volume.apply(&mut ud, &mut notes)?;
    if mapping.is_some() && a.instance_store_raid0 {
        return Err(invalid(
            "--instance-store-raid0",
            "true",
            "conflicts with a data volume: nodeadm would bind the instance store over the same roots",
        ));
    }
    let user_data = userdata::build(&ud, Vec::new(), &mut notes)?;
    if a.instance_store_raid0
        && let Some(root) = &a.userdata.soci_root
        && root.trim_end_matches('/') != SOCI_ROOT
    {
        notes.push(format!(
            "with RAID0, nodeadm moves only {} onto the instance store; --soci-root {root} stays on the root volume",
            SOCI_ROOT
        ));
    }
    Ok(Rendered {
        text: manifest(a, &user_data, mapping.as_ref()),
        notes,
    })
}

/// The EC2NodeClass YAML, with `user_data` as its userData.
fn manifest(a: &Ec2NodeClassArgs, user_data: &str, data: Option<&super::data_volume::Mapping>) -> String {
    let discovery = || {
        vec![Tags {
            tags: Discovery { discovery: &a.cluster },
        }]
    };
    let class = NodeClass {
        api_version: API_VERSION,
        kind: "EC2NodeClass",
        metadata: Metadata { name: &a.name },
        spec: Spec {
            ami_family: "AL2023",
            ami_selector_terms: vec![Alias { alias: &a.ami_alias }],
            role: &a.role,
            subnet_selector_terms: discovery(),
            security_group_selector_terms: discovery(),
            block_device_mappings: block_devices(a, data),
            instance_store_policy: a.instance_store_raid0.then_some("RAID0"),
            user_data,
        },
    };
    yaml::document(
        &[
            "Rendered by `soci-agent render ec2nodeclass`. Karpenter appends its own NodeConfig",
            "(cluster fields) after this user data when it launches a node.",
        ],
        &class,
    )
}

/// The root volume, and the data volume when asked for (Karpenter replaces
/// the whole list: the root mapping must stay).
fn block_devices<'a>(a: &'a Ec2NodeClassArgs, data: Option<&'a super::data_volume::Mapping>) -> Vec<BlockDevice<'a>> {
    let ebs = |volume_size, snapshot_id| Ebs {
        volume_size,
        snapshot_id,
        volume_type: "gp3",
        iops: a.ebs_iops,
        throughput: a.ebs_throughput,
        encrypted: true,
        delete_on_termination: true,
    };
    let mut out = vec![BlockDevice {
        device_name: "/dev/xvda",
        ebs: ebs(Some(&a.volume_size), None),
    }];
    out.extend(data.map(|d| BlockDevice {
        device_name: &d.device,
        ebs: ebs(d.size.as_deref(), d.snapshot.as_deref()),
    }));
    out
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeClass<'a> {
    api_version: &'a str,
    kind: &'a str,
    metadata: Metadata<'a>,
    spec: Spec<'a>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec<'a> {
    ami_family: &'a str,
    ami_selector_terms: Vec<Alias<'a>>,
    role: &'a str,
    subnet_selector_terms: Vec<Tags<'a>>,
    security_group_selector_terms: Vec<Tags<'a>>,
    block_device_mappings: Vec<BlockDevice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_store_policy: Option<&'a str>,
    user_data: &'a str,
}

#[derive(Serialize)]
struct Alias<'a> {
    alias: &'a str,
}

#[derive(Serialize)]
struct Tags<'a> {
    tags: Discovery<'a>,
}

#[derive(Serialize)]
struct Discovery<'a> {
    #[serde(rename = "karpenter.sh/discovery")]
    discovery: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BlockDevice<'a> {
    device_name: &'a str,
    ebs: Ebs<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Ebs<'a> {
    #[serde(rename = "snapshotID", skip_serializing_if = "Option::is_none")]
    snapshot_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_size: Option<&'a str>,
    volume_type: &'a str,
    iops: u32,
    throughput: u32,
    encrypted: bool,
    delete_on_termination: bool,
}

/// A Kubernetes object name (DNS subdomain).
fn check_name(v: &str) -> Result<(), RenderError> {
    let b = v.as_bytes();
    let ok = (1..=253).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-.".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--name",
            v,
            "must be a Kubernetes name: lowercase letters, digits, '-' and '.', starting and ending alphanumeric",
        ))
    }
}

/// An IAM role name.
fn check_role(v: &str) -> Result<(), RenderError> {
    let ok = (1..=64).contains(&v.len()) && v.bytes().all(|c| c.is_ascii_alphanumeric() || b"+=,.@_-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--role",
            v,
            "must be an IAM role name (not an ARN): up to 64 of letters, digits and +=,.@_-",
        ))
    }
}

/// An EKS cluster name.
pub(super) fn check_cluster_name(option: &'static str, v: &str) -> Result<(), RenderError> {
    let b = v.as_bytes();
    let ok = (1..=100).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            option,
            v,
            "must be an EKS cluster name: up to 100 of letters, digits, '-' and '_', starting alphanumeric",
        ))
    }
}

fn check_alias(v: &str) -> Result<(), RenderError> {
    let ok = v
        .strip_prefix("al2023@")
        .is_some_and(|ver| !ver.is_empty() && ver.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--ami-alias",
            v,
            "must be an AL2023 alias: al2023@latest or al2023@<version>, e.g. al2023@v20260714",
        ))
    }
}

/// The root volume: gp3 throughput and IOPS, and its size.
fn check_volume(a: &Ec2NodeClassArgs) -> Result<(), RenderError> {
    check_gp3(a)?;
    check_volume_size(&a.volume_size)
}

/// gp3's throughput and IOPS ranges, and their ratio.
fn check_gp3(a: &Ec2NodeClassArgs) -> Result<(), RenderError> {
    if !THROUGHPUT.contains(&a.ebs_throughput) {
        return Err(invalid(
            "--ebs-throughput",
            &a.ebs_throughput.to_string(),
            "gp3 throughput is 125 to 1000 MiB/s (parallel unpack wants 600 or more)",
        ));
    }
    if !IOPS.contains(&a.ebs_iops) {
        return Err(invalid(
            "--ebs-iops",
            &a.ebs_iops.to_string(),
            "gp3 IOPS are 3000 to 16000",
        ));
    }
    if u64::from(a.ebs_throughput) * 4 > u64::from(a.ebs_iops) {
        return Err(invalid(
            "--ebs-throughput",
            &a.ebs_throughput.to_string(),
            format!(
                "gp3 allows at most 0.25 MiB/s per provisioned IOPS: {} MiB/s needs --ebs-iops {} or more",
                a.ebs_throughput,
                a.ebs_throughput * 4
            ),
        ));
    }
    Ok(())
}

/// A whole number of Gi or Ti, 20Gi to 16Ti.
fn check_volume_size(size: &str) -> Result<(), RenderError> {
    let gib = super::parse_size(size)
        .ok_or_else(|| invalid("--volume-size", size, "expected a whole number of Gi or Ti, e.g. 100Gi"))?;
    if !VOLUME_GIB.contains(&gib) {
        return Err(invalid(
            "--volume-size",
            size,
            "must be between 20Gi (the AL2023 AMI's snapshot) and 16Ti (gp3's limit)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(super::super::parse_size("100Gi"), Some(100));
        assert_eq!(super::super::parse_size("2Ti"), Some(2048));
        for bad in ["100", "100G", "0Gi", "010Gi", "1.5Ti", "Gi", "-1Gi"] {
            assert_eq!(super::super::parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(check_name("soci").is_ok());
        assert!(check_name("Soci").is_err());
        assert!(check_role("KarpenterNodeRole-my-cluster").is_ok());
        assert!(check_role("arn:aws:iam::1:role/x").is_err());
        assert!(check_alias("al2023@latest").is_ok());
        assert!(check_alias("al2@latest").is_err());
        assert!(check_alias("al2023@").is_err());
    }
}
