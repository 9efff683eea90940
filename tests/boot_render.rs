//! Rendered seeds and domain XML: golden files, and every domain checked by
//! `virt-xml-validate` (libvirt's own schema).

#[path = "boot_fixture.rs"]
mod fixture;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use kthw_lab::host::accel::Accel;
use kthw_lab::host::libvirt::parse_domain_xml;
use kthw_lab::render::cloudinit::{render_seed, SeedKeys};
use kthw_lab::render::domain::{render_domain, Boot, DomainError, DomainOptions, SeedKind};

const KEYS: SeedKeys = SeedKeys {
    user_public: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeUserKeyForGoldenFilesOnly0000000000000 kthw@kthw-lab-golden",
    host_private: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAFAKEFAKEFAKE\nFAKEFAKEFAKE==\n-----END OPENSSH PRIVATE KEY-----\n",
    host_public: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKeyForGoldenFilesOnly0000000000000 root@golden-m1",
};

fn state_dir() -> PathBuf {
    PathBuf::from("/var/lib/kthw-lab")
}

fn direct(accel: Accel) -> DomainOptions {
    DomainOptions {
        accel,
        boot: Boot::DirectKernel {
            kernel: "/var/cache/kthw-lab/images/kthw-debian12/vmlinuz".into(),
            initrd: "/var/cache/kthw-lab/images/kthw-debian12/initrd.img".into(),
            extra_cmdline: String::new(),
        },
        seed: SeedKind::Fat,
    }
}

fn validate(xml: &str, what: &str) {
    let validate = support::require("virt-xml-validate", "libvirt-clients");
    // virt-xml-validate runs xmllint.
    support::require("xmllint", "libxml2-utils");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    let out = Command::new(validate)
        .arg(&f)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virt-xml-validate rejected {what}:\n{}{}\n{xml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cloudinit_seed_golden() {
    let plan = fixture::lab_plan("golden", 1, 1, 768, &state_dir());
    let node = plan.node("m1").unwrap();
    let seed = render_seed(&plan, node, &KEYS);
    support::golden("cloudinit/golden-m1/meta-data", &seed.meta_data);
    support::golden("cloudinit/golden-m1/network-config", &seed.network_config);
    support::golden("cloudinit/golden-m1/user-data", &seed.user_data);
}

#[test]
fn cloudinit_seed_content() {
    let plan = fixture::lab_plan("golden", 2, 2, 768, &state_dir());
    for node in &plan.nodes {
        let seed = render_seed(&plan, node, &KEYS);
        assert!(seed.user_data.starts_with("#cloud-config\n"));
        // The NIC is matched by the planned MAC and gets the planned address.
        assert!(seed
            .network_config
            .contains(&format!("macaddress: \"{}\"", node.mac)));
        assert!(seed.network_config.contains(&format!("\"{}/24\"", node.ip)));
        assert!(seed.network_config.contains("gateway4: \"10.200.1.1\""));
        // Every node and the LB are in /etc/hosts.
        for other in &plan.nodes {
            assert!(seed
                .user_data
                .contains(&format!("{}\t{}\n", other.ip, other.name)));
        }
        assert!(seed.user_data.contains("10.200.1.15\tlb\n"));
        assert!(seed.user_data.contains("ssh_keys:\n  ed25519_private: |\n"));
        assert!(!seed.user_data.contains("ssh_pwauth"));
        assert!(seed.user_data.contains("locale: false"));
        assert!(seed
            .meta_data
            .contains(&format!("local-hostname: \"{}\"", node.name)));
    }
    // Instance ids differ per node and follow the content.
    let a = render_seed(&plan, &plan.nodes[0], &KEYS).meta_data;
    let b = render_seed(&plan, &plan.nodes[1], &KEYS).meta_data;
    assert_ne!(a, b);
    let mut keys2 = KEYS;
    keys2.user_public = "ssh-ed25519 AAAAother";
    assert_ne!(a, render_seed(&plan, &plan.nodes[0], &keys2).meta_data);
}

#[test]
fn domain_tcg_direct_kernel_golden_and_valid() {
    let plan = fixture::lab_plan("golden", 1, 1, 768, &state_dir());
    for node in &plan.nodes {
        let xml = render_domain(&plan, node, &direct(Accel::Tcg)).unwrap();
        support::golden(&format!("domain/golden-{}-tcg.xml", node.name), &xml);
        validate(&xml, &node.domain);
        assert!(xml.contains("<domain type=\"qemu\">"));
        assert!(xml.contains("<tb-cache unit=\"MiB\">256</tb-cache>"));
        let parsed = parse_domain_xml(&xml).unwrap();
        assert_eq!(parsed.name, node.domain);
        let m = parsed.marker.unwrap();
        assert_eq!(
            (m.lab.as_str(), m.node.as_str()),
            ("golden", node.name.as_str())
        );
        assert_eq!(m.role, node.role.as_str());
        assert_eq!(m.digest.len(), 64);
        assert_eq!(
            parsed.disk_files,
            vec![node.disk_path.clone(), node.seed_path.clone()]
        );
    }
}

#[test]
fn domain_kvm_firmware_iso_golden_and_valid() {
    let plan = fixture::lab_plan("golden", 1, 1, 768, &state_dir());
    let node = plan.node("n1").unwrap();
    let opts = DomainOptions {
        accel: Accel::Kvm,
        boot: Boot::Firmware,
        seed: SeedKind::Iso,
    };
    let xml = render_domain(&plan, node, &opts).unwrap();
    support::golden("domain/golden-n1-kvm-firmware.xml", &xml);
    validate(&xml, "kvm firmware domain");
    assert!(xml.contains("<domain type=\"kvm\">"));
    assert!(!xml.contains("tb-cache"));
    assert!(xml.contains("device=\"cdrom\""));
}

#[test]
fn domain_digest_follows_content() {
    let plan = fixture::lab_plan("golden", 1, 1, 768, &state_dir());
    let mut plan2 = plan.clone();
    plan2.nodes[0].memory_mib = 1024;
    let d = |p: &kthw_lab::plan::LabPlan| {
        let xml = render_domain(p, &p.nodes[0], &direct(Accel::Tcg)).unwrap();
        parse_domain_xml(&xml).unwrap().marker.unwrap().digest
    };
    assert_eq!(d(&plan), d(&plan));
    assert_ne!(d(&plan), d(&plan2));
}

#[test]
fn relative_paths_are_refused() {
    let plan = fixture::lab_plan("golden", 1, 1, 768, Path::new("relative/state"));
    let err = render_domain(&plan, &plan.nodes[0], &direct(Accel::Tcg)).unwrap_err();
    assert!(matches!(err, DomainError::RelativePath { .. }), "{err}");
    assert!(err.to_string().starts_with("domain `golden-m1`"));
    assert!(!err.hint().is_empty());
}
