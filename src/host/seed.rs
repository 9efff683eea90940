//! The per-node cloud-init seed: a small FAT volume labelled `CIDATA` holding the
//! NoCloud files, written with the `fatfs` crate (no mkfs/mtools needed).

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::render::cloudinit::SeedFiles;

/// Size of the seed volume: room for the three files with a wide margin.
pub const SEED_BYTES: u64 = 1024 * 1024;
/// The volume label NoCloud looks for.
pub const SEED_LABEL: &[u8; 11] = b"CIDATA     ";

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot write seed {path}: {what}")]
    Write {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read seed {path}: {what}")]
    Read {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove seed {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SeedError {
    pub fn hint(&self) -> String {
        match self {
            SeedError::Write { path, .. } | SeedError::Remove { path, .. } => format!(
                "check that {} is on a writable filesystem with free space and that you run as root",
                path.parent().unwrap_or(Path::new("/")).display()
            ),
            SeedError::Read { .. } => {
                "the seed is damaged or not a kthw-lab seed: remove it and run create again".into()
            }
        }
    }
}

/// Seeds carry a fixed timestamp, so the same content gives byte-identical volumes.
#[derive(Debug)]
struct FixedTime;

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 2020,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

/// Write the seed volume to `path` (atomically: a temp file renamed into place), 0600:
/// it holds the node's SSH host private key. Rewritten every time: it is cheap, and
/// the instance-id inside decides whether cloud-init applies it again.
pub fn write_seed(path: &Path, files: &SeedFiles) -> Result<(), SeedError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source| SeedError::Write {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err("create its directory"))?;
    }
    let tmp = path.with_extension("img.tmp");
    let result = (|| -> Result<(), SeedError> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err("create the temp file"))?;
        // A temp file left by an interrupted run keeps its old mode: set it.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err("make the temp file private"))?;
        f.set_len(SEED_BYTES).map_err(err("size the volume"))?;
        fatfs::format_volume(
            &mut f,
            fatfs::FormatVolumeOptions::new()
                .volume_label(*SEED_LABEL)
                .volume_id(seed_volume_id(files)),
        )
        .map_err(err("format the FAT volume"))?;
        {
            let fs =
                fatfs::FileSystem::new(&mut f, fatfs::FsOptions::new().time_provider(&FIXED_TIME))
                    .map_err(err("open the new FAT volume"))?;
            let root = fs.root_dir();
            for (name, content) in files.entries() {
                if let Some((dir, _)) = name.rsplit_once('/') {
                    root.create_dir(dir)
                        .map_err(err(&format!("create directory {dir}")))?;
                }
                let mut file = root
                    .create_file(&name)
                    .map_err(err(&format!("create {name}")))?;
                file.truncate().map_err(err(&format!("truncate {name}")))?;
                file.write_all(content.as_bytes())
                    .map_err(err(&format!("write {name}")))?;
                file.flush().map_err(err(&format!("flush {name}")))?;
            }
            drop(root);
            fs.unmount().map_err(err("unmount the FAT volume"))?;
        }
        f.sync_all().map_err(err("sync"))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path).map_err(err("rename the temp file into place"))
}

/// A volume serial derived from the content, so the same seed is byte-identical.
fn seed_volume_id(files: &SeedFiles) -> u32 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, content) in files.entries() {
        h.update(name.as_bytes());
        h.update(content.as_bytes());
    }
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Read a seed back: its BPB volume label (trimmed) and its files (paths relative to the
/// volume root, one directory level deep), sorted by path.
pub fn read_seed(path: &Path) -> Result<(String, Vec<(String, String)>), SeedError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source| SeedError::Read {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let f = fs::File::open(path).map_err(err("open"))?;
    let fs =
        fatfs::FileSystem::new(f, fatfs::FsOptions::new()).map_err(err("open the FAT volume"))?;
    let label = fs.volume_label().trim_end().to_string();
    let mut out = Vec::new();
    let mut dirs = vec![(String::new(), fs.root_dir())];
    while let Some((prefix, dir)) = dirs.pop() {
        for entry in dir.iter() {
            let entry = entry.map_err(err("list a directory"))?;
            let name = entry.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}{name}");
            if entry.is_dir() {
                if prefix.is_empty() {
                    dirs.push((format!("{path}/"), entry.to_dir()));
                }
                continue;
            }
            let mut content = String::new();
            entry
                .to_file()
                .read_to_string(&mut content)
                .map_err(err(&format!("read {path}")))?;
            out.push((path, content));
        }
    }
    out.sort();
    Ok((label, out))
}

/// Remove a seed; fine when it is already gone.
pub fn remove_seed(path: &Path) -> Result<(), SeedError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SeedError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}
