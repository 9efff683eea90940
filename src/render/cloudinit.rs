//! cloud-init NoCloud seed files for one node: `meta-data`, `network-config` (v2) and
//! `user-data` (`#cloud-config`). Pure text; [`crate::host::seed`] writes them to disk.
//!
//! The node's SSH host key is pre-generated and handed in, so the host key is pinned from
//! the very first connection: cloud-init installs it (`ssh_keys`) and deletes nothing.
//! `ssh_pwauth` is deliberately absent: setting it makes cloud-init restart sshd in its
//! config stage, after the first login already worked (the image disables password
//! logins in sshd_config.d instead).

use sha2::{Digest, Sha256};

use crate::plan::{LabPlan, NodePlan};

/// The keys that go into one node's seed, in OpenSSH text form.
#[derive(Debug, Clone, Copy)]
pub struct SeedKeys<'a> {
    /// The lab user's public key (`ssh-ed25519 AAAA... comment`).
    pub user_public: &'a str,
    /// The node's host private key (`-----BEGIN OPENSSH PRIVATE KEY-----...`).
    pub host_private: &'a str,
    /// The node's host public key (`ssh-ed25519 AAAA...`).
    pub host_public: &'a str,
}

/// The files of a node's seed: the three NoCloud files at the root, and the same facts
/// as plain files in the [`KTHW_DIR`] directory for images whose initrd applies them
/// directly (`first_boot: kthw-seed`, no cloud-init at boot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub network_config: String,
    pub user_data: String,
    /// (file name inside [`KTHW_DIR`], content), in a fixed order.
    pub kthw: Vec<(&'static str, String)>,
}

/// The seed directory read by the offline image's initrd (`images/kthw-debian12`).
pub const KTHW_DIR: &str = "kthw";

impl SeedFiles {
    /// (path on the CIDATA volume, content): the NoCloud files at the root, then the
    /// `kthw/` files.
    pub fn entries(&self) -> Vec<(String, &str)> {
        let mut out = vec![
            ("meta-data".to_string(), self.meta_data.as_str()),
            ("network-config".to_string(), self.network_config.as_str()),
            ("user-data".to_string(), self.user_data.as_str()),
        ];
        for (name, content) in &self.kthw {
            out.push((format!("{KTHW_DIR}/{name}"), content.as_str()));
        }
        out
    }
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("string serializes")
}

/// A YAML literal block (`|`) indented by `indent` spaces.
fn block(text: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::from("|\n");
    for line in text.trim_end_matches('\n').lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&pad);
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `/etc/hosts` of every node: loopback, the load balancer and every node of the lab.
pub fn render_etc_hosts(plan: &LabPlan) -> String {
    let mut out = String::from(
        "# written by kthw-lab from the lab plan\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    out.push_str(&format!(
        "{}\t{}\n",
        plan.load_balancer.address, plan.load_balancer.name
    ));
    for n in &plan.nodes {
        out.push_str(&format!("{}\t{}\n", n.ip, n.name));
    }
    out
}

/// `/etc/resolv.conf` of every node: the lab's DNS servers.
pub fn render_resolv_conf(plan: &LabPlan) -> String {
    plan.network
        .dns
        .iter()
        .map(|d| format!("nameserver {d}\n"))
        .collect()
}

/// `network-config`, version 2: the planned static address on the NIC with the planned MAC.
/// The interface is named `eth0` (`set-name`; the kernel also gets `net.ifnames=0`).
pub fn render_network_config(plan: &LabPlan, node: &NodePlan) -> String {
    let net = &plan.network;
    let dns: Vec<String> = net.dns.iter().map(|d| q(&d.to_string())).collect();
    format!(
        "version: 2\n\
         ethernets:\n\
         \x20 eth0:\n\
         \x20   match:\n\
         \x20     macaddress: {mac}\n\
         \x20   set-name: eth0\n\
         \x20   dhcp4: false\n\
         \x20   dhcp6: false\n\
         \x20   addresses: [{addr}]\n\
         \x20   gateway4: {gw}\n\
         \x20   nameservers:\n\
         \x20     addresses: [{dns}]\n",
        mac = q(&node.mac),
        addr = q(&format!("{}/{}", node.ip, net.subnet.prefix())),
        gw = q(&net.gateway.to_string()),
        dns = dns.join(", "),
    )
}

