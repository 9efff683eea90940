//! Verified, resumable downloads.
//!
//! A download streams into `DEST.part` while a blocking writer thread appends and
//! hashes each chunk (network and hashing overlap on two cores). When a `.part`
//! exists it is hashed first and the rest is asked for with `Range: bytes=N-`: a 206
//! appends, a 200 (server ignores ranges) starts over, a 416 means the part is
//! already whole or unusable. Transient failures (connection, timeout, cut stream,
//! 408/429/5xx) are retried a bounded number of times with exponential backoff; the
//! digest is checked before the rename into place, and a `.part` that fails the
//! check is deleted. The server's validator (a strong ETag, else Last-Modified) is
//! kept in `DEST.part.validator` and sent as `If-Range`, so a part of a file that
//! changed upstream since (a rebuilt "current" image) is replaced, not extended.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};

use super::checksum::{Algorithm, Checksum, Hasher};
use super::error::CacheError;
use super::lock;
use super::manifest::{self, sibling, ArtifactRecord, Manifest};
use super::progress::{Progress, Reporter};

/// Tunables of the download engine; `Default` is what the tool uses.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Consecutive failed attempts (without any new bytes) before giving up.
    pub attempts: u32,
    /// Attempts while the server has never answered (no route, refused, DNS): an
    /// offline host should hear "use cache import" in seconds, not minutes.
    pub connect_attempts: u32,
    /// Wait before the first retry; doubles per consecutive failure, at most 30 s.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// Give up on an attempt when no byte arrived for this long.
    pub stall_timeout: Duration,
    /// Honour HTTP_PROXY/HTTPS_PROXY/NO_PROXY from the environment.
    pub use_env_proxy: bool,
    /// How often plain-line progress is printed.
    pub log_interval: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            attempts: 5,
            connect_attempts: 2,
            backoff: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            use_env_proxy: true,
            log_interval: Duration::from_secs(10),
        }
    }
}

impl FetchOptions {
    /// For a file that is nice to have: one connect attempt with a short timeout, so
    /// an offline host loses seconds, not a minute, before going on without it.
    pub fn quick() -> FetchOptions {
        FetchOptions {
            connect_attempts: 1,
            connect_timeout: Duration::from_secs(5),
            ..FetchOptions::default()
        }
    }

    pub(crate) fn client(&self) -> Result<reqwest::Client, CacheError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .user_agent(concat!("kthw-lab/", env!("CARGO_PKG_VERSION")));
        if !self.use_env_proxy {
            b = b.no_proxy();
        }
        b.build().map_err(|source| CacheError::Client { source })
    }

    fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(5);
        (self.backoff * factor).min(Duration::from_secs(30))
    }
}

/// The result of a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub size: u64,
    pub checksum: Checksum,
    /// The URL the bytes came from (`None` when the file was already cached).
    pub url: Option<String>,
    /// Bytes received over the network by this call.
    pub transferred: u64,
    /// Bytes of an earlier `.part` that were kept (resume across runs).
    pub resumed_from: u64,
    /// Wall time spent downloading and verifying.
    pub elapsed: Duration,
}

/// Download `url` to `dest` unless `dest` is already there with the `expected`
/// digest; writes `DEST.manifest.json`. Holds `DEST.lock` throughout, so parallel
/// callers (threads or processes) download once: the others wait, then find it done.
pub async fn fetch(
    url: &str,
    expected: &Checksum,
    dest: &Path,
    progress: Progress,
) -> Result<Fetched, CacheError> {
    fetch_with(
        &FetchOptions::default(),
        &[url.to_string()],
        expected,
        dest,
        progress,
    )
    .await
}

