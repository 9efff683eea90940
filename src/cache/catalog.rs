//! The image catalog: one strict YAML file per image, `images/NAME.yaml`.
//!
//! Files are decoded with the scenario's positioned decoder, so every problem is
//! reported as `file:line:col: field: message`, all at once. The catalog shipped in
//! the repository is also compiled into the binary, so the tool works outside a
//! checkout; files found under the given roots override the built-in entries.
//!
//! Fields (unknown keys are errors):
//! ```text
//! description   free text
//! source        download | build
//! format        qcow2 | raw                       (the disk's format)
//! boot          firmware | direct-kernel          (bootloader in the image, or libvirt
//!                                                  loads kernel + initrd)
//! first_boot    cloud-init | kthw-seed            (kthw-seed: the initrd applies the
//!                                                  seed's kthw/ files; direct-kernel only)
//! -- source: download
//! urls          list of http(s) URLs, tried in order (mirrors of one file)
//! file          cache file name (default: last segment of the first URL)
//! checksum      sha256:HEX | sha512:HEX            (a pinned digest), or
//! checksum_url  URL of a SHA256SUMS-style list, with
//! algorithm     sha256 | sha512
//! -- source: build
//! recipe        path relative to the catalog file; run as `recipe OUTDIR`
//! disk          artifact name of the disk (e.g. disk.qcow2)
//! kernel, initrd  artifact names; required for (and only for) boot: direct-kernel
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::scenario::decode::{Ctx, Diagnostic, Keyword, MapReader};
use crate::scenario::yaml::Node;

use super::checksum::{Algorithm, Checksum};

/// The shipped catalog, embedded so the binary works outside the repository.
const BUILTIN: &[(&str, &str)] = &[
    ("debian-12", include_str!("../../images/debian-12.yaml")),
    (
        "kthw-debian12",
        include_str!("../../images/kthw-debian12.yaml"),
    ),
    (
        "ubuntu-24.04",
        include_str!("../../images/ubuntu-24.04.yaml"),
    ),
];

/// Names of the built-in catalog entries (sorted); the scenario validator uses these.
pub const BUILTIN_IMAGE_NAMES: &[&str] = &["debian-12", "kthw-debian12", "ubuntu-24.04"];

const FIELDS: &[&str] = &[
    "description",
    "source",
    "urls",
    "file",
    "checksum",
    "checksum_url",
    "algorithm",
    "recipe",
    "format",
    "boot",
    "disk",
    "kernel",
    "initrd",
    "first_boot",
];

/// How a disk image is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl Keyword for DiskFormat {
    const WORDS: &'static [(&'static str, Self)] =
        &[("qcow2", DiskFormat::Qcow2), ("raw", DiskFormat::Raw)];
}

/// How a VM starts from the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMethod {
    /// The image carries its bootloader; the VM boots from the disk via firmware.
    Firmware,
    /// libvirt loads the image's kernel and initrd (`<os><kernel/><initrd/>`).
    DirectKernel,
}

impl Keyword for BootMethod {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("firmware", BootMethod::Firmware),
        ("direct-kernel", BootMethod::DirectKernel),
    ];
}

/// What configures the guest on its first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirstBoot {
    /// cloud-init reads the NoCloud files of the seed (stock cloud images).
    CloudInit,
    /// The image's initrd applies the seed's `kthw/` directory (hostname, network, user,
    /// keys) before systemd starts; cloud-init is turned off on the kernel command line.
    /// Only an image built by kthw-lab has it, and only with direct kernel boot.
    KthwSeed,
}

impl Keyword for FirstBoot {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("cloud-init", FirstBoot::CloudInit),
        ("kthw-seed", FirstBoot::KthwSeed),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    Download,
    Build,
}

impl Keyword for SourceKind {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("download", SourceKind::Download),
        ("build", SourceKind::Build),
    ];
}

impl Keyword for Algorithm {
    const WORDS: &'static [(&'static str, Self)] =
        &[("sha256", Algorithm::Sha256), ("sha512", Algorithm::Sha512)];
}

/// Where the expected digest of a download comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChecksumSpec {
    /// A digest written in the catalog.
    Pinned(Checksum),
    /// A `SHA256SUMS`-style file published beside the image, fetched at pull time.
    File { url: String, algorithm: Algorithm },
}

