//! `soci-agent render`: the real binary's output parsed as a consumer would
//! (MIME by mail-parser, YAML by serde_yaml_ng, the containerd fragment by
//! toml_edit), the shell part checked by `bash -n`/`dash -n` and run for real
//! in a temp dir against a loopback HTTP server serving a fake agent, the
//! validation refusals, and the golden examples listed in userdata/README.md.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde_yaml_ng::Value;
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_soci-agent");
const D0: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const D1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const SOCI_AMD64: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SOCI_ARM64: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const SOCKET: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn render(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("render")
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .expect("run soci-agent")
}

fn render_ok(args: &[&str]) -> String {
    let out = render(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "render {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Minimal user-data options: the agent for amd64 pinned.
fn base_args() -> Vec<String> {
    vec![
        "--agent-url".into(),
        "https://example.com/soci-agent-{arch}".into(),
        "--agent-sha256-amd64".into(),
        D0.into(),
    ]
}

/// `userdata` + [`base_args`] + `extra`.
fn userdata_args(extra: &[&str]) -> Vec<String> {
    let mut a = vec!["userdata".to_string()];
    a.extend(base_args());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A MIME part as a consumer sees it: full content type, header count, body.
#[derive(Debug)]
struct Part {
    content_type: String,
    headers: usize,
    body: String,
}

/// Parses user data with mail-parser: multipart/mixed, boundary `//`, and
/// its parts in order.
fn mime_parts(mime: &str) -> Vec<Part> {
    assert!(mime.starts_with("MIME-Version: 1.0\n"), "MIME-Version first:\n{mime}");
    assert!(!mime.contains('\r'), "line ends must be LF throughout");
    let msg = MessageParser::default()
        .parse(mime.as_bytes())
        .expect("user data parses as MIME");
    let root = msg.root_part();
    let ct = root.content_type().expect("root content type");
    assert_eq!(
        (ct.c_type.as_ref(), ct.c_subtype.as_deref()),
        ("multipart", Some("mixed"))
    );
    assert_eq!(ct.attribute("boundary"), Some("//"));
    let PartType::Multipart(children) = &root.body else {
        panic!("root is not multipart")
    };
    children
        .iter()
        .map(|&id| {
            let p = &msg.parts[id as usize];
            let ct = p.content_type().expect("part content type");
            let body = &mime.as_bytes()[p.offset_body as usize..p.offset_end as usize];
            Part {
                content_type: format!("{}/{}", ct.c_type, ct.c_subtype.as_deref().unwrap_or("")),
                headers: p.headers.len(),
                body: String::from_utf8(body.to_vec()).unwrap(),
            }
        })
        .collect()
}

fn types(parts: &[Part]) -> Vec<&str> {
    parts.iter().map(|p| p.content_type.as_str()).collect()
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("invalid YAML ({e}):\n{text}"))
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| {
        v.get(*k).unwrap_or_else(|| panic!("missing {k} in path {path:?}"))
    })
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

/// Checks a NodeConfig document against nodeadm's schema facts and returns
/// its containerd TOML fragment.
fn check_nodeconfig(doc: &Value, cri_table: &[&str], soci_root: &str) -> toml_edit::DocumentMut {
    assert_eq!(s(doc, &["apiVersion"]), "node.eks.aws/v1alpha1");
    assert_eq!(s(doc, &["kind"]), "NodeConfig");
    assert_eq!(
        s(doc, &["spec", "kubelet", "config", "imageServiceEndpoint"]),
        format!("unix://{SOCKET}")
    );
    let toml: toml_edit::DocumentMut = s(doc, &["spec", "containerd", "config"])
        .parse()
        .expect("TOML fragment");
    let mut cri = toml.as_item();
    for k in cri_table {
        cri = &cri[*k];
    }
    assert_eq!(cri["snapshotter"].as_str(), Some("soci"), "{cri_table:?} in\n{toml}");
    assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
    assert_eq!(toml["proxy_plugins"]["soci"]["type"].as_str(), Some("snapshot"));
    assert_eq!(toml["proxy_plugins"]["soci"]["address"].as_str(), Some(SOCKET));
    assert_eq!(
        toml["proxy_plugins"]["soci"]["exports"]["root"].as_str(),
        Some(soci_root)
    );
    toml
}

const V3: &[&str] = &["plugins", "io.containerd.cri.v1.images"];
const V2: &[&str] = &["plugins", "io.containerd.grpc.v1.cri", "containerd"];

// ---- userdata: MIME shape -------------------------------------------------

#[test]
fn userdata_is_mime_with_the_shell_then_the_nodeconfig_part() {
    let mime = render_ok(&strs(&userdata_args(&[])));
    let parts = mime_parts(&mime);
    assert_eq!(types(&parts), ["text/x-shellscript", "application/node.eks.aws"]);
    for p in &parts {
        assert_eq!(p.headers, 1, "a part carries only Content-Type: {p:?}");
    }
    assert!(parts[0].body.starts_with("#!/bin/sh\n"));
    assert!(parts[0].body.contains("\nset -eu\n"));
    let doc = yaml(&parts[1].body);
    let toml = check_nodeconfig(&doc, V3, "/var/lib/soci-snapshotter-grpc");
    assert!(
        toml.get("version").is_none(),
        "a NodeConfig fragment has no version key"
    );
    assert!(mime.ends_with("\n--//--\n"));
}

#[test]
fn nodeconfig_part_is_the_agents_dropin() {
    for (cv, table) in [("2", V3), ("1.7", V2)] {
        let args = userdata_args(&["--containerd-version", cv, "--soci-root", "/data/soci/"]);
        let parts = mime_parts(&render_ok(&strs(&args)));
        let part = yaml(&parts[1].body);
        check_nodeconfig(&part, table, "/data/soci");
        let dropin = yaml(&render_ok(&[
            "nodeconfig",
            "--containerd-version",
            cv,
            "--soci-root",
            "/data/soci",
        ]));
        assert_eq!(
            part, dropin,
            "containerd {cv}: the part must mean what the drop-in means"
        );
    }
}

#[test]
fn nodeconfig_part_can_be_left_out() {
    for off in [&["--nodeconfig-part=false"][..], &["--nodeconfig-part", "false"][..]] {
        let parts = mime_parts(&render_ok(&strs(&userdata_args(off))));
        assert_eq!(types(&parts), ["text/x-shellscript"], "{off:?}");
    }
    let on = userdata_args(&["--nodeconfig-part"]);
    assert_eq!(mime_parts(&render_ok(&strs(&on))).len(), 2);
}

#[test]
fn shell_part_is_valid_posix_and_bash() {
    let dir = tempfile::tempdir().unwrap();
    let variants: Vec<Vec<String>> = vec![
        base_args(),
        [
            base_args(),
            vec![
                "--agent-sha256-arm64".into(),
                D1.into(),
                "--soci-sha256-amd64".into(),
                SOCI_AMD64.into(),
                "--prefetch".into(),
                "public.ecr.aws/docker/library/python:3.12".into(),
                "--max-concurrent-downloads".into(),
                "-1".into(),
                "--concurrent-download-chunk-size".into(),
                "8 mb".into(),
                "--release-url".into(),
                "https://mirror.example.com/soci/".into(),
            ],
        ]
        .concat(),
    ];
    for (i, v) in variants.iter().enumerate() {
        let mut args = vec!["userdata"];
        args.extend(strs(v));
        let script = &mime_parts(&render_ok(&args))[0].body;
        let path = dir.path().join(format!("script-{i}.sh"));
        std::fs::write(&path, script).unwrap();
        for shell in ["bash", "dash"] {
            let out = Command::new(shell).arg("-n").arg(&path).output();
            match out {
                Ok(out) => assert!(out.status.success(), "{shell} -n: {}\n{script}", stderr(&out)),
                Err(e) if shell == "dash" && e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{shell}: {e}"),
            }
        }
    }
}

// ---- nodeconfig -------------------------------------------------------------

#[test]
fn nodeconfig_uses_installs_renderer() {
    use soci_agent::files::containerd_config::{ConfigVersion, SociWiring};
    for (cv, version, table) in [("2", ConfigVersion::V3, V3), ("1.7", ConfigVersion::V2, V2)] {
        let out = render_ok(&["nodeconfig", "--containerd-version", cv]);
        let wiring = SociWiring {
            address: SOCKET.into(),
            soci_root: "/var/lib/soci-snapshotter-grpc".into(),
        };
        assert_eq!(out, soci_agent::files::nodeconfig::render(version, &wiring));
        check_nodeconfig(&yaml(&out), table, "/var/lib/soci-snapshotter-grpc");
    }
    let out = render(&["nodeconfig", "--soci-root", "var/lib/soci"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--soci-root"), "{}", stderr(&out));
    assert_eq!(
        render(&["nodeconfig", "--containerd-version", "1.6"]).status.code(),
        Some(2)
    );
}

// ---- ec2nodeclass -----------------------------------------------------------

fn nodeclass_args(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "ec2nodeclass",
        "--cluster",
        "my-cluster",
        "--role",
        "KarpenterNodeRole-my-cluster",
    ]
    .map(String::from)
    .to_vec();
    a.extend(base_args());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn ec2nodeclass_fields_and_embedded_user_data() {
    let out = render_ok(&strs(&nodeclass_args(&[
        "--prefetch",
        "public.ecr.aws/docker/library/node:22",
    ])));
    let doc = yaml(&out);
    assert_eq!(s(&doc, &["apiVersion"]), "karpenter.k8s.aws/v1");
    assert_eq!(s(&doc, &["kind"]), "EC2NodeClass");
    assert_eq!(s(&doc, &["metadata", "name"]), "soci");
    let spec = get(&doc, &["spec"]);
    assert_eq!(s(spec, &["amiFamily"]), "AL2023");
    assert_eq!(s(&spec["amiSelectorTerms"][0], &["alias"]), "al2023@latest");
    assert_eq!(s(spec, &["role"]), "KarpenterNodeRole-my-cluster");
    for term in ["subnetSelectorTerms", "securityGroupSelectorTerms"] {
        assert_eq!(s(&spec[term][0], &["tags", "karpenter.sh/discovery"]), "my-cluster");
    }
    let bdm = &spec["blockDeviceMappings"][0];
    assert_eq!(s(bdm, &["deviceName"]), "/dev/xvda");
    let ebs = get(bdm, &["ebs"]);
    assert_eq!(s(ebs, &["volumeType"]), "gp3");
    assert_eq!(s(ebs, &["volumeSize"]), "100Gi");
    assert!(get(ebs, &["throughput"]).as_u64().unwrap() >= 600);
    assert_eq!(get(ebs, &["iops"]).as_u64(), Some(6000));
    assert_eq!(get(ebs, &["encrypted"]).as_bool(), Some(true));
    assert!(spec.get("instanceStorePolicy").is_none());

    let mut ud = vec!["userdata".to_string()];
    ud.extend(base_args());
    ud.extend(["--prefetch".into(), "public.ecr.aws/docker/library/node:22".into()]);
    let user_data = render_ok(&strs(&ud));
    assert_eq!(
        s(spec, &["userData"]),
        user_data,
        "spec.userData must be the rendered user data, byte for byte"
    );
    assert_eq!(mime_parts(s(spec, &["userData"])).len(), 2);
}

#[test]
fn ec2nodeclass_options() {
    let out = render_ok(&strs(&nodeclass_args(&[
        "--name",
        "soci-fast",
        "--ami-alias",
        "al2023@v20260714",
        "--ebs-throughput",
        "1000",
        "--ebs-iops",
        "4000",
        "--volume-size",
        "2Ti",
        "--instance-store-raid0",
    ])));
    let doc = yaml(&out);
    assert_eq!(s(&doc, &["metadata", "name"]), "soci-fast");
    assert_eq!(s(&doc["spec"]["amiSelectorTerms"][0], &["alias"]), "al2023@v20260714");
    let ebs = &doc["spec"]["blockDeviceMappings"][0]["ebs"];
    assert_eq!(ebs["throughput"].as_u64(), Some(1000));
    assert_eq!(ebs["iops"].as_u64(), Some(4000));
    assert_eq!(ebs["volumeSize"].as_str(), Some("2Ti"));
    assert_eq!(s(&doc, &["spec", "instanceStorePolicy"]), "RAID0");
}

#[test]
fn ec2nodeclass_refusals() {
    let cases: &[(&[&str], &str)] = &[
        (&["--ebs-throughput", "124"], "--ebs-throughput"),
        (&["--ebs-throughput", "1001"], "--ebs-throughput"),
        (&["--ebs-throughput", "1000", "--ebs-iops", "3000"], "--ebs-iops 4000"),
        (&["--ebs-iops", "20000"], "--ebs-iops"),
        (&["--volume-size", "10Gi"], "--volume-size"),
        (&["--volume-size", "100GB"], "--volume-size"),
        (&["--ami-alias", "al2@latest"], "--ami-alias"),
        (&["--name", "Not_A_Name"], "--name"),
    ];
    for (extra, want) in cases {
        let out = render(&strs(&nodeclass_args(extra)));
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert!(out.stdout.is_empty(), "{extra:?}: nothing on stdout");
        assert!(stderr(&out).contains(want), "{extra:?}: {}", stderr(&out));
    }
    let mut no_role = vec!["ec2nodeclass", "--cluster", "c"];
    let base = base_args();
    no_role.extend(strs(&base));
    let out = render(&no_role);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--role"), "{}", stderr(&out));
}

// ---- launch-template --------------------------------------------------------

const CLUSTER: &[&str] = &[
    "--cluster-name",
    "my-cluster",
    "--api-server-endpoint",
    "https://ABC.gr7.us-west-2.eks.amazonaws.com",
    "--certificate-authority",
    "TFMwdExTMUNSVWRKVGlCRFJWSlVTVVpKUTBGVVJTMHRMUzB0Q2c9PQ==",
    "--cidr",
    "10.100.0.0/16",
];

#[test]
fn launch_template_for_the_eks_ami_is_the_user_data() {
    let mut args = vec!["launch-template"];
    let base = base_args();
    args.extend(strs(&base));
    let out = render(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut ud = vec!["userdata"];
    ud.extend(strs(&base));
    assert_eq!(String::from_utf8_lossy(&out.stdout), render_ok(&ud));
    assert!(
        stderr(&out).contains("EKS merges its own NodeConfig"),
        "{}",
        stderr(&out)
    );

    let mut with_cluster = args.clone();
    with_cluster.extend(&CLUSTER[..2]);
    let out = render(&with_cluster);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("only with --custom-ami"), "{}", stderr(&out));
}

#[test]
fn launch_template_with_a_custom_ami_carries_the_cluster() {
    let base = base_args();
    let mut args = vec!["launch-template", "--custom-ami"];
    args.extend(strs(&base));
    for missing in 0..4 {
        let mut partial = args.clone();
        for (i, pair) in CLUSTER.chunks(2).enumerate() {
            if i != missing {
                partial.extend(pair);
            }
        }
        let out = render(&partial);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains(CLUSTER[missing * 2]), "{}", stderr(&out));
    }
    args.extend(CLUSTER);
    let out = render(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("custom AMI"), "{}", stderr(&out));
    let mime = String::from_utf8(out.stdout).unwrap();
    let parts = mime_parts(&mime);
    assert_eq!(
        types(&parts),
        [
            "application/node.eks.aws",
            "text/x-shellscript",
            "application/node.eks.aws"
        ]
    );
    let cluster = yaml(&parts[0].body);
    assert_eq!(s(&cluster, &["apiVersion"]), "node.eks.aws/v1alpha1");
    assert_eq!(s(&cluster, &["kind"]), "NodeConfig");
    for (key, i) in [
        ("name", 1),
        ("apiServerEndpoint", 3),
        ("certificateAuthority", 5),
        ("cidr", 7),
    ] {
        assert_eq!(s(&cluster, &["spec", "cluster", key]), CLUSTER[i]);
    }
    check_nodeconfig(&yaml(&parts[2].body), V3, "/var/lib/soci-snapshotter-grpc");

    for (i, bad) in [(1, "bad.name"), (3, "http://x"), (5, "not base64!"), (7, "10.0.0.0/40")] {
        let mut a = vec!["launch-template", "--custom-ami"];
        a.extend(strs(&base));
        let mut cluster = CLUSTER.to_vec();
        cluster[i] = bad;
        a.extend(cluster);
        let out = render(&a);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr(&out).contains(CLUSTER[i - 1]), "{}", stderr(&out));
    }
}

// ---- validation -------------------------------------------------------------

#[test]
fn invalid_values_are_exit_2_with_the_option_named() {
    each_invalid_value_is_refused_naming_its_option();
    a_non_https_agent_url_is_refused();
    one_agent_url_for_both_arches_is_refused_naming_arch();
    an_agent_digest_is_required();
}

fn each_invalid_value_is_refused_naming_its_option() {
    let cases: &[(&[&str], &str)] = &[
        (&["--agent-sha256-arm64", "xyz"], "--agent-sha256-arm64"),
        (&["--soci-sha256-amd64", &D0[1..]], "--soci-sha256-amd64"),
        (&["--soci-version", "0.10.0"], "--soci-version"),
        (&["--soci-version", "latest"], "--soci-version"),
        (
            &[
                "--max-concurrent-downloads",
                "4",
                "--max-concurrent-downloads-per-image",
                "8",
            ],
            "--max-concurrent-downloads-per-image",
        ),
        (
            &[
                "--max-concurrent-unpacks",
                "2",
                "--max-concurrent-unpacks-per-image",
                "3",
            ],
            "--max-concurrent-unpacks-per-image",
        ),
        (
            &["--concurrent-download-chunk-size", "16MiB"],
            "--concurrent-download-chunk-size",
        ),
        (&["--prefetch", "bad image"], "--prefetch"),
        (&["--prefetch", "x';reboot;'"], "--prefetch"),
        (&["--release-url", "file:///srv/soci"], "--release-url"),
        (&["--soci-root", "var/lib/soci"], "--soci-root"),
        (&["--discard-unpacked-layers", "maybe"], "--discard-unpacked-layers"),
        (&["--containerd-version", "3"], "--containerd-version"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["userdata"];
        let base = base_args();
        args.extend(strs(&base));
        args.extend(*extra);
        let out = render(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{extra:?}");
        assert!(stderr(&out).contains(want), "{extra:?}: {}", stderr(&out));
    }
}

fn a_non_https_agent_url_is_refused() {
    let out = render(&[
        "userdata",
        "--agent-url",
        "ftp://example.com/a",
        "--agent-sha256-amd64",
        D0,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--agent-url"), "{}", stderr(&out));
}

/// One URL for both arches would hand one binary to both: refused, naming {arch}.
fn one_agent_url_for_both_arches_is_refused_naming_arch() {
    let one_url = [
        "userdata",
        "--agent-url",
        "https://example.com/a",
        "--agent-sha256-amd64",
        D0,
    ];
    for kind in ["userdata", "ec2nodeclass"] {
        let mut args = one_url.to_vec();
        args[0] = kind;
        if kind == "ec2nodeclass" {
            args.extend(["--cluster", "c", "--role", "r"]);
        }
        args.extend(["--agent-sha256-arm64", D0]);
        let out = render(&args);
        assert_eq!(out.status.code(), Some(2), "{kind}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{kind}");
        let err = stderr(&out);
        assert!(err.contains("--agent-url") && err.contains("{arch}"), "{kind}: {err}");
    }
    // A single-arch render (one digest) may use a fixed URL.
    render_ok(&one_url);
}

fn an_agent_digest_is_required() {
    let out = render(&["userdata", "--agent-url", "https://example.com/a"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--agent-sha256-amd64 or --agent-sha256-arm64"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn oversize_user_data_is_refused_with_its_size() {
    let images: Vec<String> = (0..2000)
        .map(|i| format!("registry.example.com/team/app-{i}:v1"))
        .collect();
    for kind in ["userdata", "ec2nodeclass", "launch-template"] {
        let mut args: Vec<String> = if kind == "ec2nodeclass" {
            nodeclass_args(&[])
        } else {
            let mut a = vec![kind.to_string()];
            a.extend(base_args());
            a
        };
        for i in &images {
            args.extend(["--prefetch".to_string(), i.clone()]);
        }
        let out = render(&strs(&args));
        assert_eq!(out.status.code(), Some(2), "{kind}");
        assert!(out.stdout.is_empty());
        let err = stderr(&out);
        assert!(
            err.contains("16384 bytes") && err.contains("2000 --prefetch"),
            "{kind}: {err}"
        );
    }
    // Large but under the limit still renders, with a note on Karpenter's/EKS's headroom.
    let mut args = vec!["userdata".to_string()];
    args.extend(base_args());
    for i in &images[..180] {
        args.extend(["--prefetch".to_string(), i.clone()]);
    }
    let out = render(&strs(&args));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!((12 * 1024..=16384).contains(&out.stdout.len()), "{}", out.stdout.len());
    assert!(stderr(&out).contains("must still fit"), "{}", stderr(&out));
}

// ---- the rendered install arguments mean the same to install ----------------

/// The words of the `set -- '...' ...` line of a rendered script.
fn install_args(script: &str) -> Vec<String> {
    let line = script
        .lines()
        .find(|l| l.starts_with("set -- '"))
        .expect("a set -- line");
    shell_words(line.strip_prefix("set -- ").unwrap())
}

#[test]
fn rendered_install_arguments_parse_and_resolve_in_install() {
    let mut args = vec!["userdata".to_string()];
    args.extend(base_args());
    args.extend(
        [
            "--soci-version",
            "0.14.0",
            "--release-url",
            "http://mirror.local/soci/",
            "--soci-root",
            "/data/soci",
            "--max-concurrent-downloads",
            "-1",
            "--max-concurrent-downloads-per-image",
            "10",
            "--concurrent-download-chunk-size",
            "8mb",
            "--max-concurrent-unpacks",
            "6",
            "--max-concurrent-unpacks-per-image",
            "6",
            "--discard-unpacked-layers",
            "false",
        ]
        .map(String::from),
    );
    let out = render(&strs(&args));
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("plain http"), "{}", stderr(&out));
    let script = mime_parts(&String::from_utf8(out.stdout).unwrap()).remove(0).body;
    let root = tempfile::tempdir().unwrap();
    let s = install_settings_of(&script, root.path());
    assert_eq!(s.soci_version.to_string(), "0.14.0");
    assert_eq!(s.release_url, "http://mirror.local/soci");
    assert_eq!(s.soci_root, "/data/soci");
    assert_eq!(s.sha256.unwrap().as_str(), SOCI_AMD64);
    let t = s.tuning;
    assert_eq!(
        (
            t.max_concurrent_downloads,
            t.max_concurrent_downloads_per_image,
            t.concurrent_download_chunk_size.as_str(),
            t.max_concurrent_unpacks,
            t.max_concurrent_unpacks_per_image,
            t.discard_unpacked_layers
        ),
        (-1, 10, "8mb", 6, 6, false)
    );
}

/// The script's install arguments (and amd64's `--sha256`) parsed by install's own CLI under
/// `--root <root> --no-start --dry-run`, and resolved into its settings.
fn install_settings_of(script: &str, root: &Path) -> soci_agent::install::settings::InstallSettings {
    use clap::Parser;
    let mut words = install_args(script);
    words.push(format!("--sha256={SOCI_AMD64}"));
    let mut argv: Vec<String> = ["soci-agent", "install", "--no-start", "--dry-run", "--root"]
        .map(String::from)
        .to_vec();
    argv.push(root.display().to_string());
    argv.extend(words);
    let cli = soci_agent::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let soci_agent::cli::Command::Install(install) = cli.command else {
        panic!("not install")
    };
    soci_agent::install::settings::InstallSettings::resolve(&install).unwrap_or_else(|e| panic!("{e}"))
}

// ---- running the script -----------------------------------------------------

/// A loopback HTTP/1.1 server: path -> (body, 503s to send first).
struct Server {
    port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Server {
    fn start(routes: Vec<(String, Vec<u8>, usize)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let seen = hits.clone();
        let mut routes: HashMap<String, (Vec<u8>, usize)> =
            routes.into_iter().map(|(p, b, fails)| (p, (b, fails))).collect();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
                *seen.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                let (status, body) = match routes.get_mut(&path) {
                    Some((_, fails)) if *fails > 0 => {
                        *fails -= 1;
                        ("503 Service Unavailable", Vec::new())
                    }
                    Some((body, _)) => ("200 OK", body.clone()),
                    None => ("404 Not Found", Vec::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        Server { port, hits }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/dl/soci-agent-linux-{{arch}}", self.port)
    }

    fn hits(&self, arch: &str) -> usize {
        let path = format!("/dl/soci-agent-linux-{arch}");
        self.hits.lock().unwrap().get(&path).copied().unwrap_or(0)
    }
}

/// A fake agent that appends `---` and its argv (one per line) to $FAKE_AGENT_LOG.
fn fake_agent(arch: &str) -> Vec<u8> {
    format!("#!/bin/sh\n# fake soci-agent ({arch}) for tests/render.rs\nprintf '%s\\n' '---' \"$@\" >> \"$FAKE_AGENT_LOG\"\n")
        .into_bytes()
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A temp dir standing in for the node's paths.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn bin(&self) -> PathBuf {
        self.path("usr/local/bin/soci-agent")
    }
    fn config(&self) -> PathBuf {
        self.path("etc/soci-agent/config.toml")
    }
    /// Runs the script with dash (POSIX sh) where present, else sh.
    fn run(&self, script: &str, machine: &str) -> Output {
        let path = self.path("user-data.sh");
        std::fs::write(&path, script).unwrap();
        let shell = if Path::new("/usr/bin/dash").exists() || Path::new("/bin/dash").exists() {
            "dash"
        } else {
            "sh"
        };
        Command::new(shell)
            .arg(&path)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
            .env("SOCI_AGENT_BIN_DIR", self.path("usr/local/bin"))
            .env("SOCI_AGENT_CONFIG_DIR", self.path("etc/soci-agent"))
            .env("SOCI_AGENT_MACHINE", machine)
            .env("FAKE_AGENT_LOG", self.path("agent-argv.log"))
            .output()
            .unwrap()
    }
    /// Each recorded agent invocation's argv.
    fn invocations(&self) -> Vec<Vec<String>> {
        let Ok(log) = std::fs::read_to_string(self.path("agent-argv.log")) else {
            return Vec::new();
        };
        log.split("---\n")
            .skip(1)
            .map(|inv| inv.lines().map(String::from).collect())
            .collect()
    }
}

fn script_for(server: &Server, agent_digests: [Option<&str>; 2], extra: &[&str]) -> String {
    let mut args = vec!["userdata".to_string(), "--agent-url".into(), server.url()];
    for (arch, d) in ["amd64", "arm64"].iter().zip(agent_digests) {
        if let Some(d) = d {
            args.extend([format!("--agent-sha256-{arch}"), d.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mime = render_ok(&strs(&args));
    mime_parts(&mime).remove(0).body
}

fn real_digests() -> [String; 2] {
    [sha256_hex(&fake_agent("amd64")), sha256_hex(&fake_agent("arm64"))]
}

fn serve_agents(fails: usize) -> Server {
    Server::start(
        ["amd64", "arm64"]
            .iter()
            .map(|a| (format!("/dl/soci-agent-linux-{a}"), fake_agent(a), fails))
            .collect(),
    )
}

#[test]
fn script_downloads_verifies_installs_and_runs_install_idempotently() {
    let server = serve_agents(0);
    let [amd, arm] = real_digests();
    let script = script_for(
        &server,
        [Some(&amd), Some(&arm)],
        &[
            "--soci-sha256-amd64",
            SOCI_AMD64,
            "--soci-sha256-arm64",
            SOCI_ARM64,
            "--max-concurrent-unpacks-per-image",
            "8",
            "--prefetch",
            "public.ecr.aws/docker/library/python:3.12",
            "--prefetch",
            "123456789012.dkr.ecr.us-west-2.amazonaws.com/app@sha256:abcd",
        ],
    );
    let node = Node::new();
    first_run_installs_the_amd64_agent_and_runs_install(&server, &node, &script);
    assert_config_lists_the_prefetch_images(&node);
    let leftovers: Vec<_> = std::fs::read_dir(node.path("usr/local/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["soci-agent"], "no temp files left behind");
    second_run_downloads_nothing_and_runs_install_again(&server, &node, &script);
    on_arm64_the_same_script_fetches_the_arm64_agent(&server, &script);
}

/// The argv the amd64 agent is run with.
fn amd64_install_argv() -> Vec<String> {
    [
        "install",
        "--soci-version=0.16.1",
        "--max-concurrent-unpacks-per-image=8",
        &format!("--sha256={SOCI_AMD64}"),
    ]
    .map(String::from)
    .to_vec()
}

fn first_run_installs_the_amd64_agent_and_runs_install(server: &Server, node: &Node, script: &str) {
    let out = node.run(script, "x86_64");
    assert!(out.status.success(), "script failed: {}", stderr(&out));
    assert!(stderr(&out).contains("soci-agent-bootstrap: "), "logs carry a prefix");
    assert_eq!(server.hits("amd64"), 1);
    assert_eq!(server.hits("arm64"), 0);
    assert_eq!(std::fs::read(node.bin()).unwrap(), fake_agent("amd64"));
    assert_eq!(
        std::fs::metadata(node.bin()).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(node.invocations(), [amd64_install_argv()]);
}

fn assert_config_lists_the_prefetch_images(node: &Node) {
    let config = std::fs::read_to_string(node.config()).unwrap();
    assert!(config.starts_with(soci_agent::render::CONFIG_MARKER));
    let doc: toml_edit::DocumentMut = config.parse().unwrap();
    let images: Vec<&str> = doc["prefetch"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        images,
        [
            "public.ecr.aws/docker/library/python:3.12",
            "123456789012.dkr.ecr.us-west-2.amazonaws.com/app@sha256:abcd"
        ]
    );
}

/// Second run: nothing downloaded, config untouched, install run again.
fn second_run_downloads_nothing_and_runs_install_again(server: &Server, node: &Node, script: &str) {
    let mtime = std::fs::metadata(node.config()).unwrap().modified().unwrap();
    let bin_mtime = std::fs::metadata(node.bin()).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let out = node.run(script, "x86_64");
    assert!(out.status.success(), "second run failed: {}", stderr(&out));
    assert_eq!(
        server.hits("amd64"),
        1,
        "a verified binary in place is not downloaded again"
    );
    assert_eq!(std::fs::metadata(node.config()).unwrap().modified().unwrap(), mtime);
    assert_eq!(std::fs::metadata(node.bin()).unwrap().modified().unwrap(), bin_mtime);
    assert_eq!(node.invocations().len(), 2);
    assert_eq!(node.invocations()[1], amd64_install_argv());
}

/// The same script on arm64 fetches the arm64 agent and pins arm64's SOCI.
fn on_arm64_the_same_script_fetches_the_arm64_agent(server: &Server, script: &str) {
    let node = Node::new();
    let out = node.run(script, "aarch64");
    assert!(out.status.success(), "arm64: {}", stderr(&out));
    assert_eq!(server.hits("arm64"), 1);
    assert_eq!(std::fs::read(node.bin()).unwrap(), fake_agent("arm64"));
    assert_eq!(node.invocations()[0].last().unwrap(), &format!("--sha256={SOCI_ARM64}"));
}

#[test]
fn script_refuses_a_binary_with_the_wrong_digest() {
    let server = serve_agents(0);
    let [_, arm] = real_digests();
    // amd64 pinned to arm64's digest: the download does not match.
    let script = script_for(&server, [Some(&arm), None], &[]);
    let node = Node::new();
    let out = node.run(&script, "x86_64");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("sha256 mismatch"), "{}", stderr(&out));
    assert_eq!(server.hits("amd64"), 1);
    assert!(node.invocations().is_empty(), "the unverified agent must never run");
    assert!(!node.bin().exists(), "nothing installed");
    let left = std::fs::read_dir(node.path("usr/local/bin")).unwrap().count();
    assert_eq!(left, 0, "the download is removed");

    // A tampered binary already in place is replaced by a verified download.
    let [amd, _] = real_digests();
    let script = script_for(&server, [Some(&amd), None], &[]);
    std::fs::write(node.bin(), b"#!/bin/sh\necho tampered > \"$FAKE_AGENT_LOG.tampered\"\n").unwrap();
    std::fs::set_permissions(node.bin(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = node.run(&script, "x86_64");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(node.bin()).unwrap(), fake_agent("amd64"));
    assert!(!node.path("agent-argv.log.tampered").exists());
    assert_eq!(node.invocations().len(), 1);
}

#[test]
fn script_refuses_an_arch_without_a_digest_and_unknown_arches() {
    let server = serve_agents(0);
    let [amd, _] = real_digests();
    let script = script_for(&server, [Some(&amd), None], &[]);
    for machine in ["aarch64", "riscv64"] {
        let node = Node::new();
        let out = node.run(&script, machine);
        assert_eq!(out.status.code(), Some(1), "{machine}");
        assert!(node.invocations().is_empty());
        assert!(!node.bin().exists());
    }
    assert_eq!(server.hits("arm64"), 0, "nothing is downloaded without a digest");
}

#[test]
fn script_retries_transient_http_errors() {
    let server = serve_agents(1);
    let [amd, arm] = real_digests();
    let script = script_for(&server, [Some(&amd), Some(&arm)], &[]);
    let node = Node::new();
    let out = node.run(&script, "x86_64");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.hits("amd64"), 2, "one 503, then the retry");
    assert_eq!(node.invocations().len(), 1);
}

#[test]
fn script_leaves_a_foreign_config_alone_and_propagates_install_failure() {
    let server = serve_agents(0);
    let [amd, _] = real_digests();
    let script = script_for(&server, [Some(&amd), None], &["--prefetch", "a.example.com/x:1"]);
    let node = Node::new();
    std::fs::create_dir_all(node.path("etc/soci-agent")).unwrap();
    let foreign = "[install]\nsoci_version = \"0.14.0\"\n";
    std::fs::write(node.config(), foreign).unwrap();
    let out = node.run(&script, "x86_64");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(node.config()).unwrap(), foreign);
    assert!(stderr(&out).contains("leaving it alone"), "{}", stderr(&out));

    // An agent that fails: the script exits with the agent's code.
    let failing = b"#!/bin/sh\nexit 3\n".to_vec();
    let server = Server::start(vec![("/dl/soci-agent-linux-amd64".into(), failing.clone(), 0)]);
    let script = script_for(&server, [Some(&sha256_hex(&failing)), None], &[]);
    let node = Node::new();
    let out = node.run(&script, "x86_64");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("soci-agent install failed (exit 3)"),
        "{}",
        stderr(&out)
    );
}

// ---- golden examples --------------------------------------------------------

/// Splits a command line into words: whitespace-separated, `'...'` quoted.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    cur.push(q);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '"' | '\\' | '$' | '`' => panic!("unsupported shell syntax in {line:?}"),
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// `(render args, output path)` for each command in userdata/README.md's
/// "Commands behind the examples" block.
fn readme_commands() -> Vec<(Vec<String>, String)> {
    let readme = std::fs::read_to_string(manifest_dir().join("userdata/README.md")).unwrap();
    let block = readme
        .split("## Commands behind the examples")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("\n```").next())
        .expect("a ```sh block under \"Commands behind the examples\"");
    block
        .replace("\\\n", " ")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let w = shell_words(l);
            let n = w.len();
            assert!(n > 4 && w[0] == "soci-agent" && w[1] == "render", "{l}");
            assert_eq!(w[n - 2], ">", "{l}");
            (w[2..n - 2].to_vec(), w[n - 1].clone())
        })
        .collect()
}

#[test]
fn golden_examples_match_the_readme_commands() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let commands = readme_commands();
    assert!(commands.len() >= 6);
    let drift: Vec<String> = commands
        .iter()
        .filter_map(|(args, target)| golden_drift(args, target, update))
        .collect();
    assert!(
        drift.is_empty(),
        "examples drifted (UPDATE_GOLDEN=1 cargo test --test render rewrites them):\n{}",
        drift.join("\n")
    );
    every_example_file_comes_from_a_command(&commands);
    the_examples_parse_with_the_right_parts();
}

/// Runs one README command; with `update`, writes its output to `target`, else names how the
/// output differs from `target` (None when equal).
fn golden_drift(args: &[String], target: &str, update: bool) -> Option<String> {
    assert!(
        target.starts_with("userdata/examples/") || target.starts_with("nodeconfig/examples/"),
        "{target}"
    );
    let mut argv = vec!["render"];
    argv.extend(strs(args));
    let out = Command::new(BIN)
        .args(&argv)
        .current_dir(manifest_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{argv:?}: {}", stderr(&out));
    let path = manifest_dir().join(target);
    if update {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &out.stdout).unwrap();
        return None;
    }
    let expected = std::fs::read(&path).unwrap_or_default();
    if expected == out.stdout {
        return None;
    }
    let got = String::from_utf8_lossy(&out.stdout);
    let want = String::from_utf8_lossy(&expected);
    let line = got
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(got.lines().count().min(want.lines().count()));
    Some(format!(
        "{target}: differs from `soci-agent {}` at line {}",
        argv.join(" "),
        line + 1
    ))
}

/// Every example file comes from a command.
fn every_example_file_comes_from_a_command(commands: &[(Vec<String>, String)]) {
    for dir in ["userdata/examples", "nodeconfig/examples"] {
        for e in std::fs::read_dir(manifest_dir().join(dir)).unwrap() {
            let name = format!("{dir}/{}", e.unwrap().file_name().to_string_lossy());
            assert!(
                commands.iter().any(|(_, t)| *t == name),
                "{name} has no command in userdata/README.md"
            );
        }
    }
}

/// And they are what they claim: parseable, the right parts.
fn the_examples_parse_with_the_right_parts() {
    let read = |p: &str| std::fs::read_to_string(manifest_dir().join(p)).unwrap();
    assert_eq!(
        types(&mime_parts(&read("userdata/examples/userdata.mime"))),
        ["text/x-shellscript", "application/node.eks.aws"]
    );
    let nc = yaml(&read("userdata/examples/ec2nodeclass.yaml"));
    mime_parts(s(&nc, &["spec", "userData"]));
    check_nodeconfig(
        &yaml(&read("nodeconfig/examples/50-soci-agent-containerd-1.7.yaml")),
        V2,
        "/var/lib/soci-snapshotter-grpc",
    );
}

#[test]
fn shell_words_splits_like_sh() {
    assert_eq!(shell_words("a 'b c'  d'e'"), ["a", "b c", "de"]);
    assert_eq!(shell_words("'' x"), ["", "x"]);
}