/// [`fetch`] with explicit options and mirrors (tried in order).
pub async fn fetch_with(
    opts: &FetchOptions,
    urls: &[String],
    expected: &Checksum,
    dest: &Path,
    progress: Progress,
) -> Result<Fetched, CacheError> {
    let what = dest
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| dest.display().to_string());
    let _lock = lock::lock(&sibling(dest, ".lock"), &what, progress).await?;
    let manifest_path = sibling(dest, ".manifest.json");
    if let Some(done) = already_there(dest, &manifest_path, expected).await? {
        return Ok(done);
    }
    let client = opts.client()?;
    let got = download_verified(&client, opts, urls, expected, dest, &what, progress).await?;
    Manifest {
        name: what,
        source: "download".into(),
        url: got.url.clone(),
        checksum_source: Some("caller".into()),
        recipe_sha256: None,
        fetched_at: manifest::now_rfc3339(),
        artifacts: vec![ArtifactRecord {
            file: dest
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size: got.size,
            checksum: got.checksum.clone(),
        }],
    }
    .write(&manifest_path)?;
    Ok(got)
}

/// `Some` when `dest` already holds the expected bytes (recorded, or re-hashed when
/// the record is missing, e.g. after a crash between the rename and the manifest).
async fn already_there(
    dest: &Path,
    manifest_path: &Path,
    expected: &Checksum,
) -> Result<Option<Fetched>, CacheError> {
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(None);
    };
    let done = |size| Fetched {
        path: dest.to_path_buf(),
        size,
        checksum: expected.clone(),
        url: None,
        transferred: 0,
        resumed_from: 0,
        elapsed: Duration::ZERO,
    };
    if let Ok(Some(m)) = Manifest::read(manifest_path) {
        if m.artifacts.len() == 1
            && m.artifacts[0].checksum == *expected
            && m.artifacts[0].size == meta.len()
        {
            return Ok(Some(done(meta.len())));
        }
    }
    let (sum, size) = hash_path(expected.algorithm, dest.to_path_buf()).await?;
    if sum == *expected {
        Manifest {
            name: dest
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            source: "download".into(),
            url: None,
            checksum_source: Some("caller".into()),
            recipe_sha256: None,
            fetched_at: manifest::now_rfc3339(),
            artifacts: vec![ArtifactRecord {
                file: dest
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                size,
                checksum: sum,
            }],
        }
        .write(manifest_path)?;
        return Ok(Some(done(size)));
    }
    std::fs::remove_file(dest).map_err(|e| CacheError::io("remove the stale file", dest, e))?;
    Ok(None)
}

/// Hash a file on the blocking pool.
pub(crate) async fn hash_path(
    algorithm: Algorithm,
    path: PathBuf,
) -> Result<(Checksum, u64), CacheError> {
    tokio::task::spawn_blocking(move || {
        super::checksum::hash_file(algorithm, &path).map_err(|e| CacheError::io("read", &path, e))
    })
    .await
    .expect("the hashing task does not panic")
}

/// Download from the first mirror that works into `dest` (no lock, no manifest).
pub(crate) async fn download_verified(
    client: &reqwest::Client,
    opts: &FetchOptions,
    urls: &[String],
    expected: &Checksum,
    dest: &Path,
    label: &str,
    progress: Progress,
) -> Result<Fetched, CacheError> {
    let mut last = None;
    for url in urls {
        match download_one(client, opts, url, expected, dest, label, progress).await {
            Ok(f) => return Ok(f),
            Err(e) => {
                if urls.len() > 1 {
                    progress.note(&format!("{url} failed: {e}"));
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| CacheError::HttpStatus {
        url: "(no URL given)".into(),
        status: 0,
    }))
}

async fn download_one(
    client: &reqwest::Client,
    opts: &FetchOptions,
    url: &str,
    expected: &Checksum,
    dest: &Path,
    label: &str,
    progress: Progress,
) -> Result<Fetched, CacheError> {
    let part = sibling(dest, ".part");
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CacheError::io("create", dir, e))?;
    }
    let started = Instant::now();
    let mut from_scratch_again = false;
    loop {
        let mut reporter = Reporter::new(progress, label, opts.log_interval);
        let t = transfer(client, opts, url, expected.algorithm, &part, &mut reporter).await?;
        let actual = t.hasher.finish();
        if actual == *expected {
            let res = std::fs::File::open(&part)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::rename(&part, dest));
            res.map_err(|e| CacheError::io("move into place", dest, e))?;
            let _ = std::fs::remove_file(validator_path(&part));
            manifest::sync_parent(dest);
            reporter.finish("verified");
            return Ok(Fetched {
                path: dest.to_path_buf(),
                size: t.size,
                checksum: actual,
                url: Some(url.to_string()),
                transferred: t.transferred,
                resumed_from: t.resumed_from,
                elapsed: started.elapsed(),
            });
        }
        reporter.finish("failed verification");
        discard_part(&part);
        if t.used_range && !from_scratch_again {
            // The pieces may come from two versions of an upstream file that changed
            // between attempts: one clean download decides.
            from_scratch_again = true;
            progress.note(&format!(
                "{url}: the resumed download does not match {expected}; downloading it again from the start"
            ));
            continue;
        }
        return Err(CacheError::ChecksumMismatch {
            url: url.to_string(),
            part,
            expected: expected.clone(),
            actual,
        });
    }
}

