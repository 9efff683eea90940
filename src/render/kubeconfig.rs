//! Kubeconfig files with the CA, client certificate and key embedded (base64), so one
//! file is all a component or the user needs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// A YAML double-quoted scalar: safe for any name (`system:node:n1`, `@`, spaces).
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What goes into one kubeconfig.
#[derive(Debug, Clone, Copy)]
pub struct KubeconfigInput<'a> {
    /// Cluster name (the plan's `cluster.name`).
    pub cluster: &'a str,
    /// API server URL, e.g. `https://10.200.1.15:6443`.
    pub server: &'a str,
    /// User name: the client certificate's CN, e.g. `system:node:n1`.
    pub user: &'a str,
    pub ca_pem: &'a str,
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// The context name of a kubeconfig: `USER@CLUSTER`.
pub fn context_name(cluster: &str, user: &str) -> String {
    format!("{user}@{cluster}")
}

/// Render a kubeconfig (apiVersion v1, kind Config) with one cluster, user and context,
/// the context current. Deterministic: same input, same bytes.
pub fn render(k: &KubeconfigInput<'_>) -> String {
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    let cluster = yaml_quote(k.cluster);
    let user = yaml_quote(k.user);
    let context = yaml_quote(&context_name(k.cluster, k.user));
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {context}
  context:
    cluster: {cluster}
    user: {user}
current-context: {context}
preferences: {{}}
",
        server = yaml_quote(k.server),
        ca = b64(k.ca_pem),
        cert = b64(k.cert_pem),
        key = b64(k.key_pem),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_what_yaml_would_misread() {
        assert_eq!(yaml_quote("system:node:n1"), "\"system:node:n1\"");
        assert_eq!(yaml_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn embeds_base64_and_quotes_names() {
        let text = render(&KubeconfigInput {
            cluster: "lab",
            server: "https://127.0.0.1:6443",
            user: "system:node:n1",
            ca_pem: "CA",
            cert_pem: "CERT",
            key_pem: "KEY",
        });
        assert!(text.contains("certificate-authority-data: Q0E=\n"));
        assert!(text.contains("client-key-data: S0VZ\n"));
        assert!(text.contains("current-context: \"system:node:n1@lab\"\n"));
        let v: serde_json::Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(v["users"][0]["name"], "system:node:n1");
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
    }
}
