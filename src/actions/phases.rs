//! The real phases this build can run, in pipeline order, and the removers that
//! undo them. Each phase is a thin adapter from the plan to a host module; the
//! runner reports any phase missing from the list.

use std::path::PathBuf;

use super::teardown::Remover;
use super::{Action, Phase, RunCtx};
use crate::cache::{CacheError, CachedImage, Catalog, Progress as CacheProgress};
use crate::error::{Error, Result};
use crate::host::net::{LinuxNet, NetError, NetHost, NetworkSpec};
use crate::plan::LabPlan;

/// Options that reach the phases from the command line.
#[derive(Debug, Clone)]
pub struct PhaseOptions {
    pub connect: String,
    pub state_dir: PathBuf,
    /// Where `images/` (the catalog and recipes) is looked up, besides the built-in one.
    pub catalog_roots: Vec<PathBuf>,
}

pub fn actions(_plan: &LabPlan, opts: &PhaseOptions) -> Vec<Box<dyn Action>> {
    vec![
        Box::new(NetworkPhase {
            net: LinuxNet::new(&opts.state_dir),
        }),
        Box::new(ImagePhase { opts: opts.clone() }),
        Box::new(PkiPhase),
    ]
}

pub(crate) fn pki_error(e: crate::pki::PkiError) -> Error {
    Error::Provision {
        what: "the lab's certificates".into(),
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

/// Certificates, kubeconfigs and the encryption config, in the lab's state dir.
/// Existing keys and certificates that still match the plan are kept.
struct PkiPhase;

impl Action for PkiPhase {
    fn phase(&self) -> Phase {
        Phase::Pki
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let line = cx.progress.line("pki", "certificates");
        let report = crate::pki::ensure_pki(cx.plan).map_err(pki_error)?;
        line.set("kubeconfigs and encryption config");
        let kubeconfigs = crate::pki::ensure_kubeconfigs(cx.plan).map_err(pki_error)?;
        crate::pki::ensure_encryption_config(cx.plan).map_err(pki_error)?;
        let findings = crate::pki::lint(cx.plan);
        if let Some(f) = findings.first() {
            line.fail("the new certificates do not pass the linter");
            return Err(Error::Provision {
                what: format!(
                    "certificate `{}` fails check `{}` right after issuing ({} finding(s))",
                    f.cert,
                    f.check,
                    findings.len()
                ),
                hint: format!("see `kthw-lab certs check {}`", cx.plan.lab),
                source: None,
            });
        }
        line.done(&format!(
            "{}; {} kubeconfigs",
            report.summary(),
            kubeconfigs.len()
        ));
        Ok(())
    }
}

pub(crate) fn cache_error(what: String, e: CacheError) -> Error {
    Error::Provision {
        what,
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

/// The lab's base image from the cache: pulled or built and verified on first use,
/// then just looked up (cheap), so every phase that needs its paths calls this.
pub(crate) fn lab_image(
    plan: &LabPlan,
    opts: &PhaseOptions,
    progress: CacheProgress,
) -> Result<CachedImage> {
    let catalog = Catalog::load(&opts.catalog_roots).map_err(|e| Error::Other {
        what: format!("the image catalog is invalid:\n{}", e.report().trim_end()),
        hint: Some(e.hint()),
        source: None,
    })?;
    crate::cache::blocking::ensure_image(&catalog, &plan.image, &opts.state_dir, progress)
        .map_err(|e| cache_error(format!("cannot get image `{}`", plan.image), e))
}

struct ImagePhase {
    opts: PhaseOptions,
}

impl Action for ImagePhase {
    fn phase(&self) -> Phase {
        Phase::Image
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let img = lab_image(cx.plan, &self.opts, CacheProgress::Auto)?;
        if let Some(a) = img.manifest.artifacts.first() {
            cx.note("image_digest", format!("{}:{}", a.file, a.checksum));
        }
        cx.note("image_source", img.manifest.source.clone());
        cx.progress.println(&format!(
            "    image {} {} ({})",
            img.name,
            if img.fetched {
                "is now cached"
            } else {
                "was already cached"
            },
            img.disk.display()
        ));
        Ok(())
    }
}

/// Everything that removes a lab's things, consumers first.
pub fn removers(opts: &PhaseOptions) -> Vec<Box<dyn Remover>> {
    vec![Box::new(NetworkRemover {
        net: LinuxNet::new(&opts.state_dir),
    })]
}

pub(crate) fn net_error(e: NetError) -> Error {
    Error::Provision {
        what: "the lab network on the host".into(),
        hint: e.hint(),
        source: Some(Box::new(e)),
    }
}

struct NetworkPhase {
    net: LinuxNet,
}

impl Action for NetworkPhase {
    fn phase(&self) -> Phase {
        Phase::Network
    }

    fn run(&self, cx: &RunCtx) -> Result<()> {
        let spec = NetworkSpec::from_plan(cx.plan);
        let line = cx.progress.line(&spec.bridge, "bridge, addresses, NAT");
        match self.net.ensure_network(&spec) {
            Ok(report) => {
                for w in &report.warnings {
                    cx.progress.println(&format!("warning: {w}"));
                }
                if let Some(u) = &report.uplink {
                    cx.note("uplink", u.clone());
                }
                line.done(if report.changed() {
                    "created"
                } else {
                    "already in place"
                });
                Ok(())
            }
            Err(e) => {
                line.fail(&e.to_string());
                Err(net_error(e))
            }
        }
    }
}

struct NetworkRemover {
    net: LinuxNet,
}

impl Remover for NetworkRemover {
    fn what(&self) -> &'static str {
        "network"
    }

    fn remove(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let r = self.net.remove_network(lab).map_err(net_error)?;
        let mut out: Vec<String> = r
            .bridges_removed
            .iter()
            .map(|b| format!("bridge {b}"))
            .collect();
        out.extend(r.tables_removed.iter().map(|t| format!("nft table {t}")));
        if !r.routes_removed.is_empty() {
            out.push(format!("{} pod routes", r.routes_removed.len()));
        }
        if r.ip_forward_restored {
            out.push("ip_forward restored to 0".into());
        }
        Ok(out)
    }

    fn residue(&self, lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        let s = self.net.observe(lab).map_err(net_error)?;
        let mut out: Vec<String> = s
            .bridges
            .iter()
            .map(|b| format!("bridge {}", b.name))
            .collect();
        out.extend(s.tables.iter().map(|t| format!("nft table {t}")));
        Ok(out)
    }
}
