//! kubelet wiring outside nodeadm: a KubeletConfiguration drop-in setting
//! `imageServiceEndpoint` to the SOCI socket (SOCI's CRI keychain proxies
//! image pulls and keeps the credentials kubelet sends). Pure.

/// The drop-in (JSON, which kubelet's drop-in loader accepts).
pub fn dropin(image_service_endpoint: &str) -> String {
    let v = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "imageServiceEndpoint": image_service_endpoint,
    });
    let mut s = serde_json::to_string_pretty(&v).expect("static JSON");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn dropin_is_a_kubelet_configuration() {
        let v: serde_json::Value = serde_json::from_str(&super::dropin("unix:///run/x.sock")).unwrap();
        assert_eq!(v["kind"], "KubeletConfiguration");
        assert_eq!(v["apiVersion"], "kubelet.config.k8s.io/v1beta1");
        assert_eq!(v["imageServiceEndpoint"], "unix:///run/x.sock");
    }
}
