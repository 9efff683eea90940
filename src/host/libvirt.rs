//! The hypervisor seam: a coarse trait in domain terms and its real implementation
//! over libvirt (`virt` crate). Lab domains are found by the ownership marker in their
//! `<metadata>` (see [`crate::render::domain`]), never by name.

use std::io;
use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use crate::render::domain::METADATA_NS;

/// libvirt's URI for the system qemu driver.
pub const DEFAULT_URI: &str = "qemu:///system";

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt {op} of `{resource}` failed: {message}")]
    Libvirt {
        op: &'static str,
        resource: String,
        message: String,
    },
    #[error("invalid domain xml: {what}")]
    BadXml { what: String },
    #[error("domain `{name}` exists but does not belong to lab `{lab}` ({found})")]
    NotOurs {
        name: String,
        lab: String,
        found: String,
    },
    #[error("cannot remove {path} of domain `{domain}`")]
    Cleanup {
        domain: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HypervisorError {
    pub fn hint(&self) -> String {
        match self {
            HypervisorError::Connect { uri, message } => {
                connect_hint(uri, message, Path::new("/run/systemd/system").is_dir())
            }
            HypervisorError::Libvirt { resource, .. } => format!(
                "see `virsh dumpxml {resource}` and /var/log/libvirt/qemu/{resource}.log"
            ),
            HypervisorError::BadXml { .. } => "this is a bug in kthw-lab: please report it".into(),
            HypervisorError::NotOurs { name, .. } => format!(
                "another lab or tool owns `{name}`: rename this lab or remove that domain yourself (virsh undefine {name})"
            ),
            HypervisorError::Cleanup { path, .. } => {
                format!("remove {} by hand and run destroy again", path.display())
            }
        }
    }
}

/// What to do when libvirt at `uri` cannot be reached, from libvirt's `message`
/// (pure). `systemd`: whether systemd runs this host (`/run/systemd/system`), which
/// decides how to start the daemon.
pub fn connect_hint(uri: &str, message: &str, systemd: bool) -> String {
    // qemu:///system and qemu+unix:///system?socket=...: the local system daemon.
    let local = uri.starts_with("qemu:///system") || uri.starts_with("qemu+unix:///system");
    let m = message.to_lowercase();
    if local && m.contains("permission denied") {
        return format!(
            "libvirtd at {uri} refuses this user: run as root (sudo), or pass another --connect"
        );
    }
    let down = m.contains("no such file or directory") || m.contains("connection refused");
    if local && down {
        let start = if systemd {
            "`systemctl start libvirtd`"
        } else {
            "`virtlogd -d; libvirtd -d` (this host runs without systemd)"
        };
        return format!(
            "libvirtd is not running: start it with {start}, or pass another --connect than {uri}"
        );
    }
    format!("check that libvirt runs and answers at {uri}, or pass another --connect")
}

/// A domain's run state, as far as the lab cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Paused,
    ShutOff,
    Other(String),
}

/// The ownership marker of a lab domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Marker {
    pub lab: String,
    pub role: String,
    pub node: String,
    pub digest: String,
}

/// A lab domain found by its marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub marker: Marker,
    pub state: DomainState,
    /// Source files of its disks (the node's overlay and seed).
    pub disk_files: Vec<PathBuf>,
}

/// What [`Hypervisor::ensure_domain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefineOutcome {
    Defined,
    /// The persistent definition changed; a running domain sees it after its next start.
    Updated,
    Unchanged,
}