impl fmt::Display for ChecksumSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChecksumSpec::Pinned(c) => write!(f, "pinned {c}"),
            ChecksumSpec::File { url, algorithm } => write!(f, "{algorithm} from {url}"),
        }
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Downloaded from the first URL that answers (the others are mirrors).
    Download {
        urls: Vec<String>,
        /// File name in the cache (and in `cache import` directories).
        file: String,
        checksum: ChecksumSpec,
    },
    /// Built locally: `recipe OUTDIR` writes `disk` (and `kernel`, `initrd`).
    Build {
        /// The recipe as written in the catalog, relative to the catalog file.
        recipe: String,
        /// The recipe resolved against the catalog file's directory; `None` for a
        /// built-in entry (the binary carries no recipe).
        recipe_path: Option<PathBuf>,
    },
}

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub name: String,
    pub description: Option<String>,
    /// The file the entry came from, or `<built-in images/NAME.yaml>`.
    pub origin: String,
    pub source: ImageSource,
    pub format: DiskFormat,
    pub boot: BootMethod,
    pub first_boot: FirstBoot,
    /// Artifact names: the disk always; kernel and initrd for direct-kernel boot.
    pub disk: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

impl ImageSpec {
    pub fn source_word(&self) -> &'static str {
        match self.source {
            ImageSource::Download { .. } => "download",
            ImageSource::Build { .. } => "build",
        }
    }

    pub fn boot_word(&self) -> &'static str {
        match self.boot {
            BootMethod::Firmware => "firmware",
            BootMethod::DirectKernel => "direct-kernel",
        }
    }

    /// File names the entry's artifacts have in its cache directory.
    pub fn artifact_names(&self) -> Vec<&str> {
        let mut v = vec![self.disk.as_str()];
        v.extend(self.kernel.as_deref());
        v.extend(self.initrd.as_deref());
        v
    }
}

/// The catalog failed to load: every problem found, with positions.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} problem{} in the image catalog", diagnostics.len(), if diagnostics.len() == 1 { "" } else { "s" })]
pub struct CatalogError {
    pub diagnostics: Vec<Diagnostic>,
}

impl CatalogError {
    pub fn hint(&self) -> String {
        "fix the catalog files listed above (images/NAME.yaml); the shipped images/*.yaml show every field with comments".into()
    }

    /// The error and one line per diagnostic.
    pub fn report(&self) -> String {
        let mut s = format!("{self}\n");
        for d in &self.diagnostics {
            s.push_str(&format!("  {d}\n"));
        }
        s
    }
}

/// All known images, by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: BTreeMap<String, ImageSpec>,
}

impl Catalog {
    /// The built-in entries, then `ROOT/images/*.yaml` of each root: a file overrides
    /// a built-in entry of the same name, and an earlier root wins over a later one.
    pub fn load(roots: &[PathBuf]) -> Result<Catalog, CatalogError> {
        let mut cat = Catalog::builtin()?;
        let mut diagnostics = Vec::new();
        let mut from_files: BTreeMap<String, ImageSpec> = BTreeMap::new();
        for root in roots {
            let dir = root.join("images");
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml") && p.is_file())
                .collect();
            paths.sort();
            for path in paths {
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if from_files.contains_key(name) {
                    continue;
                }
                let label = path.display().to_string();
                let text = match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        diagnostics.push(Diagnostic {
                            file: label,
                            line: 0,
                            col: 0,
                            path: String::new(),
                            message: format!("cannot read the catalog file: {e}"),
                        });
                        continue;
                    }
                };
                match parse_entry(name, &text, &label, Some(&dir)) {
                    Ok(spec) => {
                        from_files.insert(name.to_string(), spec);
                    }
                    Err(mut d) => diagnostics.append(&mut d),
                }
            }
        }
        if !diagnostics.is_empty() {
            return Err(CatalogError { diagnostics });
        }
        cat.entries.extend(from_files);
        Ok(cat)
    }

    /// Only the entries compiled into the binary.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        let mut entries = BTreeMap::new();
        let mut diagnostics = Vec::new();
        for (name, text) in BUILTIN {
            let label = format!("<built-in images/{name}.yaml>");
            match parse_entry(name, text, &label, None) {
                Ok(spec) => {
                    entries.insert(name.to_string(), spec);
                }
                Err(mut d) => diagnostics.append(&mut d),
            }
        }
        if diagnostics.is_empty() {
            Ok(Catalog { entries })
        } else {
            Err(CatalogError { diagnostics })
        }
    }

    /// A catalog of explicit entries (tests, and callers that assemble their own).
    pub fn from_specs(specs: impl IntoIterator<Item = ImageSpec>) -> Catalog {
        Catalog {
            entries: specs.into_iter().map(|s| (s.name.clone(), s)).collect(),
        }
    }

    /// Decode one catalog file's text. `dir` resolves a build recipe's path.
    pub fn parse_entry(
        name: &str,
        text: &str,
        label: &str,
        dir: Option<&Path>,
    ) -> Result<ImageSpec, CatalogError> {
        parse_entry(name, text, label, dir).map_err(|diagnostics| CatalogError { diagnostics })
    }

    pub fn get(&self, name: &str) -> Option<&ImageSpec> {
        self.entries.get(name)
    }

    /// Every entry, sorted by name.
    pub fn list(&self) -> impl Iterator<Item = &ImageSpec> {
        self.entries.values()
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
        })
}

fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.starts_with('.')
        && !name.ends_with(".part")
        && name != super::ENTRY_MANIFEST
}

/// The last path segment of a URL, without query or fragment.
pub fn url_file_name(url: &str) -> Option<&str> {
    let no_frag = url.split('#').next().unwrap_or(url);
    let no_query = no_frag.split('?').next().unwrap_or(no_frag);
    let after_scheme = no_query.split_once("://").map(|(_, r)| r)?;
    let (_, path) = after_scheme.split_once('/')?;
    let last = path.rsplit('/').next()?;
    (!last.is_empty()).then_some(last)
}

fn check_url(url: &str, path: &str, pos_path: &str, cx: &mut Ctx) -> bool {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.split_once("://").is_some_and(|(_, r)| {
            !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace)
        });
    if !ok {
        cx.error_at_path(
            pos_path,
            format!("{path}: expected an http:// or https:// URL, found `{url}`"),
        );
    }
    ok
}

fn parse_entry(
    name: &str,
    text: &str,
    label: &str,
    dir: Option<&Path>,
) -> Result<ImageSpec, Vec<Diagnostic>> {
    let root = crate::scenario::decode::parse_document(text, label).map_err(|d| vec![d])?;
    let mut cx = Ctx::new(label);
    let spec = decode_entry(name, &root, &mut cx, dir);
    if cx.has_errors() || spec.is_none() {
        let mut d = cx.diagnostics;
        d.sort_by_key(|x| (x.line, x.col));
        if d.is_empty() {
            d.push(Diagnostic {
                file: label.to_string(),
                line: 1,
                col: 1,
                path: String::new(),
                message: "incomplete catalog entry".into(),
            });
        }
        return Err(d);
    }
    Ok(spec.expect("checked above"))
}

