//! Teardown keeps going past a failing remover, proves residue, and says so.

use std::sync::{Arc, Mutex};

use kthw_lab::actions::teardown::{teardown, Remover};
use kthw_lab::actions::Progress;
use kthw_lab::error::{Error, Result};
use kthw_lab::plan::LabPlan;

/// A stand-in for one kind of owned thing: a set of items, optionally stuck.
struct Things {
    what: &'static str,
    items: Arc<Mutex<Vec<String>>>,
    stuck: bool,
}

impl Remover for Things {
    fn what(&self) -> &'static str {
        self.what
    }
    fn remove(&self, _lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        if self.stuck {
            return Err(Error::other(format!("{} is busy", self.what)));
        }
        Ok(std::mem::take(&mut *self.items.lock().unwrap()))
    }
    fn residue(&self, _lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        Ok(self.items.lock().unwrap().clone())
    }
}

fn things(
    what: &'static str,
    items: &[&str],
    stuck: bool,
) -> (Box<dyn Remover>, Arc<Mutex<Vec<String>>>) {
    let v = Arc::new(Mutex::new(items.iter().map(|s| s.to_string()).collect()));
    (
        Box::new(Things {
            what,
            items: v.clone(),
            stuck,
        }),
        v,
    )
}

#[test]
fn removes_everything_and_reports_clean() {
    let (a, av) = things("domains", &["lab-m1", "lab-n1"], false);
    let (b, bv) = things("network", &["bridge br0"], false);
    let p = Progress::capturing();
    let r = teardown("lab", None, &[a, b], &p);
    assert!(r.clean(), "{r:?}");
    assert_eq!(r.removed, vec!["lab-m1", "lab-n1", "bridge br0"]);
    assert!(av.lock().unwrap().is_empty() && bv.lock().unwrap().is_empty());
    assert!(p
        .captured()
        .iter()
        .any(|l| l.starts_with("  domains: removed lab-m1, lab-n1")));
    // Twice is fine: nothing left to remove.
    let (a, _) = things("domains", &[], false);
    let r = teardown("lab", None, &[a], &p);
    assert!(r.clean());
    assert!(p
        .captured()
        .iter()
        .any(|l| l.starts_with("  domains: nothing to remove")));
}

#[test]
fn a_failing_remover_does_not_stop_the_others_and_residue_is_an_error() {
    let (a, _) = things("load balancer", &["pid 42"], true);
    let (b, bv) = things("network", &["bridge br0", "table kthw_lab"], false);
    let p = Progress::capturing();
    let r = teardown("lab", None, &[a, b], &p);
    assert!(bv.lock().unwrap().is_empty(), "later removers still ran");
    assert!(!r.clean());
    assert_eq!(r.failures, vec!["load balancer: load balancer is busy"]);
    assert_eq!(r.residue, vec!["load balancer: pid 42"]);
    let e = r.into_result("lab").unwrap_err();
    assert_eq!(e.exit_code(), 10);
    assert_eq!(
        e.to_string(),
        "host provisioning failed: could not remove everything of lab `lab`: load balancer: load balancer is busy; still there: load balancer: pid 42"
    );
    assert!(e
        .report()
        .contains("hint: fix the cause above and run `kthw-lab destroy lab` again"));
}

/// A daemon that cannot be reached fails removing and checking alike.
struct Unreachable;

impl Remover for Unreachable {
    fn what(&self) -> &'static str {
        "domains"
    }
    fn remove(&self, _lab: &str, _plan: Option<&LabPlan>) -> Result<Vec<String>> {
        Err(Error::Provision {
            what: "cannot connect to libvirt at qemu:///system: socket gone".into(),
            hint: "libvirtd is not running: start it".into(),
            source: None,
        })
    }
    fn residue(&self, lab: &str, plan: Option<&LabPlan>) -> Result<Vec<String>> {
        self.remove(lab, plan)
    }
}

#[test]
fn one_cause_is_reported_once_with_its_hint() {
    let (b, _) = things("network", &["bridge br0"], false);
    let p = Progress::capturing();
    let r = teardown("lab", None, &[Box::new(Unreachable), b], &p);
    assert_eq!(
        r.failures,
        vec!["domains: cannot connect to libvirt at qemu:///system: socket gone"]
    );
    let e = r.into_result("lab").unwrap_err();
    let report = e.report();
    assert_eq!(report.matches("socket gone").count(), 1, "{report}");
    assert!(
        report.contains(
            "hint: libvirtd is not running: start it; then run `kthw-lab destroy lab` again"
        ),
        "{report}"
    );
    // The progress line points at the error instead of repeating it.
    let lines = p.captured();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  domains: failed: the error below says why")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("socket gone")),
        "{lines:?}"
    );
}