/// Side effects on the hypervisor, in lab terms. Every method is idempotent.
pub trait Hypervisor: Send + Sync {
    /// Define the domain when absent or when its definition differs.
    fn ensure_domain(&self, xml: &str) -> Result<DefineOutcome, HypervisorError>;
    /// Start a defined domain; fine when it already runs.
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Every domain whose metadata marks it as part of `lab`.
    fn list_lab_domains(&self, lab: &str) -> Result<Vec<DomainInfo>, HypervisorError>;
    /// Stop and forget a domain; fine when it is already gone.
    fn destroy_and_undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// `None` when no such domain exists.
    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError>;
    /// Ask the guest to power off (ACPI), and force it off after `grace`; fine when
    /// it is not running. Returns whether the guest went down by itself.
    fn shutdown(&self, name: &str, grace: std::time::Duration) -> Result<bool, HypervisorError>;
    /// Freeze the guest's vCPUs where they are; fine when it is already paused.
    fn suspend(&self, name: &str) -> Result<(), HypervisorError>;
    /// Let a paused guest run again; fine when it runs.
    fn resume(&self, name: &str) -> Result<(), HypervisorError>;
    /// Power the guest off at once, without telling it (a pulled plug); fine when it
    /// is off already.
    fn power_off(&self, name: &str) -> Result<(), HypervisorError>;
    /// The host-side tap devices of a running domain's network interfaces.
    fn tap_devices(&self, name: &str) -> Result<Vec<String>, HypervisorError>;
    /// The names of the domain's snapshots (none when there is no such domain).
    fn snapshot_names(&self, name: &str) -> Result<Vec<String>, HypervisorError>;
    /// The description of the domain's snapshot `snap`, `None` when it has no such
    /// snapshot (or there is no such domain).
    fn snapshot(&self, name: &str, snap: &str) -> Result<Option<String>, HypervisorError>;
    /// Save the domain's whole state (memory and devices when it runs or is paused,
    /// and its qcow2 overlay) as the internal snapshot `snap`, inside the overlay
    /// itself; replaces an older one of that name. Atomic: all or nothing.
    fn take_snapshot(
        &self,
        name: &str,
        snap: &str,
        description: &str,
    ) -> Result<(), HypervisorError>;
    /// Put the domain back to its snapshot `snap`: running, or paused (to be resumed
    /// together with other domains).
    fn revert_snapshot(&self, name: &str, snap: &str, paused: bool) -> Result<(), HypervisorError>;
    /// Delete the snapshot `snap`; `false` when there was none.
    fn delete_snapshot(&self, name: &str, snap: &str) -> Result<bool, HypervisorError>;

    /// The domain's [`FRESH_SNAPSHOT`]'s description, `None` when it has none (or
    /// there is no such domain).
    fn fresh_snapshot(&self, name: &str) -> Result<Option<String>, HypervisorError> {
        self.snapshot(name, FRESH_SNAPSHOT)
    }
    /// Save the running domain's whole state as [`FRESH_SNAPSHOT`].
    fn take_fresh_snapshot(&self, name: &str, description: &str) -> Result<(), HypervisorError> {
        self.take_snapshot(name, FRESH_SNAPSHOT, description)
    }
    /// Put the domain back to its [`FRESH_SNAPSHOT`], running.
    fn revert_to_fresh(&self, name: &str) -> Result<(), HypervisorError> {
        self.revert_snapshot(name, FRESH_SNAPSHOT, false)
    }
}

/// The internal snapshot a node gets right after its first boot reached SSH, before
/// any phase changed it: what `reset` goes back to in seconds instead of booting again.
pub const FRESH_SNAPSHOT: &str = "kthw-fresh";

/// The snapshot's description: it names the domain definition it was taken with, so
/// a snapshot of an older definition is never reverted to.
pub fn fresh_description(digest: &str) -> String {
    format!("kthw-lab: freshly booted node, domain definition {digest}")
}

/// What a domain XML says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedDomain {
    pub name: String,
    pub marker: Option<Marker>,
    pub disk_files: Vec<PathBuf>,
}

/// Read name, ownership marker and disk source files out of a domain XML (pure).
pub fn parse_domain_xml(xml: &str) -> Result<ParsedDomain, HypervisorError> {
    let bad = |what: String| HypervisorError::BadXml { what };
    let mut r = NsReader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut out = ParsedDomain::default();
    loop {
        let (ns, ev) = r.read_resolved_event().map_err(|e| bad(e.to_string()))?;
        let ours = matches!(ns, ResolveResult::Bound(n) if n.0 == METADATA_NS);
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let local = e.local_name().as_ref().to_string();
                let attr = |k: &str| -> Result<String, HypervisorError> {
                    match e.try_get_attribute(k).map_err(|x| bad(x.to_string()))? {
                        Some(a) => Ok(a
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .map_err(|x| bad(x.to_string()))?
                            .into_owned()),
                        None => Ok(String::new()),
                    }
                };
                let parent = path.join("/");
                if ours && local == "lab" && parent == "domain/metadata" {
                    out.marker = Some(Marker {
                        lab: attr("name")?,
                        role: attr("role")?,
                        node: attr("node")?,
                        digest: attr("digest")?,
                    });
                }
                if local == "source" && parent == "domain/devices/disk" {
                    let f = attr("file")?;
                    if !f.is_empty() {
                        out.disk_files.push(PathBuf::from(f));
                    }
                }
                if matches!(ev, Event::Start(_)) {
                    path.push(local);
                }
            }
            Event::Text(ref t) if path.join("/") == "domain/name" => {
                out.name = quick_xml::escape::unescape(t.as_ref())
                    .map_err(|e| bad(e.to_string()))?
                    .trim()
                    .to_string();
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if out.name.is_empty() {
        return Err(bad("no <name>".into()));
    }
    Ok(out)
}

/// The real hypervisor: one libvirt connection (thread-safe).
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code() == virt::error::ErrorNumberEnum::Known(ErrorNumber::NoDomain)
}

