//! libvirt domain XML for one node, written with quick-xml's writer.
//!
//! The domain carries an ownership marker in its `<metadata>`:
//! `<kthw:lab xmlns:kthw="https://kthw-lab.dev/xmlns/1" name="LAB" role="controller"
//! node="m1" digest="..."/>`. Teardown finds a lab's domains by that marker, never by
//! name; `digest` (sha256 of the XML rendered without it) lets `ensure_domain` tell an
//! unchanged definition from a changed one.

use std::io;
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesDecl, BytesText, Event};
use quick_xml::Writer;
use sha2::{Digest, Sha256};

use crate::host::accel::Accel;
use crate::plan::{LabPlan, NodePlan};

/// Namespace URI of the ownership marker.
pub const METADATA_NS: &str = "https://kthw-lab.dev/xmlns/1";
/// Prefix used for it in rendered XML.
pub const METADATA_PREFIX: &str = "kthw";
/// Translation block cache under TCG: brings qemu's RSS from ~1.3 GB to ~650 MB.
pub const TCG_TB_CACHE_MIB: u64 = 256;

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// libvirt loads kernel and initrd itself; the disk is a plain filesystem.
    DirectKernel {
        kernel: PathBuf,
        initrd: PathBuf,
        /// Extra kernel arguments after the fixed `root=/dev/vda rw console=ttyS0 ...`.
        extra_cmdline: String,
    },
    /// BIOS firmware boots the disk's own bootloader (stock cloud images).
    Firmware,
}

/// The seed volume's format: a FAT disk image or an ISO 9660 image (attached as a cdrom).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedKind {
    Fat,
    Iso,
}

/// Everything about one domain that is not in the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainOptions {
    pub accel: Accel,
    pub boot: Boot,
    pub seed: SeedKind,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain `{domain}`: {what} path is not absolute: {path}")]
    RelativePath {
        domain: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error("domain `{domain}`: cannot write the domain xml")]
    Write {
        domain: String,
        #[source]
        source: io::Error,
    },
}

impl DomainError {
    pub fn hint(&self) -> String {
        match self {
            DomainError::RelativePath { .. } => {
                "libvirt resolves paths in its own working directory: give the state dir and image cache as absolute paths".into()
            }
            DomainError::Write { .. } => "this is a bug in kthw-lab: please report it".into(),
        }
    }
}

/// The fixed kernel command line of direct-kernel boot.
pub fn kernel_cmdline(extra: &str) -> String {
    let base = "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0";
    if extra.trim().is_empty() {
        base.to_string()
    } else {
        format!("{base} {}", extra.trim())
    }
}

/// Render the domain XML of `node`.
pub fn render_domain(
    plan: &LabPlan,
    node: &NodePlan,
    opts: &DomainOptions,
) -> Result<String, DomainError> {
    let mut paths: Vec<(&'static str, &Path)> = vec![
        ("disk", &node.disk_path),
        ("seed", &node.seed_path),
        ("console log", &node.console_log),
    ];
    if let Boot::DirectKernel { kernel, initrd, .. } = &opts.boot {
        paths.push(("kernel", kernel));
        paths.push(("initrd", initrd));
    }
    for (what, p) in paths {
        if !p.is_absolute() {
            return Err(DomainError::RelativePath {
                domain: node.domain.clone(),
                what,
                path: p.to_path_buf(),
            });
        }
    }
    let wrap = |source| DomainError::Write {
        domain: node.domain.clone(),
        source,
    };
    let unsigned = write_domain(plan, node, opts, None).map_err(wrap)?;
    let digest = hex::encode(Sha256::digest(unsigned.as_bytes()));
    write_domain(plan, node, opts, Some(&digest)).map_err(wrap)
}