/// `user-data`: the lab user with its key and passwordless sudo, the pinned host key,
/// `/etc/hosts`, and nothing cloud-init does not need to do.
pub fn render_user_data(plan: &LabPlan, node: &NodePlan, keys: &SeedKeys) -> String {
    let hosts = render_etc_hosts(plan);
    let resolv = render_resolv_conf(plan);
    let mut y = String::from("#cloud-config\n");
    y.push_str(&format!("hostname: {}\n", q(&node.name)));
    y.push_str("preserve_hostname: false\n");
    y.push_str("manage_etc_hosts: false\n");
    y.push_str("locale: false\n");
    y.push_str("disable_root: true\n");
    y.push_str("users:\n");
    y.push_str(&format!("  - name: {}\n", q(&plan.ssh_user)));
    y.push_str("    shell: /bin/bash\n");
    y.push_str("    lock_passwd: true\n");
    y.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    y.push_str("    ssh_authorized_keys:\n");
    y.push_str(&format!("      - {}\n", q(keys.user_public.trim())));
    y.push_str("ssh_deletekeys: false\n");
    // Only used when `ssh_keys` is absent; ed25519 keeps the schema happy (minItems 1)
    // and could never replace the given key (cloud-init skips existing key files).
    y.push_str("ssh_genkeytypes: [ed25519]\n");
    y.push_str("ssh_keys:\n");
    y.push_str(&format!(
        "  ed25519_private: {}",
        block(keys.host_private, 4)
    ));
    y.push_str(&format!(
        "  ed25519_public: {}\n",
        q(keys.host_public.trim())
    ));
    y.push_str("write_files:\n");
    y.push_str("  - path: /etc/hosts\n");
    y.push_str("    permissions: \"0644\"\n");
    y.push_str(&format!("    content: {}", block(&hosts, 6)));
    y.push_str("  - path: /etc/resolv.conf\n");
    y.push_str("    permissions: \"0644\"\n");
    y.push_str(&format!("    content: {}", block(&resolv, 6)));
    y
}

/// `meta-data`: instance-id and hostname. The instance-id carries a digest of the other
/// two files, so a changed seed is applied again on the next boot and an unchanged one is not.
pub fn render_meta_data(node: &NodePlan, network_config: &str, user_data: &str) -> String {
    let mut h = Sha256::new();
    h.update(network_config.as_bytes());
    h.update(b"\0");
    h.update(user_data.as_bytes());
    let digest = hex::encode(h.finalize());
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&format!("{}-{}", node.domain, &digest[..12])),
        q(&node.name)
    )
}

/// The systemd-networkd unit of the lean first boot: the same static address, gateway
/// and DNS as `network-config`, on the NIC with the planned MAC.
pub fn render_networkd(plan: &LabPlan, node: &NodePlan) -> String {
    let net = &plan.network;
    let mut out = format!(
        "# written by kthw-lab from the lab plan\n\
         [Match]\n\
         MACAddress={mac}\n\n\
         [Network]\n\
         Address={ip}/{prefix}\n\
         Gateway={gw}\n",
        mac = node.mac,
        ip = node.ip,
        prefix = net.subnet.prefix(),
        gw = net.gateway,
    );
    for d in &net.dns {
        out.push_str(&format!("DNS={d}\n"));
    }
    out.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
    out
}

/// The `kthw/` files: what the image's `kthw-apply-seed` installs, one fact per file.
/// `mac`, `address` (with its prefix) and `gateway` are what the initrd gives the NIC
/// before systemd starts; `eth0.network` says the same to systemd-networkd, for an
/// image that runs it.
pub fn render_kthw_files(
    plan: &LabPlan,
    node: &NodePlan,
    keys: &SeedKeys,
) -> Vec<(&'static str, String)> {
    let resolv = render_resolv_conf(plan);
    let line = |s: &str| format!("{}\n", s.trim());
    let net = &plan.network;
    vec![
        ("hostname", line(&node.name)),
        ("hosts", render_etc_hosts(plan)),
        ("resolv.conf", resolv),
        ("mac", line(&node.mac)),
        (
            "address",
            line(&format!("{}/{}", node.ip, net.subnet.prefix())),
        ),
        ("gateway", line(&net.gateway.to_string())),
        ("eth0.network", render_networkd(plan, node)),
        ("user", line(&plan.ssh_user)),
        ("authorized_keys", line(keys.user_public)),
        ("ssh_host_ed25519_key", line(keys.host_private)),
        ("ssh_host_ed25519_key.pub", line(keys.host_public)),
    ]
}

/// Every seed file of one node.
pub fn render_seed(plan: &LabPlan, node: &NodePlan, keys: &SeedKeys) -> SeedFiles {
    let network_config = render_network_config(plan, node);
    let user_data = render_user_data(plan, node, keys);
    let meta_data = render_meta_data(node, &network_config, &user_data);
    SeedFiles {
        meta_data,
        network_config,
        user_data,
        kthw: render_kthw_files(plan, node, keys),
    }
}