impl Libvirt {
    /// Connect to `uri` (`None` = [`DEFAULT_URI`]); `test:///default` needs no daemon.
    pub fn connect(uri: Option<&str>) -> Result<Libvirt, HypervisorError> {
        let uri = uri.unwrap_or(DEFAULT_URI).to_string();
        // Errors come back as values; keep libvirt from also printing them to stderr.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&uri)).map_err(|e| HypervisorError::Connect {
            uri: uri.clone(),
            message: e.message().to_string(),
        })?;
        Ok(Libvirt { conn, uri })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn err(op: &'static str, resource: &str) -> impl FnOnce(virt::error::Error) -> HypervisorError {
        let resource = resource.to_string();
        move |e| HypervisorError::Libvirt {
            op,
            resource,
            message: e.message().to_string(),
        }
    }

    fn lookup(&self, name: &str) -> Result<Option<Domain>, HypervisorError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(Self::err("lookup", name)(e)),
        }
    }

    fn inactive_xml(d: &Domain, name: &str) -> Result<String, HypervisorError> {
        d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(Self::err("dumpxml", name))
    }

    fn state_of(d: &Domain, name: &str) -> Result<DomainState, HypervisorError> {
        use virt::domain::DomainState as S;
        use virt::enumutil::Enum;
        let (state, _) = d.state().map_err(Self::err("state", name))?;
        Ok(match state {
            Enum::Known(S::Running) | Enum::Known(S::Blocked) => DomainState::Running,
            Enum::Known(S::Paused) | Enum::Known(S::PMSuspended) => DomainState::Paused,
            Enum::Known(S::Shutoff) => DomainState::ShutOff,
            other => DomainState::Other(format!("{other:?}")),
        })
    }

    /// The domain named `name`; its absence is an error of `op`.
    fn existing(&self, name: &str, op: &'static str) -> Result<Domain, HypervisorError> {
        self.lookup(name)?.ok_or_else(|| HypervisorError::Libvirt {
            op,
            resource: name.to_string(),
            message: "no such domain".into(),
        })
    }

    /// The domain's snapshot `snap`, `None` when it has none.
    fn snapshot_of(
        d: &Domain,
        name: &str,
        snap: &str,
    ) -> Result<Option<virt::domain_snapshot::DomainSnapshot>, HypervisorError> {
        match Domain::lookup_snapshot_by_name(d, snap, 0) {
            Ok(s) => Ok(Some(s)),
            Err(e)
                if e.code()
                    == virt::error::ErrorNumberEnum::Known(ErrorNumber::NoDomainSnapshot) =>
            {
                Ok(None)
            }
            Err(e) => Err(Self::err("look up the snapshot of", name)(e)),
        }
    }
}

impl Hypervisor for Libvirt {
    fn ensure_domain(&self, xml: &str) -> Result<DefineOutcome, HypervisorError> {
        let new = parse_domain_xml(xml)?;
        let Some(marker) = &new.marker else {
            return Err(HypervisorError::BadXml {
                what: format!("domain `{}` carries no kthw-lab metadata marker", new.name),
            });
        };
        let outcome = match self.lookup(&new.name)? {
            None => DefineOutcome::Defined,
            Some(d) => {
                let old = parse_domain_xml(&Self::inactive_xml(&d, &new.name)?)?;
                match &old.marker {
                    Some(m) if m.lab == marker.lab => {
                        if m.digest == marker.digest && !m.digest.is_empty() {
                            return Ok(DefineOutcome::Unchanged);
                        }
                        DefineOutcome::Updated
                    }
                    other => {
                        return Err(HypervisorError::NotOurs {
                            name: new.name.clone(),
                            lab: marker.lab.clone(),
                            found: match other {
                                Some(m) => format!("it belongs to lab `{}`", m.lab),
                                None => "it has no kthw-lab marker".into(),
                            },
                        })
                    }
                }
            }
        };
        self.conn
            .define_domain_xml(xml)
            .map_err(Self::err("define", &new.name))?;
        Ok(outcome)
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        let d = self.existing(name, "start")?;
        if d.is_active().map_err(Self::err("start", name))? {
            return Ok(());
        }
        d.create().map_err(Self::err("start", name))?;
        Ok(())
    }

