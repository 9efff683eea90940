//! Read-only facts about the host that planning and preflight need.

use std::path::Path;

/// MemTotal from a /proc/meminfo text, in MiB. (libvirt's nodeinfo under-reports
/// memory on some hosts, so the kernel's own figure is used.)
pub fn parse_meminfo_total_mib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

pub fn memory_mib() -> std::io::Result<u64> {
    let text = std::fs::read_to_string(Path::new("/proc/meminfo"))?;
    parse_meminfo_total_mib(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemTotal line in /proc/meminfo",
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo() {
        let t = "MemTotal:       24563472 kB\nMemFree:  1 kB\n";
        assert_eq!(super::parse_meminfo_total_mib(t), Some(23987));
        assert_eq!(super::parse_meminfo_total_mib("nothing"), None);
    }
}
