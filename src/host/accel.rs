//! Which accelerator the lab's domains use: KVM when it can work, TCG (software
//! emulation, libvirt `<domain type='qemu'>`) otherwise.
//!
//! `/dev/kvm` alone is not enough: some hosts expose a paravirtual KVM without the
//! CPU's vmx/svm flags, and a stock guest kernel does not boot there. So `auto` takes KVM
//! only when `/dev/kvm` opens AND `/proc/cpuinfo` shows vmx or svm.

use crate::scenario::Accelerator;

/// The accelerator a domain is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The libvirt domain type.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// What the host offers, as far as the choice is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccelProbe {
    /// `/dev/kvm` could be opened read-write.
    pub kvm_opens: bool,
    /// `/proc/cpuinfo` lists `vmx` or `svm`.
    pub cpu_has_virt: bool,
}

/// The decision, with a one-line warning when `auto` falls back to TCG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub warning: Option<String>,
}

/// Pure decision. Forced choices are honoured as asked (preflight may still refuse `kvm`).
pub fn decide(requested: Accelerator, probe: AccelProbe) -> AccelChoice {
    match requested {
        Accelerator::Kvm => AccelChoice {
            accel: Accel::Kvm,
            warning: None,
        },
        Accelerator::Tcg => AccelChoice {
            accel: Accel::Tcg,
            warning: None,
        },
        Accelerator::Auto if probe.kvm_opens && probe.cpu_has_virt => AccelChoice {
            accel: Accel::Kvm,
            warning: None,
        },
        Accelerator::Auto => {
            let why = match (probe.kvm_opens, probe.cpu_has_virt) {
                (false, false) => "/dev/kvm cannot be opened and the CPU shows no vmx/svm",
                (false, true) => "/dev/kvm cannot be opened",
                _ => "the CPU shows no vmx/svm (paravirtual /dev/kvm)",
            };
            AccelChoice {
                accel: Accel::Tcg,
                warning: Some(format!(
                    "using software emulation (TCG): {why}; guests run several times slower than with KVM"
                )),
            }
        }
    }
}

/// Whether a `/proc/cpuinfo` text lists the vmx or svm flag.
pub fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// Probe this host (thin: the decision is [`decide`]).
pub fn probe() -> AccelProbe {
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpu_has_virt = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| cpuinfo_has_virt(&t))
        .unwrap_or(false);
    AccelProbe {
        kvm_opens,
        cpu_has_virt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO: AccelProbe = AccelProbe {
        kvm_opens: false,
        cpu_has_virt: false,
    };

    #[test]
    fn auto_needs_both_device_and_flags() {
        let both = AccelProbe {
            kvm_opens: true,
            cpu_has_virt: true,
        };
        assert_eq!(decide(Accelerator::Auto, both).accel, Accel::Kvm);
        assert!(decide(Accelerator::Auto, both).warning.is_none());
        for p in [
            NO,
            AccelProbe {
                kvm_opens: true,
                cpu_has_virt: false,
            },
            AccelProbe {
                kvm_opens: false,
                cpu_has_virt: true,
            },
        ] {
            let c = decide(Accelerator::Auto, p);
            assert_eq!(c.accel, Accel::Tcg);
            let w = c.warning.expect("auto fallback warns");
            assert!(!w.contains('\n') && w.contains("TCG"), "{w}");
        }
    }

    #[test]
    fn forced_choices_are_kept() {
        assert_eq!(decide(Accelerator::Kvm, NO).accel, Accel::Kvm);
        assert_eq!(decide(Accelerator::Tcg, NO).accel, Accel::Tcg);
        assert_eq!(Accel::Tcg.domain_type(), "qemu");
        assert_eq!(Accel::Kvm.domain_type(), "kvm");
    }

    #[test]
    fn cpu_flags() {
        assert!(cpuinfo_has_virt(
            "processor\t: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_virt("flags\t\t: fpu svm\n"));
        assert!(!cpuinfo_has_virt(
            "flags\t\t: fpu vme hypervisor\nvmx flags\t: ept\n"
        ));
        assert!(!cpuinfo_has_virt(""));
    }
}