struct Transfer {
    hasher: Hasher,
    size: u64,
    transferred: u64,
    resumed_from: u64,
    /// Some bytes came from a ranged request or an earlier `.part`.
    used_range: bool,
}

/// A parsed `Content-Range`: the byte range (inclusive) if any, and the total if known.
pub(crate) type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// `bytes START-END/TOTAL` → (Some((START, END)), Some(TOTAL)); `bytes */TOTAL` →
/// (None, Some(TOTAL)); TOTAL may be `*`.
pub(crate) fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        }
    };
    Some((range, total))
}

fn validator_path(part: &Path) -> PathBuf {
    sibling(part, ".validator")
}

/// Remove a partial download and its validator.
fn discard_part(part: &Path) {
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(validator_path(part));
}

/// What `If-Range` may carry: a strong ETag, else Last-Modified.
fn response_validator(h: &reqwest::header::HeaderMap) -> Option<String> {
    let get = |k| {
        h.get(k)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
    };
    get(ETAG)
        .filter(|e| !e.starts_with("W/"))
        .or_else(|| get(LAST_MODIFIED))
        .map(str::to_string)
}

fn hash_prefix(algorithm: Algorithm, path: &Path) -> std::io::Result<(Hasher, u64)> {
    let mut hasher = Hasher::new(algorithm);
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok((hasher, n));
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Msg(String);
impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Msg {}

fn msg(s: String) -> BoxError {
    Box::new(Msg(s))
}

async fn transfer(
    client: &reqwest::Client,
    opts: &FetchOptions,
    url: &str,
    algorithm: Algorithm,
    part: &Path,
    reporter: &mut Reporter,
) -> Result<Transfer, CacheError> {
    let mut hasher = Hasher::new(algorithm);
    let mut have = 0u64;
    if std::fs::metadata(part).is_ok_and(|m| m.len() > 0) {
        let p = part.to_path_buf();
        let (h, n) = tokio::task::spawn_blocking(move || hash_prefix(algorithm, &p))
            .await
            .expect("the hashing task does not panic")
            .map_err(|e| CacheError::io("read", part, e))?;
        hasher = h;
        have = n;
    }
    let mut validator = if have > 0 {
        std::fs::read_to_string(validator_path(part))
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    } else {
        None
    };
    let resumed_from = have;
    let mut used_range = have > 0;
    let mut transferred = 0u64;
    let mut failures = 0u32;
    let mut total_attempts = 0u32;
    let mut answered = false;
    let mut last_err: Option<BoxError> = None;
    let mut connect_err: Option<reqwest::Error> = None;

    loop {
        let limit = if answered {
            opts.attempts
        } else {
            opts.connect_attempts.min(opts.attempts)
        };
        if failures >= limit || total_attempts >= opts.attempts.saturating_mul(8) {
            return Err(match (answered, connect_err) {
                (false, Some(source)) => CacheError::Unreachable {
                    url: url.to_string(),
                    source,
                },
                _ => CacheError::Transfer {
                    url: url.to_string(),
                    attempts: total_attempts,
                    source: last_err.unwrap_or_else(|| msg("unknown failure".into())),
                },
            });
        }
        if failures > 0 {
            let wait = opts.delay(failures);
            reporter.println(&format!(
                "{url}: {}; retrying in {:.1}s",
                last_err
                    .as_ref()
                    .map(|e| error_chain(e.as_ref()))
                    .unwrap_or_default(),
                wait.as_secs_f64()
            ));
            tokio::time::sleep(wait).await;
        }
        total_attempts += 1;

        let mut req = client.get(url);
        if have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
            if let Some(v) = &validator {
                req = req.header(IF_RANGE, v.as_str());
            }
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                last_err = Some(msg(error_chain(&e)));
                if !answered {
                    connect_err = Some(e);
                }
                continue;
            }
        };
        answered = true;
        let status = resp.status().as_u16();
        let content_range = resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        let (append, total) = match status {
            206 => match content_range {
                Some((Some((start, _end)), total)) if start == have => {
                    used_range = true;
                    (
                        true,
                        total.or_else(|| resp.content_length().map(|l| have + l)),
                    )
                }
                _ => {
                    reporter.println(&format!(
                        "{url}: the server answered a range other than bytes={have}-; starting over"
                    ));
                    have = 0;
                    hasher = Hasher::new(algorithm);
                    discard_part(part);
                    validator = None;
                    failures += 1;
                    last_err = Some(msg("unexpected Content-Range".into()));
                    continue;
                }
            },
            200 => {
                if have > 0 {
                    reporter.println(&format!(
                        "{url}: the server ignored the range request; starting over"
                    ));
                }
                have = 0;
                hasher = Hasher::new(algorithm);
                (false, resp.content_length())
            }
            416 => {
                let whole = content_range.and_then(|(_, t)| t);
                if have > 0 && whole == Some(have) {
                    // The part already holds the whole file.
                    reporter.start(have, whole);
                    return Ok(Transfer {
                        hasher,
                        size: have,
                        transferred,
                        resumed_from,
                        used_range,
                    });
                }
                reporter.println(&format!(
                    "{url}: the partial file does not fit the server's file; starting over"
                ));
                have = 0;
                hasher = Hasher::new(algorithm);
                discard_part(part);
                validator = None;
                failures += 1;
                last_err = Some(msg("416 range not satisfiable".into()));
                continue;
            }
            408 | 429 | 500..=599 => {
                failures += 1;
                last_err = Some(msg(format!("the server answered {}", resp.status())));
                continue;
            }
            _ => {
                return Err(CacheError::HttpStatus {
                    url: url.to_string(),
                    status,
                })
            }
        };
        reporter.start(have, total);
        let now = response_validator(resp.headers());
        if now != validator {
            let vp = validator_path(part);
            let res = match &now {
                Some(v) => std::fs::write(&vp, v),
                None => std::fs::remove_file(&vp).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }),
            };
            res.map_err(|e| CacheError::io("write", &vp, e))?;
            validator = now;
        }

        let file = if append {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(part)
        } else {
            std::fs::File::create(part)
        }
        .map_err(|e| CacheError::io("open", part, e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let writer = tokio::task::spawn_blocking(move || write_loop(file, hasher, rx));
        let mut stream_err: Option<BoxError> = None;
        loop {
            match tokio::time::timeout(opts.stall_timeout, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    let n = chunk.len() as u64;
                    if tx.send(chunk).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                    reporter.advance(n);
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    stream_err = Some(msg(error_chain(&e)));
                    break;
                }
                Err(_) => {
                    stream_err = Some(msg(format!(
                        "no data for {}s",
                        opts.stall_timeout.as_secs()
                    )));
                    break;
                }
            }
        }
        drop(tx);
        drop(resp);
        let (h, written, res) = writer.await.expect("the writer task does not panic");
        hasher = h;
        have += written;
        transferred += written;
        res.map_err(|e| CacheError::io("write", part, e))?;
        if stream_err.is_none() {
            if let Some(t) = total {
                if have < t {
                    stream_err = Some(msg(format!(
                        "the connection closed after {have} of {t} bytes"
                    )));
                }
            }
        }
        if let Some(e) = stream_err {
            // Progress resets the count: only attempts that bring nothing add up.
            failures = if written > 0 { 1 } else { failures + 1 };
            last_err = Some(e);
            continue;
        }
        return Ok(Transfer {
            hasher,
            size: have,
            transferred,
            resumed_from,
            used_range,
        });
    }
}

