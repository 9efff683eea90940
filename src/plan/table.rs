//! The human view of a plan.

use std::fmt::Write;

use super::LabPlan;

/// Rows as fixed-width columns (the last column is not padded).
pub fn rows_to_text(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{:<w$}  ", cell, w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn render_table(p: &LabPlan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lab {}{}",
        p.lab,
        p.description
            .as_ref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default()
    );
    let n = &p.network;
    let uplink = n
        .uplink
        .clone()
        .unwrap_or_else(|| "default-route interface".into());
    let nat = if n.nat {
        format!("NAT out of {uplink}")
    } else {
        "no NAT".into()
    };
    let kv = vec![
        vec![
            "network".into(),
            format!(
                "bridge {} {} gateway {} ({nat})",
                n.bridge, n.subnet, n.gateway
            ),
        ],
        vec![
            "api".into(),
            format!(
                "{} via load balancer {} -> {}",
                p.load_balancer.endpoint,
                p.load_balancer.name,
                p.load_balancer.backends.join(" ")
            ),
        ],
        vec![
            "services".into(),
            format!(
                "{}  API service IP {}  DNS {}  domain {}",
                p.cluster.service_cidr,
                p.cluster.api_service_ip,
                p.cluster.dns_service_ip,
                p.cluster.domain
            ),
        ],
        vec![
            "pods".into(),
            format!(
                "{} (one /{} per worker)",
                p.cluster.pod_cidr, p.cluster.node_pod_prefix
            ),
        ],
        vec![
            "image".into(),
            format!(
                "{}  accelerator {}  ssh user {}",
                p.image,
                plain_word(&p.accelerator),
                p.ssh_user
            ),
        ],
        vec!["state".into(), p.paths.root.display().to_string()],
    ];
    out.push_str(&rows_to_text(&kv));
    out.push('\n');
    let mut rows = vec![vec![
        "NAME".into(),
        "ROLE".into(),
        "IP".into(),
        "MAC".into(),
        "POD CIDR".into(),
        "VCPU".into(),
        "MEMORY".into(),
        "DISK".into(),
        "DOMAIN".into(),
    ]];
    for node in &p.nodes {
        rows.push(vec![
            node.name.clone(),
            node.role.as_str().into(),
            node.ip.to_string(),
            node.mac.clone(),
            node.pod_cidr
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            node.vcpus.to_string(),
            format!("{} MiB", node.memory_mib),
            format!("{} GiB", node.disk_gib),
            node.domain.clone(),
        ]);
    }
    rows.push(vec![
        p.load_balancer.name.clone(),
        "load-balancer".into(),
        p.load_balancer.address.to_string(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "(on the host)".into(),
    ]);
    rows.push(vec![
        "gateway".into(),
        "gateway".into(),
        p.network.gateway.to_string(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        format!("(bridge {})", p.network.bridge),
    ]);
    out.push_str(&rows_to_text(&rows));
    out.push('\n');
    let mut certs = vec![vec!["CERTIFICATE".into(), "SUBJECT".into(), "SANS".into()]];
    for c in &p.certificates {
        let subject = match &c.organization {
            Some(o) => format!("CN={}, O={}", c.common_name, o),
            None => format!("CN={}", c.common_name),
        };
        let mut sans: Vec<String> = c.dns_names.clone();
        sans.extend(c.ip_addresses.iter().map(|i| i.to_string()));
        certs.push(vec![
            c.name.clone(),
            subject,
            if sans.is_empty() {
                "-".into()
            } else {
                sans.join(",")
            },
        ]);
    }
    out.push_str(&rows_to_text(&certs));
    out
}

/// A serde unit variant as its plain word (e.g. `Accelerator::Auto` → "auto").
pub fn plain_word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
