//! The component catalog (`components/catalog.yaml`): for every lab component and
//! version, the release URL, how to check it, and which files to install where; plus
//! what the offline image already ships as Debian packages.
//!
//! Decoding is strict (unknown keys are errors, each with file:line:col) and reuses
//! the scenario decoder. Nothing here downloads: the cache does, against
//! `checksum_url` or `sha256`.

pub mod import;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::plan::LabPlan;
use crate::scenario::decode::{Ctx, Diagnostic, FromNode, Keyword, MapReader};
use crate::scenario::yaml::{self, Kind, Node};
use crate::scenario::Versions;

/// The catalog shipped in the repository.
pub const BUILTIN_CATALOG: &str = include_str!("../../components/catalog.yaml");
/// Where downloaded component binaries are installed on the nodes.
pub const LOCAL_BIN: &str = "/usr/local/bin";
/// Where downloaded CNI plugins are installed on the workers.
pub const CNI_BIN: &str = "/opt/cni/bin";

/// Which nodes a component is installed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeSet {
    Controller,
    Worker,
    All,
}

impl Keyword for NodeSet {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("controller", NodeSet::Controller),
        ("worker", NodeSet::Worker),
        ("all", NodeSet::All),
    ];
}

/// Which field of the scenario's `versions` picks a component's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionOf {
    Kubernetes,
    Etcd,
    Containerd,
    Runc,
    CniPlugins,
    Crictl,
}

impl Keyword for VersionOf {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("kubernetes", VersionOf::Kubernetes),
        ("etcd", VersionOf::Etcd),
        ("containerd", VersionOf::Containerd),
        ("runc", VersionOf::Runc),
        ("cni_plugins", VersionOf::CniPlugins),
        ("crictl", VersionOf::Crictl),
    ];
}

impl VersionOf {
    pub fn pick(self, v: &Versions) -> &str {
        match self {
            VersionOf::Kubernetes => &v.kubernetes,
            VersionOf::Etcd => &v.etcd,
            VersionOf::Containerd => &v.containerd,
            VersionOf::Runc => &v.runc,
            VersionOf::CniPlugins => &v.cni_plugins,
            VersionOf::Crictl => &v.crictl,
        }
    }
}

/// The shape of a release asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// A single executable.
    Binary,
    /// A gzip-compressed tar archive.
    TarGz,
}

impl Keyword for ArtifactKind {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("binary", ArtifactKind::Binary),
        ("tar.gz", ArtifactKind::TarGz),
    ];
}

/// How a download is verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumSource {
    /// A sha256 copied from an authoritative source.
    Sha256(String),
    /// Upstream's published checksum file; `entry` names the line when it lists
    /// several files.
    Url { url: String, entry: Option<String> },
}

/// One file taken from a release asset and installed on a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstallFile {
    /// Path inside the archive; `None` for a single binary.
    pub from: Option<String>,
    /// Absolute path on the node.
    pub to: String,
    pub mode: u32,
}

/// One version of one component.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Release {
    pub url: String,
    pub checksum: ChecksumSource,
    pub kind: ArtifactKind,
    pub install: Vec<InstallFile>,
}