fn write_loop<B: AsRef<[u8]>>(
    file: std::fs::File,
    mut hasher: Hasher,
    mut rx: tokio::sync::mpsc::Receiver<B>,
) -> (Hasher, u64, std::io::Result<()>) {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut n = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        let chunk = chunk.as_ref();
        if let Err(e) = w.write_all(chunk) {
            return (hasher, n, Err(e));
        }
        hasher.update(chunk);
        n += chunk.len() as u64;
    }
    let res = w.flush().and_then(|()| w.get_ref().sync_data());
    (hasher, n, res)
}

/// An error and its causes on one line (reqwest hides the useful part in sources).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// GET a small text file (a checksum list), retrying transient failures.
pub(crate) async fn fetch_text(
    client: &reqwest::Client,
    opts: &FetchOptions,
    url: &str,
    limit: usize,
) -> Result<String, CacheError> {
    let mut failures = 0u32;
    let mut answered = false;
    loop {
        if failures > 0 {
            tokio::time::sleep(opts.delay(failures)).await;
        }
        let resp = match client.get(url).send().await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                let limit = if answered {
                    opts.attempts
                } else {
                    opts.connect_attempts.min(opts.attempts)
                };
                if failures >= limit {
                    return Err(if answered {
                        CacheError::Transfer {
                            url: url.into(),
                            attempts: failures,
                            source: Box::new(e),
                        }
                    } else {
                        CacheError::Unreachable {
                            url: url.into(),
                            source: e,
                        }
                    });
                }
                continue;
            }
        };
        answered = true;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            408 | 429 | 500..=599 if failures + 1 < opts.attempts => {
                failures += 1;
                continue;
            }
            _ => {
                return Err(CacheError::HttpStatus {
                    url: url.into(),
                    status,
                })
            }
        }
        if resp.content_length().is_some_and(|l| l > limit as u64) {
            return Err(CacheError::Transfer {
                url: url.into(),
                attempts: failures + 1,
                source: msg(format!("a checksum list larger than {limit} bytes")),
            });
        }
        match resp.bytes().await {
            Ok(b) if b.len() <= limit => return Ok(String::from_utf8_lossy(&b).into_owned()),
            Ok(_) => {
                return Err(CacheError::Transfer {
                    url: url.into(),
                    attempts: failures + 1,
                    source: msg(format!("a checksum list larger than {limit} bytes")),
                })
            }
            Err(e) => {
                failures += 1;
                if failures >= opts.attempts {
                    return Err(CacheError::Transfer {
                        url: url.into(),
                        attempts: failures,
                        source: Box::new(e),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((Some((100, 199)), Some(200)))
        );
        assert_eq!(parse_content_range("bytes */200"), Some((None, Some(200))));
        assert_eq!(
            parse_content_range("bytes 0-9/*"),
            Some((Some((0, 9)), None))
        );
        assert_eq!(parse_content_range("items 0-9/10"), None);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let o = FetchOptions {
            backoff: Duration::from_secs(2),
            ..FetchOptions::default()
        };
        assert_eq!(o.delay(1), Duration::from_secs(2));
        assert_eq!(o.delay(2), Duration::from_secs(4));
        assert_eq!(o.delay(9), Duration::from_secs(30));
    }
}