fn decode_entry(name: &str, root: &Node, cx: &mut Ctx, dir: Option<&Path>) -> Option<ImageSpec> {
    let mut m = MapReader::new(root, "", cx, FIELDS)?;
    if !valid_name(name) {
        cx.error_at_path(
            "",
            format!("`{name}` is not a valid image name: use lowercase letters, digits, `.`, `-` and `_` (the file is images/NAME.yaml)"),
        );
    }
    let description: Option<String> = m.opt("description", cx);
    let kind: Option<SourceKind> = match m.node("source") {
        Some(n) => crate::scenario::decode::keyword(n, "source", cx),
        None => {
            cx.error(
                m.pos,
                "source",
                "missing required field `source` (download or build)",
            );
            None
        }
    };
    let format: Option<DiskFormat> = required_keyword(&mut m, "format", cx);
    let boot: Option<BootMethod> = required_keyword(&mut m, "boot", cx);
    let first_boot: Option<FirstBoot> = required_keyword(&mut m, "first_boot", cx);

    // Fields of the other source kind are errors, not silently ignored.
    let not_for = |m: &mut MapReader, key: &str, what: &str, cx: &mut Ctx| {
        if let Some(n) = m.node(key) {
            cx.error(
                n.pos,
                key,
                format!("`{key}` applies only to source: {what}"),
            );
        }
    };

    let mut disk: Option<String> = m.opt("disk", cx);
    let kernel: Option<String> = m.opt("kernel", cx);
    let initrd: Option<String> = m.opt("initrd", cx);

    let source = match kind {
        Some(SourceKind::Download) => {
            not_for(&mut m, "recipe", "build", cx);
            let urls: Option<Vec<String>> = m.req("urls", cx);
            let mut ok = true;
            if let Some(urls) = &urls {
                if urls.is_empty() {
                    cx.error_at_path("urls", "give at least one URL");
                    ok = false;
                }
                for (i, u) in urls.iter().enumerate() {
                    ok &= check_url(u, &format!("urls[{i}]"), &format!("urls[{i}]"), cx);
                }
            }
            let file: Option<String> = m.opt("file", cx);
            let file = file.or_else(|| {
                urls.as_ref()
                    .and_then(|u| u.first())
                    .and_then(|u| url_file_name(u))
                    .map(str::to_string)
            });
            if let Some(f) = &file {
                if !valid_file_name(f) {
                    cx.error_at_path("file", format!("`{f}` cannot be a cache file name"));
                    ok = false;
                }
            } else if urls.as_ref().is_some_and(|u| !u.is_empty()) {
                cx.error_at_path(
                    "file",
                    "the first URL has no file name: set `file` to the name the image is stored under",
                );
                ok = false;
            }
            if let (Some(d), Some(f)) = (&disk, &file) {
                if d != f {
                    cx.error_at_path(
                        "disk",
                        format!("for a download, the disk is the downloaded file `{f}`: drop `disk` or make it equal"),
                    );
                    ok = false;
                }
            }
            disk = file.clone();
            let pinned: Option<String> = m.opt("checksum", cx);
            let checksum_url: Option<String> = m.opt("checksum_url", cx);
            let algorithm: Option<Algorithm> = m.opt_keyword("algorithm", cx);
            let checksum = match (pinned, checksum_url) {
                (Some(_), Some(_)) => {
                    cx.error_at_path(
                        "checksum_url",
                        "give either `checksum` (a pinned digest) or `checksum_url` (a SHA256SUMS-style file), not both",
                    );
                    None
                }
                (Some(p), None) => {
                    if let Some(n) = m.node("algorithm") {
                        cx.error(
                            n.pos,
                            "algorithm",
                            "`algorithm` goes with `checksum_url`; a pinned checksum names its own (sha256:HEX)",
                        );
                    }
                    match p.parse::<Checksum>() {
                        Ok(c) => Some(ChecksumSpec::Pinned(c)),
                        Err(e) => {
                            cx.error_at_path("checksum", e.to_string());
                            None
                        }
                    }
                }
                (None, Some(url)) => {
                    let url_ok = check_url(&url, "checksum_url", "checksum_url", cx);
                    match algorithm {
                        Some(algorithm) if url_ok => Some(ChecksumSpec::File { url, algorithm }),
                        Some(_) => None,
                        None => {
                            if !cx.has_errors_at("algorithm") {
                                cx.error(
                                    m.pos,
                                    "algorithm",
                                    "missing required field `algorithm` (sha256 or sha512) for `checksum_url`",
                                );
                            }
                            None
                        }
                    }
                }
                (None, None) => {
                    cx.error(
                        m.pos,
                        "checksum",
                        "missing `checksum` (sha256:HEX) or `checksum_url` + `algorithm`: every download is verified",
                    );
                    None
                }
            };
            match (urls, file, checksum) {
                (Some(urls), Some(file), Some(checksum)) if ok => Some(ImageSource::Download {
                    urls,
                    file,
                    checksum,
                }),
                _ => None,
            }
        }
        Some(SourceKind::Build) => {
            for key in ["urls", "file", "checksum", "checksum_url", "algorithm"] {
                not_for(&mut m, key, "download", cx);
            }
            let recipe: Option<String> = m.req("recipe", cx);
            if disk.is_none() && !cx.has_errors_at("disk") {
                cx.error(
                    m.pos,
                    "disk",
                    "missing required field `disk` (the file the recipe writes)",
                );
            }
            recipe.and_then(|recipe| {
                if recipe.starts_with('/') || recipe.split('/').any(|c| c == "..") {
                    cx.error_at_path(
                        "recipe",
                        "the recipe is a path relative to the catalog file, inside images/",
                    );
                    return None;
                }
                let recipe_path = dir.map(|d| d.join(&recipe));
                Some(ImageSource::Build {
                    recipe,
                    recipe_path,
                })
            })
        }
        None => None,
    };

    for (key, v) in [("disk", &disk), ("kernel", &kernel), ("initrd", &initrd)] {
        if let Some(f) = v {
            if !valid_file_name(f) && !cx.has_errors_at(key) {
                cx.error_at_path(key, format!("`{f}` cannot be a cache file name"));
            }
        }
    }
    match boot {
        Some(BootMethod::DirectKernel) => {
            if matches!(kind, Some(SourceKind::Download)) {
                cx.error_at_path(
                    "boot",
                    "direct-kernel boot needs the kernel and initrd beside the disk: only source: build provides them",
                );
            }
            for (key, v) in [("kernel", &kernel), ("initrd", &initrd)] {
                if v.is_none() {
                    cx.error(
                        m.pos,
                        key,
                        format!("missing required field `{key}` for boot: direct-kernel"),
                    );
                }
            }
        }
        Some(BootMethod::Firmware) => {
            for key in ["kernel", "initrd"] {
                if let Some(n) = m.node(key) {
                    cx.error(
                        n.pos,
                        key,
                        format!("`{key}` applies only to boot: direct-kernel"),
                    );
                }
            }
        }
        None => {}
    }
    if first_boot == Some(FirstBoot::KthwSeed) && boot == Some(BootMethod::Firmware) {
        if let Some(n) = m.node("first_boot") {
            cx.error(
                n.pos,
                "first_boot",
                "first_boot: kthw-seed needs boot: direct-kernel (the tool sets the kernel command line)",
            );
        }
    }
    m.finish(cx);
    if cx.has_errors() {
        return None;
    }
    Some(ImageSpec {
        name: name.to_string(),
        description,
        origin: cx.file.clone(),
        source: source?,
        format: format?,
        boot: boot?,
        first_boot: first_boot?,
        disk: disk?,
        kernel,
        initrd,
    })
}