/// The XML of a node's snapshot (its fresh state, or a checkpoint): memory and disks
/// saved inside the qcow2 overlay (an internal snapshot: one file per node, removed
/// with it).
pub fn snapshot_xml(name: &str, description: &str) -> String {
    let mut w = Writer::new(Vec::new());
    let r: io::Result<()> = (|| {
        w.create_element("domainsnapshot")
            .write_inner_content(|w| {
                w.create_element("name")
                    .write_text_content(BytesText::new(name))?;
                w.create_element("description")
                    .write_text_content(BytesText::new(description))?;
                w.create_element("memory")
                    .with_attribute(("snapshot", "internal"))
                    .write_empty()?;
                Ok(())
            })?;
        Ok(())
    })();
    r.expect("writing to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("quick-xml writes UTF-8")
}

/// A stable UUID per lab and node (sha256-derived, RFC 4122 version 4 layout), so a
/// redefinition keeps the domain's identity: libvirt refuses a same-named domain with
/// another UUID.
pub fn domain_uuid(lab: &str, node: &str) -> String {
    let d = Sha256::digest(format!("kthw-lab/{lab}/{node}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

type W = Writer<Vec<u8>>;

fn text(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(value))?;
    Ok(())
}

fn write_domain(
    plan: &LabPlan,
    node: &NodePlan,
    opts: &DomainOptions,
    digest: Option<&str>,
) -> io::Result<String> {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let _ = w.write_event(Event::Decl(BytesDecl::new("1.0", None, None)));
    w.create_element("domain")
        .with_attribute(("type", opts.accel.domain_type()))
        .write_inner_content(|w| {
            text(w, "name", &node.domain)?;
            text(w, "uuid", &domain_uuid(&plan.lab, &node.name))?;
            write_metadata(w, plan, node, digest)?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&node.memory_mib.to_string()))?;
            w.create_element("vcpu")
                .with_attribute(("placement", "static"))
                .write_text_content(BytesText::new(&node.vcpus.to_string()))?;
            write_os(w, &opts.boot)?;
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                w.create_element("apic").write_empty()?;
                if opts.accel == Accel::Tcg {
                    w.create_element("tcg").write_inner_content(|w| {
                        w.create_element("tb-cache")
                            .with_attribute(("unit", "MiB"))
                            .write_text_content(BytesText::new(&TCG_TB_CACHE_MIB.to_string()))?;
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
            if opts.accel == Accel::Kvm {
                w.create_element("cpu")
                    .with_attribute(("mode", "host-passthrough"))
                    .write_empty()?;
            }
            w.create_element("clock")
                .with_attribute(("offset", "utc"))
                .write_empty()?;
            text(w, "on_poweroff", "destroy")?;
            text(w, "on_reboot", "restart")?;
            text(w, "on_crash", "destroy")?;
            write_devices(w, plan, node, opts)?;
            Ok(())
        })?;
    let mut s = String::from_utf8(w.into_inner()).expect("writer emits utf-8");
    s.push('\n');
    Ok(s)
}

fn write_metadata(
    w: &mut W,
    plan: &LabPlan,
    node: &NodePlan,
    digest: Option<&str>,
) -> io::Result<()> {
    let ns_attr = format!("xmlns:{METADATA_PREFIX}");
    let tag = format!("{METADATA_PREFIX}:lab");
    w.create_element("metadata").write_inner_content(|w| {
        let mut el = w
            .create_element(tag.as_str())
            .with_attribute((ns_attr.as_str(), METADATA_NS))
            .with_attribute(("name", plan.lab.as_str()))
            .with_attribute(("role", node.role.as_str()))
            .with_attribute(("node", node.name.as_str()));
        if let Some(d) = digest {
            el = el.with_attribute(("digest", d));
        }
        el.write_empty()?;
        Ok(())
    })?;
    Ok(())
}

fn write_os(w: &mut W, boot: &Boot) -> io::Result<()> {
    w.create_element("os").write_inner_content(|w| {
        w.create_element("type")
            .with_attribute(("arch", "x86_64"))
            .with_attribute(("machine", "q35"))
            .write_text_content(BytesText::new("hvm"))?;
        match boot {
            Boot::DirectKernel {
                kernel,
                initrd,
                extra_cmdline,
            } => {
                text(w, "kernel", &p(kernel))?;
                text(w, "initrd", &p(initrd))?;
                text(w, "cmdline", &kernel_cmdline(extra_cmdline))?;
            }
            Boot::Firmware => {
                w.create_element("boot")
                    .with_attribute(("dev", "hd"))
                    .write_empty()?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn write_devices(
    w: &mut W,
    plan: &LabPlan,
    node: &NodePlan,
    opts: &DomainOptions,
) -> io::Result<()> {
    w.create_element("devices").write_inner_content(|w| {
        // The node's own disk: a qcow2 overlay on the shared base image.
        w.create_element("disk")
            .with_attribute(("type", "file"))
            .with_attribute(("device", "disk"))
            .write_inner_content(|w| {
                w.create_element("driver")
                    .with_attribute(("name", "qemu"))
                    .with_attribute(("type", "qcow2"))
                    .with_attribute(("discard", "unmap"))
                    .write_empty()?;
                w.create_element("source")
                    .with_attribute(("file", p(&node.disk_path).as_str()))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("dev", "vda"))
                    .with_attribute(("bus", "virtio"))
                    .write_empty()?;
                Ok(())
            })?;
        // The cloud-init seed (volume label CIDATA).
        let (device, bus, dev) = match opts.seed {
            SeedKind::Fat => ("disk", "virtio", "vdb"),
            SeedKind::Iso => ("cdrom", "sata", "sda"),
        };
        w.create_element("disk")
            .with_attribute(("type", "file"))
            .with_attribute(("device", device))
            .write_inner_content(|w| {
                w.create_element("driver")
                    .with_attribute(("name", "qemu"))
                    .with_attribute(("type", "raw"))
                    .write_empty()?;
                w.create_element("source")
                    .with_attribute(("file", p(&node.seed_path).as_str()))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("dev", dev))
                    .with_attribute(("bus", bus))
                    .write_empty()?;
                w.create_element("readonly").write_empty()?;
                Ok(())
            })?;
        w.create_element("interface")
            .with_attribute(("type", "bridge"))
            .write_inner_content(|w| {
                w.create_element("mac")
                    .with_attribute(("address", node.mac.as_str()))
                    .write_empty()?;
                w.create_element("source")
                    .with_attribute(("bridge", plan.network.bridge.as_str()))
                    .write_empty()?;
                w.create_element("model")
                    .with_attribute(("type", "virtio"))
                    .write_empty()?;
                Ok(())
            })?;
        // Serial console: a pty for `virsh console`, everything also logged to a file.
        w.create_element("serial")
            .with_attribute(("type", "pty"))
            .write_inner_content(|w| {
                w.create_element("log")
                    .with_attribute(("file", p(&node.console_log).as_str()))
                    .with_attribute(("append", "off"))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("port", "0"))
                    .write_empty()?;
                Ok(())
            })?;
        w.create_element("rng")
            .with_attribute(("model", "virtio"))
            .write_inner_content(|w| {
                w.create_element("backend")
                    .with_attribute(("model", "random"))
                    .write_text_content(BytesText::new("/dev/urandom"))?;
                Ok(())
            })?;
        // No ballooning, only free page reporting: the guest hands pages it frees
        // back to the host (lower RSS over a lab's life, and a smaller saved fresh
        // state: 170 instead of 200 MiB for a node just booted).
        w.create_element("memballoon")
            .with_attribute(("model", "virtio"))
            .with_attribute(("freePageReporting", "on"))
            .write_empty()?;
        Ok(())
    })?;
    Ok(())
}
