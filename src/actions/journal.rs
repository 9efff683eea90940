//! The journal: which phases of a lab completed, saved after every change so an
//! interrupted `create` knows where it stood. Written atomically (temp + rename).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Phase;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseState {
    Running,
    Done,
    Failed,
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: Phase,
    pub state: PhaseState,
    /// Unix seconds.
    pub started: u64,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub lab: String,
    /// sha256 of the plan JSON the phases ran against.
    pub plan_sha256: String,
    pub phases: Vec<PhaseRecord>,
    #[serde(skip)]
    path: PathBuf,
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, fsync,
/// rename over the target.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

impl Journal {
    /// The journal at `path`, or a new one when absent or written for another plan.
    pub fn open(path: &Path, lab: &str, plan_sha256: &str) -> std::io::Result<Journal> {
        let fresh = Journal {
            lab: lab.to_string(),
            plan_sha256: plan_sha256.to_string(),
            phases: Vec::new(),
            path: path.to_path_buf(),
        };
        match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Journal>(&bytes) {
                Ok(mut j) if j.plan_sha256 == plan_sha256 && j.lab == lab => {
                    j.path = path.to_path_buf();
                    Ok(j)
                }
                // Another plan, or unreadable: phases must run again.
                _ => Ok(fresh),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(fresh),
            Err(e) => Err(e),
        }
    }

    /// The journal at `path` as it is, whatever plan it was written for; `None` when
    /// there is none or it is unreadable.
    pub fn read(path: &Path) -> Option<Journal> {
        let mut j: Journal = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        j.path = path.to_path_buf();
        Some(j)
    }

    /// Save to `path` (for a journal read back with serde, which has no path).
    pub fn save_to(&mut self, path: &Path) -> std::io::Result<()> {
        self.path = path.to_path_buf();
        self.save()
    }

    pub fn save(&self) -> std::io::Result<()> {
        let mut s = serde_json::to_string_pretty(self).expect("journal serializes");
        s.push('\n');
        write_atomic(&self.path, s.as_bytes(), 0o600)
    }

    pub fn get(&self, phase: Phase) -> Option<&PhaseRecord> {
        self.phases.iter().find(|r| r.phase == phase)
    }

    pub fn is_done(&self, phase: Phase) -> bool {
        self.get(phase).is_some_and(|r| r.state == PhaseState::Done)
    }

    pub fn set(&mut self, rec: PhaseRecord) {
        match self.phases.iter_mut().find(|r| r.phase == rec.phase) {
            Some(r) => *r = rec,
            None => {
                self.phases.push(rec);
                self.phases.sort_by_key(|r| r.phase);
            }
        }
    }

    /// Forget phases from `phase` on (their results no longer hold).
    pub fn invalidate_from(&mut self, phase: Phase) {
        self.phases.retain(|r| r.phase < phase);
    }
}