fn required_keyword<T: Keyword>(m: &mut MapReader, key: &str, cx: &mut Ctx) -> Option<T> {
    match m.node(key) {
        Some(n) => crate::scenario::decode::keyword(n, key, cx),
        None => {
            let words: Vec<&str> = T::WORDS.iter().map(|(w, _)| *w).collect();
            cx.error(
                m.pos,
                key,
                format!("missing required field `{key}` ({})", words.join(" or ")),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_loads_and_matches_the_names() {
        let cat = Catalog::builtin().unwrap_or_else(|e| panic!("{}", e.report()));
        assert_eq!(cat.names(), BUILTIN_IMAGE_NAMES);
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, BUILTIN_IMAGE_NAMES);
    }

    #[test]
    fn shipped_entries_have_the_expected_shape() {
        let cat = Catalog::builtin().unwrap();
        let ubuntu = cat.get("ubuntu-24.04").unwrap();
        assert!(matches!(
            &ubuntu.source,
            ImageSource::Download { checksum: ChecksumSpec::File { algorithm: Algorithm::Sha256, .. }, file, .. }
                if file == "noble-server-cloudimg-amd64.img"
        ));
        let debian = cat.get("debian-12").unwrap();
        assert!(matches!(
            &debian.source,
            ImageSource::Download {
                checksum: ChecksumSpec::File {
                    algorithm: Algorithm::Sha512,
                    ..
                },
                ..
            }
        ));
        let kthw = cat.get("kthw-debian12").unwrap();
        assert_eq!(kthw.boot, BootMethod::DirectKernel);
        assert_eq!(
            kthw.artifact_names(),
            ["disk.qcow2", "vmlinuz", "initrd.img"]
        );
        assert!(matches!(
            &kthw.source,
            ImageSource::Build { recipe, recipe_path: None } if recipe == "kthw-debian12/build.sh"
        ));
    }

    #[test]
    fn url_file_names() {
        assert_eq!(url_file_name("https://h/a/b.img?x=1#f"), Some("b.img"));
        assert_eq!(url_file_name("https://h/"), None);
        assert_eq!(url_file_name("https://h"), None);
    }
}