    fn shutdown(&self, name: &str, grace: std::time::Duration) -> Result<bool, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(true);
        };
        if !d.is_active().map_err(Self::err("shut down", name))? {
            return Ok(true);
        }
        // A guest that ignores ACPI is forced off below.
        let _ = d.shutdown();
        let t0 = std::time::Instant::now();
        while t0.elapsed() < grace {
            if !d.is_active().map_err(Self::err("shut down", name))? {
                return Ok(true);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        match d.destroy() {
            Ok(()) => Ok(false),
            Err(e) if !d.is_active().unwrap_or(true) => {
                let _ = e;
                Ok(false)
            }
            Err(e) => Err(Self::err("force off", name)(e)),
        }
    }

    fn list_lab_domains(&self, lab: &str) -> Result<Vec<DomainInfo>, HypervisorError> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(Self::err("list domains", &self.uri))?;
        let mut out = Vec::new();
        for d in all {
            let name = match d.name() {
                Ok(n) => n,
                Err(e) if is_no_domain(&e) => continue,
                Err(e) => return Err(Self::err("name", "domain")(e)),
            };
            let xml = match d.xml_desc(0) {
                Ok(x) => x,
                // Gone between listing and reading: not ours to report.
                Err(e) if is_no_domain(&e) => continue,
                Err(e) => return Err(Self::err("dumpxml", &name)(e)),
            };
            let parsed = parse_domain_xml(&xml)?;
            let Some(marker) = parsed.marker else {
                continue;
            };
            if marker.lab != lab {
                continue;
            }
            out.push(DomainInfo {
                state: Self::state_of(&d, &name)?,
                name,
                marker,
                disk_files: parsed.disk_files,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn destroy_and_undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(());
        };
        match d.is_active() {
            Ok(true) => match d.destroy() {
                Ok(()) => {}
                Err(e) if is_no_domain(&e) => return Ok(()),
                Err(e)
                    if e.code()
                        == virt::error::ErrorNumberEnum::Known(ErrorNumber::OperationInvalid) => {}
                Err(e) => return Err(Self::err("destroy", name)(e)),
            },
            Ok(false) => {}
            Err(e) if is_no_domain(&e) => return Ok(()),
            Err(e) => return Err(Self::err("destroy", name)(e)),
        }
        // Snapshot metadata goes with the domain (the snapshots themselves live in
        // the overlay, removed with it).
        let snapshots = virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        let r = d
            .undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM | snapshots)
            .or_else(|_| d.undefine_flags(snapshots));
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_no_domain(&e) => Ok(()),
            Err(e) => Err(Self::err("undefine", name)(e)),
        }
    }

    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        match self.lookup(name)? {
            None => Ok(None),
            Some(d) => Ok(Some(Self::state_of(&d, name)?)),
        }
    }

    fn suspend(&self, name: &str) -> Result<(), HypervisorError> {
        let d = self.existing(name, "pause")?;
        if Self::state_of(&d, name)? == DomainState::Paused {
            return Ok(());
        }
        d.suspend().map_err(Self::err("pause", name))?;
        Ok(())
    }

    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        let d = self.existing(name, "resume")?;
        if Self::state_of(&d, name)? != DomainState::Paused {
            return Ok(());
        }
        d.resume().map_err(Self::err("resume", name))?;
        Ok(())
    }

    fn power_off(&self, name: &str) -> Result<(), HypervisorError> {
        let d = self.existing(name, "power off")?;
        match d.destroy() {
            Ok(()) => Ok(()),
            Err(_) if !d.is_active().unwrap_or(true) => Ok(()),
            Err(e) => Err(Self::err("power off", name)(e)),
        }
    }

    fn tap_devices(&self, name: &str) -> Result<Vec<String>, HypervisorError> {
        let d = self.existing(name, "read the interfaces of")?;
        let xml = d.xml_desc(0).map_err(Self::err("dumpxml", name))?;
        Ok(parse_tap_devices(&xml))
    }

    fn snapshot_names(&self, name: &str) -> Result<Vec<String>, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = d
            .list_all_snapshots(0)
            .map_err(Self::err("list the snapshots of", name))?
            .iter()
            .filter_map(|s| s.name().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn snapshot(&self, name: &str, snap: &str) -> Result<Option<String>, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(None);
        };
        let Some(s) = Self::snapshot_of(&d, name, snap)? else {
            return Ok(None);
        };
        let xml = s.xml_desc(0).map_err(Self::err("read snapshot of", name))?;
        Ok(Some(snapshot_description(&xml).unwrap_or_default()))
    }

    fn take_snapshot(
        &self,
        name: &str,
        snap: &str,
        description: &str,
    ) -> Result<(), HypervisorError> {
        let d = self.existing(name, "snapshot")?;
        if let Some(old) = Self::snapshot_of(&d, name, snap)? {
            old.delete(0)
                .map_err(Self::err("delete the old snapshot of", name))?;
        }
        // Memory and disk state internal to the qcow2 overlay; the read-only seed is
        // left out by libvirt.
        let xml = crate::render::domain::snapshot_xml(snap, description);
        d.create_snapshot_xml(&xml, virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            .map_err(Self::err("snapshot", name))?;
        Ok(())
    }

    fn revert_snapshot(&self, name: &str, snap: &str, paused: bool) -> Result<(), HypervisorError> {
        let d = self.existing(name, "revert")?;
        let s = Self::snapshot_of(&d, name, snap)?.ok_or_else(|| HypervisorError::Libvirt {
            op: "revert",
            resource: name.to_string(),
            message: format!("it has no snapshot `{snap}`"),
        })?;
        let flags = if paused {
            virt::sys::VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
        } else {
            virt::sys::VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
        };
        s.revert(flags).map_err(Self::err("revert", name))
    }

    fn delete_snapshot(&self, name: &str, snap: &str) -> Result<bool, HypervisorError> {
        let Some(d) = self.lookup(name)? else {
            return Ok(false);
        };
        let Some(s) = Self::snapshot_of(&d, name, snap)? else {
            return Ok(false);
        };
        s.delete(0)
            .map_err(Self::err("delete the snapshot of", name))?;
        Ok(true)
    }
}