impl Release {
    /// The asset's file name: the last segment of its URL.
    pub fn file_name(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or(&self.url)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Component {
    pub name: String,
    pub nodes: NodeSet,
    pub version_of: VersionOf,
    pub versions: BTreeMap<String, Release>,
}

/// A component the image ships as a Debian package.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageComponent {
    pub package: String,
    pub version: String,
    /// Program name -> absolute path in the image.
    pub paths: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ComponentCatalog {
    pub arch: String,
    pub components: Vec<Component>,
    /// Image name -> component name -> what the image has.
    pub provided_by_image: BTreeMap<String, BTreeMap<String, ImageComponent>>,
}

/// The catalog did not decode; every problem is listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid component catalog {file}: {} problem(s)", diagnostics.len())]
pub struct CatalogError {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl CatalogError {
    pub fn report(&self) -> String {
        self.diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

const TOP: &[&str] = &["arch", "components", "provided_by_image"];
const COMPONENT: &[&str] = &["nodes", "version_of", "versions"];
const RELEASE: &[&str] = &[
    "url",
    "sha256",
    "checksum_url",
    "checksum_entry",
    "kind",
    "install",
];
const INSTALL: &[&str] = &["from", "to", "mode"];
const IMAGE_COMPONENT: &[&str] = &["package", "version", "paths"];

/// The component names the bootstrap needs, in install order.
pub const REQUIRED: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "containerd",
    "runc",
    "cni-plugins",
    "crictl",
    "kubelet",
    "kube-proxy",
];

/// Entries of a mapping whose keys are free (names, versions), in file order.
fn entries<'n>(node: &'n Node, path: &str, cx: &mut Ctx) -> Vec<(String, &'n Node)> {
    cx.record(path, node.pos);
    match &node.kind {
        Kind::Map(e) => {
            let mut out: Vec<(String, &Node)> = Vec::new();
            for (k, v) in e {
                let p = format!("{path}.{}", k.name);
                if out.iter().any(|(n, _)| *n == k.name) {
                    cx.error(k.pos, &p, format!("`{}` is given twice", k.name));
                    continue;
                }
                cx.record(&p, k.pos);
                out.push((k.name.clone(), v));
            }
            out
        }
        _ if node.is_null() => Vec::new(),
        _ => {
            cx.error(
                node.pos,
                path,
                format!("expected a mapping, found {}", node.kind_name()),
            );
            Vec::new()
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_mode(text: &str) -> Option<u32> {
    let t = text.strip_prefix("0o").unwrap_or(text);
    if t.is_empty() || t.len() > 4 {
        return None;
    }
    u32::from_str_radix(t, 8).ok()
}

impl FromNode for InstallFile {
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        let mut m = MapReader::new(node, path, cx, INSTALL)?;
        let from: Option<String> = m.opt("from", cx);
        let to: Option<String> = m.req("to", cx);
        let mode_text: Option<String> = m.opt("mode", cx);
        m.finish(cx);
        let to = to?;
        if !to.starts_with('/') {
            cx.error_at_path(
                &format!("{path}.to"),
                format!("`{to}` is not an absolute path"),
            );
            return None;
        }
        let mode = match mode_text {
            None => 0o755,
            Some(t) => match parse_mode(&t) {
                Some(m) => m,
                None => {
                    cx.error_at_path(
                        &format!("{path}.mode"),
                        format!("`{t}` is not an octal mode like \"0755\""),
                    );
                    return None;
                }
            },
        };
        Some(InstallFile { from, to, mode })
    }
}

fn release(node: &Node, path: &str, cx: &mut Ctx) -> Option<Release> {
    let mut m = MapReader::new(node, path, cx, RELEASE)?;
    let url: Option<String> = m.req("url", cx);
    let sha: Option<String> = m.opt("sha256", cx);
    let sum_url: Option<String> = m.opt("checksum_url", cx);
    let entry: Option<String> = m.opt("checksum_entry", cx);
    let kind: Option<ArtifactKind> = match m.node("kind") {
        Some(_) => m.opt_keyword("kind", cx),
        None => {
            cx.error(
                m.pos,
                &m.child_path("kind"),
                "missing required field `kind`",
            );
            None
        }
    };
    let install: Option<Vec<InstallFile>> = m.req("install", cx);
    m.finish(cx);
    let (url, kind, install) = (url?, kind?, install?);
    if !url.starts_with("https://") {
        cx.error_at_path(
            &format!("{path}.url"),
            format!("`{url}` must be an https:// URL"),
        );
    }
    let checksum = match (sha, sum_url) {
        (Some(s), None) => {
            if !is_sha256(&s) {
                cx.error_at_path(
                    &format!("{path}.sha256"),
                    "expected 64 lowercase hex digits",
                );
                return None;
            }
            if entry.is_some() {
                cx.error_at_path(
                    &format!("{path}.checksum_entry"),
                    "checksum_entry only goes with checksum_url",
                );
            }
            ChecksumSource::Sha256(s)
        }
        (None, Some(u)) => {
            if !u.starts_with("https://") {
                cx.error_at_path(
                    &format!("{path}.checksum_url"),
                    format!("`{u}` must be an https:// URL"),
                );
            }
            ChecksumSource::Url { url: u, entry }
        }
        (Some(_), Some(_)) => {
            cx.error_at_path(path, "give either `sha256` or `checksum_url`, not both");
            return None;
        }
        (None, None) => {
            cx.error_at_path(
                path,
                "no checksum: give `checksum_url` (upstream's published file) or a `sha256` from an authoritative source",
            );
            return None;
        }
    };
    if install.is_empty() {
        cx.error_at_path(&format!("{path}.install"), "installs nothing");
    }
    for (i, f) in install.iter().enumerate() {
        let p = format!("{path}.install[{i}]");
        match (kind, &f.from) {
            (ArtifactKind::Binary, Some(_)) => {
                cx.error_at_path(&format!("{p}.from"), "a single binary has no `from`")
            }
            (ArtifactKind::TarGz, None) => cx.error_at_path(
                &p,
                "an archive entry needs `from` (the path inside the archive)",
            ),
            _ => {}
        }
    }
    if kind == ArtifactKind::Binary && install.len() > 1 {
        cx.error_at_path(
            &format!("{path}.install"),
            "a single binary installs to one place",
        );
    }
    Some(Release {
        url,
        checksum,
        kind,
        install,
    })
}

fn component(name: &str, node: &Node, path: &str, cx: &mut Ctx) -> Option<Component> {
    let mut m = MapReader::new(node, path, cx, COMPONENT)?;
    let nodes: Option<NodeSet> = m.opt_keyword("nodes", cx);
    if m.node("nodes").is_none() {
        cx.error(
            m.pos,
            &m.child_path("nodes"),
            "missing required field `nodes`",
        );
    }
    let version_of: Option<VersionOf> = m.opt_keyword("version_of", cx);
    if m.node("version_of").is_none() {
        cx.error(
            m.pos,
            &m.child_path("version_of"),
            "missing required field `version_of`",
        );
    }
    let versions_node = m.section("versions", cx);
    let vpath = m.child_path("versions");
    m.finish(cx);
    let mut versions = BTreeMap::new();
    match versions_node {
        Some(vn) => {
            for (v, rn) in entries(vn, &vpath, cx) {
                if let Some(r) = release(rn, &format!("{vpath}.{v}"), cx) {
                    versions.insert(v, r);
                }
            }
        }
        None => cx.error_at_path(&vpath, "missing required field `versions`"),
    }
    Some(Component {
        name: name.to_string(),
        nodes: nodes?,
        version_of: version_of?,
        versions,
    })
}

fn image_component(node: &Node, path: &str, cx: &mut Ctx) -> Option<ImageComponent> {
    let mut m = MapReader::new(node, path, cx, IMAGE_COMPONENT)?;
    let package: Option<String> = m.req("package", cx);
    let version: Option<String> = m.req("version", cx);
    let paths_node = m.section("paths", cx);
    let ppath = m.child_path("paths");
    m.finish(cx);
    let mut paths = BTreeMap::new();
    match paths_node {
        Some(pn) => {
            for (prog, vn) in entries(pn, &ppath, cx) {
                let p = format!("{ppath}.{prog}");
                if let Some(v) = String::from_node(vn, &p, cx) {
                    if !v.starts_with('/') {
                        cx.error_at_path(&p, format!("`{v}` is not an absolute path"));
                    }
                    paths.insert(prog, v);
                }
            }
        }
        None => cx.error_at_path(&ppath, "missing required field `paths`"),
    }
    Some(ImageComponent {
        package: package?,
        version: version?,
        paths,
    })
}

impl ComponentCatalog {
    /// The catalog shipped in the repository.
    pub fn builtin() -> Result<ComponentCatalog, CatalogError> {
        Self::parse(BUILTIN_CATALOG, "components/catalog.yaml")
    }

    pub fn load(path: &Path) -> Result<ComponentCatalog, CatalogError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError {
            file: file.clone(),
            diagnostics: vec![Diagnostic {
                file: file.clone(),
                line: 1,
                col: 1,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse(&text, &file)
    }

    /// Decode a catalog, collecting every problem with its position.
    pub fn parse(text: &str, file: &str) -> Result<ComponentCatalog, CatalogError> {
        let mut cx = Ctx::new(file);
        let fail = |cx: Ctx| CatalogError {
            file: file.to_string(),
            diagnostics: cx.diagnostics,
        };
        let root = match yaml::parse(text) {
            Ok(n) => n,
            Err(e) => {
                cx.error(e.pos, "", e.message.clone());
                return Err(fail(cx));
            }
        };
        let Some(mut m) = MapReader::new(&root, "", &mut cx, TOP) else {
            return Err(fail(cx));
        };
        let arch: Option<String> = m.req("arch", &mut cx);
        let comps = m.section("components", &mut cx);
        let images = m.section("provided_by_image", &mut cx);
        m.finish(&mut cx);
        if let Some(a) = &arch {
            if a != "amd64" {
                cx.error_at_path("arch", format!("only amd64 is supported, found `{a}`"));
            }
        }
        let mut components = Vec::new();
        match comps {
            Some(cn) => {
                for (name, node) in entries(cn, "components", &mut cx) {
                    let p = format!("components.{name}");
                    if let Some(c) = component(&name, node, &p, &mut cx) {
                        components.push(c);
                    }
                }
            }
            None => cx.error_at_path("components", "missing required field `components`"),
        }
        let mut provided_by_image = BTreeMap::new();
        if let Some(im) = images {
            for (image, node) in entries(im, "provided_by_image", &mut cx) {
                let ip = format!("provided_by_image.{image}");
                let mut comps = BTreeMap::new();
                for (name, cn) in entries(node, &ip, &mut cx) {
                    if let Some(c) = image_component(cn, &format!("{ip}.{name}"), &mut cx) {
                        comps.insert(name, c);
                    }
                }
                provided_by_image.insert(image, comps);
            }
        }
        for r in REQUIRED {
            if comps.is_some() && !components.iter().any(|c| c.name == *r) {
                cx.error_at_path("components", format!("component `{r}` is missing"));
            }
        }
        if cx.has_errors() {
            return Err(fail(cx));
        }
        Ok(ComponentCatalog {
            arch: arch.unwrap_or_default(),
            components,
            provided_by_image,
        })
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// The release a plan asks for, if the catalog has it.
    pub fn release_for(&self, name: &str, versions: &Versions) -> Option<(&str, &Release)> {
        let c = self.component(name)?;
        let v = c.version_of.pick(versions);
        c.versions.get_key_value(v).map(|(k, r)| (k.as_str(), r))
    }

    /// What an image ships for a component, if anything.
    pub fn from_image(&self, image: &str, name: &str) -> Option<&ImageComponent> {
        self.provided_by_image.get(image)?.get(name)
    }
}

/// Where a component's release asset (binary or archive) sits in the download
/// cache: the file `CACHE/components/NAME-VERSION`, the layout of the cache
/// module's `Cache::component_path`. `cache import DIR` finds it in DIR under
/// upstream's file name ([`Release::file_name`]).
pub fn cache_path(cache_dir: &Path, component: &str, version: &str) -> PathBuf {
    cache_dir
        .join("components")
        .join(format!("{component}-{version}"))
}

/// One component the plan needs and the cache does not have.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Missing {
    pub component: String,
    pub version: String,
    /// Upstream's file name: what `cache import DIR` looks for in DIR.
    pub file_name: String,
    /// Where the cache keeps it.
    pub expected_path: PathBuf,
    pub url: Option<String>,
    /// Why it is missing: not in the cache, or the catalog has no such version.
    pub reason: MissingReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingReason {
    NotCached,
    UnknownVersion,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            MissingReason::NotCached => write!(
                f,
                "{} {}: {} is not in the cache (expected {})",
                self.component,
                self.version,
                self.file_name,
                self.expected_path.display()
            ),
            MissingReason::UnknownVersion => write!(
                f,
                "{} {}: the component catalog has no such version",
                self.component, self.version
            ),
        }
    }
}

/// Every component the plan needs that is neither cached nor taken from the image.
/// `from_image` names components the scenario takes from the image's packages.
pub fn missing_components(
    catalog: &ComponentCatalog,
    plan: &LabPlan,
    cache_dir: &Path,
    from_image: &[&str],
) -> Vec<Missing> {
    let mut out = Vec::new();
    for c in &catalog.components {
        if from_image.contains(&c.name.as_str())
            && catalog.from_image(&plan.image, &c.name).is_some()
        {
            continue;
        }
        let version = c.version_of.pick(&plan.versions).to_string();
        match c.versions.get(&version) {
            Some(r) => {
                let path = cache_path(cache_dir, &c.name, &version);
                if !path.is_file() {
                    out.push(Missing {
                        component: c.name.clone(),
                        version,
                        file_name: r.file_name().to_string(),
                        expected_path: path,
                        url: Some(r.url.clone()),
                        reason: MissingReason::NotCached,
                    });
                }
            }
            None => out.push(Missing {
                component: c.name.clone(),
                file_name: String::new(),
                expected_path: cache_path(cache_dir, &c.name, &version),
                url: None,
                version,
                reason: MissingReason::UnknownVersion,
            }),
        }
    }
    out
}

/// One error text for everything missing: what, and how to import it.
pub fn missing_report(missing: &[Missing]) -> String {
    let mut s = format!(
        "{} component file(s) missing from the cache:\n",
        missing.len()
    );
    for m in missing {
        s.push_str(&format!("  - {m}\n"));
    }
    let files: Vec<&str> = missing
        .iter()
        .filter(|m| m.reason == MissingReason::NotCached)
        .map(|m| m.file_name.as_str())
        .collect();
    if !files.is_empty() {
        s.push_str(&format!(
            "hint: download these on a machine with internet access, put them in one directory, \
             then run `kthw-lab cache import DIR`; expected file names: {}\n",
            files.join(", ")
        ));
        for m in missing.iter().filter(|m| m.url.is_some()) {
            s.push_str(&format!(
                "hint:   {}\n",
                m.url.as_deref().unwrap_or_default()
            ));
        }
    }
    if missing
        .iter()
        .any(|m| m.reason == MissingReason::UnknownVersion)
    {
        s.push_str(
            "hint: pick a version listed in components/catalog.yaml, or add it there with its checksum_url\n",
        );
    }
    s
}

/// The sha256 for `entry` in a checksum file: either one bare hash, or lines of
/// `HASH  NAME` (`*NAME` for binary mode), as published by upstream projects.
pub fn parse_checksum_file(text: &str, entry: Option<&str>) -> Option<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    for l in &lines {
        let mut it = l.split_whitespace();
        let hash = it.next()?.to_ascii_lowercase();
        let name = it.next().map(|n| n.trim_start_matches('*'));
        let name = name.map(|n| n.rsplit('/').next().unwrap_or(n));
        match (entry, name) {
            (None, None) if lines.len() == 1 && is_sha256(&hash) => return Some(hash),
            (None, Some(_)) if lines.len() == 1 && is_sha256(&hash) => return Some(hash),
            (Some(e), Some(n)) if n == e && is_sha256(&hash) => return Some(hash),
            (Some(_), None) if lines.len() == 1 && is_sha256(&hash) => return Some(hash),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_decodes_and_covers_the_default_versions() {
        let c = ComponentCatalog::builtin().unwrap_or_else(|e| panic!("{}", e.report()));
        let v = Versions::default();
        for name in REQUIRED {
            let (ver, r) = c
                .release_for(name, &v)
                .unwrap_or_else(|| panic!("{name} has no release for the defaults"));
            assert!(!ver.is_empty());
            assert!(r.url.starts_with("https://"), "{name}");
            assert!(r.url.contains("amd64"), "{name}: {}", r.url);
        }
    }

    /// Pins come only from kubespray's checksums.yml (see catalog.yaml); the
    /// binaries kubespray does not download are verified against dl.k8s.io's files.
    #[test]
    fn pinned_and_upstream_checksums_are_where_the_catalog_says() {
        let c = ComponentCatalog::builtin().unwrap();
        let v = Versions::default();
        for name in REQUIRED {
            let (_, r) = c.release_for(name, &v).unwrap();
            let pinned = matches!(r.checksum, ChecksumSource::Sha256(_));
            let from_kubespray = [
                "kubelet",
                "kubectl",
                "etcd",
                "containerd",
                "runc",
                "cni-plugins",
                "crictl",
            ]
            .contains(name);
            assert_eq!(pinned, from_kubespray, "{name}");
            if let ChecksumSource::Url { url, .. } = &r.checksum {
                assert_eq!(url, &format!("{}.sha256", r.url), "{name}");
            }
        }
    }

    #[test]
    fn no_checksum_is_an_error() {
        let text = "arch: amd64\ncomponents:\n  kubectl:\n    nodes: all\n    version_of: kubernetes\n    versions:\n      \"1.0.0\":\n        url: https://x/kubectl\n        kind: binary\n        install:\n          - to: /usr/local/bin/kubectl\n";
        let e = ComponentCatalog::parse(text, "c.yaml").unwrap_err();
        let r = e.report();
        assert!(r.contains("c.yaml:7:"), "{r}");
        assert!(r.contains("no checksum"), "{r}");
    }

    #[test]
    fn unknown_keys_are_reported_with_positions() {
        let text = "arch: amd64\ncolour: red\ncomponents: {}\n";
        let e = ComponentCatalog::parse(text, "c.yaml").unwrap_err();
        let r = e.report();
        assert!(
            r.contains("c.yaml:2:1: colour: unknown field `colour`"),
            "{r}"
        );
    }

    #[test]
    fn checksum_files() {
        let h = "a".repeat(64);
        assert_eq!(
            parse_checksum_file(&format!("{h}\n"), None),
            Some(h.clone())
        );
        let multi = format!("{}  runc.arm64\n{h}  runc.amd64\n", "b".repeat(64));
        assert_eq!(
            parse_checksum_file(&multi, Some("runc.amd64")),
            Some(h.clone())
        );
        assert_eq!(parse_checksum_file(&multi, None), None);
        assert_eq!(parse_checksum_file(&multi, Some("nope")), None);
        assert_eq!(parse_checksum_file("not-a-hash\n", None), None);
        assert_eq!(
            parse_checksum_file(&format!("{h} *dir/x.tgz\n"), Some("x.tgz")),
            Some(h)
        );
    }
}