/// The `<target dev>` of every `<interface>` in a live domain XML (pure): the tap
/// devices libvirt made on the host for the guest's NICs.
pub fn parse_tap_devices(xml: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Dom {
        devices: Option<Devices>,
    }
    #[derive(serde::Deserialize)]
    struct Devices {
        #[serde(default)]
        interface: Vec<Iface>,
    }
    #[derive(serde::Deserialize)]
    struct Iface {
        target: Option<Target>,
    }
    #[derive(serde::Deserialize)]
    struct Target {
        #[serde(rename = "@dev")]
        dev: String,
    }
    quick_xml::de::from_str::<Dom>(xml)
        .ok()
        .and_then(|d| d.devices)
        .map(|d| {
            d.interface
                .into_iter()
                .filter_map(|i| i.target.map(|t| t.dev))
                .collect()
        })
        .unwrap_or_default()
}

/// The `<description>` of a snapshot XML (pure).
pub fn snapshot_description(xml: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Snapshot {
        description: Option<String>,
    }
    quick_xml::de::from_str::<Snapshot>(xml)
        .ok()
        .and_then(|s| s.description)
}

/// Start every named domain concurrently. Errors are returned per domain, in order.
pub fn start_all(hv: &dyn Hypervisor, names: &[String]) -> Vec<Result<(), HypervisorError>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = names.iter().map(|n| s.spawn(move || hv.start(n))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("start thread panicked"))
            .collect()
    })
}

/// What [`remove_lab`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveReport {
    pub domains: Vec<String>,
    pub files: Vec<PathBuf>,
}

fn remove_file(domain: &str, path: &Path) -> Result<bool, HypervisorError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(HypervisorError::Cleanup {
            domain: domain.to_string(),
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Remove everything carrying `lab`'s marker, in parallel: destroy, undefine, and delete the
/// disk files the domain referenced (its overlay and seed). `extra_files` (e.g. the plan's
/// overlays and seeds of nodes whose domain was never defined) are deleted too.
/// Fine when already gone; safe to run twice.
pub fn remove_lab(
    hv: &dyn Hypervisor,
    lab: &str,
    extra_files: &[PathBuf],
) -> Result<RemoveReport, HypervisorError> {
    let domains = hv.list_lab_domains(lab)?;
    let results: Vec<Result<Vec<PathBuf>, HypervisorError>> = std::thread::scope(|s| {
        let hs: Vec<_> = domains
            .iter()
            .map(|d| {
                s.spawn(move || {
                    hv.destroy_and_undefine(&d.name)?;
                    let mut removed = Vec::new();
                    for f in &d.disk_files {
                        if remove_file(&d.name, f)? {
                            removed.push(f.clone());
                        }
                    }
                    Ok(removed)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("remove thread panicked"))
            .collect()
    });
    let mut report = RemoveReport::default();
    for (d, r) in domains.iter().zip(results) {
        report.files.extend(r?);
        report.domains.push(d.name.clone());
    }
    for f in extra_files {
        if remove_file(lab, f)? {
            report.files.push(f.clone());
        }
    }
    Ok(report)
}
