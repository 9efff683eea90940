//! The download cache against a small HTTP server on 127.0.0.1 (written here: it
//! honours or ignores Range, cuts connections, serves wrong bytes, fails on demand),
//! plus the catalog, import and local-build paths. No traffic leaves loopback.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kthw_lab::cache::checksum::{find_in_sums, hash_reader, SumsError};
use kthw_lab::cache::{
    Algorithm, Cache, CacheError, Catalog, Checksum, FetchOptions, ImportOutcome, Progress,
};

// ---------------------------------------------------------------- test server

#[derive(Default)]
struct Behaviour {
    /// Cut the connection after this many body bytes, for the next N responses.
    cut_after: Option<(u64, u32)>,
    ignore_range: bool,
    /// Serve these bytes instead of the real content (same length).
    wrong_content: bool,
    /// Answer these statuses to the first requests, in order.
    fail_first: Vec<u16>,
    /// Pause between 64 KiB chunks (to make downloads overlap).
    slow: Option<Duration>,
    /// Send this ETag; honour Range only when If-Range (if sent) equals it.
    etag: Option<String>,
    /// When cutting, hold the connection open silently this long instead of closing.
    stall: Option<Duration>,
    /// Answer a range request with a 206 that starts at 0 (a broken server).
    range_from_zero: bool,
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    if_range: Option<String>,
}

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Seen>>,
    body_bytes: AtomicU64,
}

struct Server {
    base: String,
    state: Arc<State>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        Server { base, state }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    fn put(&self, path: &str, body: Vec<u8>) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(format!("/{}", path.trim_start_matches('/')), Arc::new(body));
    }

    fn behave(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap());
    }

    fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().unwrap().clone()
    }

    fn requests_for(&self, path: &str) -> Vec<Seen> {
        let p = format!("/{}", path.trim_start_matches('/'));
        self.requests()
            .into_iter()
            .filter(|r| r.path == p)
            .collect()
    }

    fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }
}

fn handle(conn: TcpStream, st: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    let mut if_range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
            if k.eq_ignore_ascii_case("if-range") {
                if_range = Some(v.trim().to_string());
            }
        }
    }
    st.requests.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
        if_range: if_range.clone(),
    });
    let mut out = conn;
    let (status_override, cut, mut ignore_range, wrong, slow, etag, stall, from_zero) = {
        let mut b = st.behaviour.lock().unwrap();
        let s = (!b.fail_first.is_empty()).then(|| b.fail_first.remove(0));
        let cut = match &mut b.cut_after {
            Some((n, left)) if *left > 0 => {
                *left -= 1;
                Some(*n)
            }
            _ => None,
        };
        (
            s,
            cut,
            b.ignore_range,
            b.wrong_content,
            b.slow,
            b.etag.clone(),
            b.stall,
            b.range_from_zero,
        )
    };
    // RFC 9110 If-Range: a validator that does not match means "send it all".
    if if_range.is_some() && if_range != etag {
        ignore_range = true;
    }
    let etag_line = etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
    if let Some(code) = status_override {
        write!(
            out,
            "HTTP/1.1 {code} Failing\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    let Some(mut body) = st.files.lock().unwrap().get(&path).cloned() else {
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    };
    if wrong {
        for b in Arc::make_mut(&mut body).iter_mut() {
            *b ^= 0x5a;
        }
    }
    let len = body.len() as u64;
    let start = match (&range, ignore_range) {
        (Some(r), false) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok()),
        _ => None,
    };
    let start = start.map(|s| if from_zero { 0 } else { s });
    let (head, slice) = match start {
        Some(s) if s >= len => {
            write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        Some(s) => (
            format!(
                "HTTP/1.1 206 Partial Content\r\n{etag_line}Content-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                len - 1,
                len - s
            ),
            &body[s as usize..],
        ),
        None => (
            format!("HTTP/1.1 200 OK\r\n{etag_line}Content-Length: {len}\r\nConnection: close\r\n\r\n"),
            &body[..],
        ),
    };
    out.write_all(head.as_bytes())?;
    let limit = cut
        .map(|c| c as usize)
        .unwrap_or(slice.len())
        .min(slice.len());
    for chunk in slice[..limit].chunks(64 << 10) {
        out.write_all(chunk)?;
        st.body_bytes
            .fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if let Some(d) = slow {
            std::thread::sleep(d);
        }
    }
    out.flush()?;
    if let (Some(_), Some(d)) = (cut, stall) {
        std::thread::sleep(d);
    }
    // Dropping the stream closes it: short of Content-Length when cut.
    Ok(())
}

// ---------------------------------------------------------------- helpers

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn sum(alg: Algorithm, data: &[u8]) -> Checksum {
    hash_reader(alg, data).unwrap().0
}

fn opts() -> FetchOptions {
    FetchOptions {
        attempts: 3,
        connect_attempts: 2,
        backoff: Duration::from_millis(10),
        connect_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(10),
        use_env_proxy: false,
        log_interval: Duration::from_secs(60),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Run a future on a fresh runtime, failing the test after 60 s.
fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    rt().block_on(async {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("the test finished within 60 s")
    })
}

fn fetch(
    dest: &Path,
    url: &str,
    expected: &Checksum,
) -> Result<kthw_lab::cache::Fetched, CacheError> {
    run(kthw_lab::cache::fetch_with(
        &opts(),
        &[url.to_string()],
        expected,
        dest,
        Progress::Quiet,
    ))
}

fn part_of(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", p.display()))
}

/// A catalog root holding `images/NAME.yaml` files.
fn catalog_root(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("images")).unwrap();
    for (name, text) in files {
        std::fs::write(
            root.path().join("images").join(format!("{name}.yaml")),
            text,
        )
        .unwrap();
    }
    root
}

fn download_entry(url: &str, checksum_line: &str) -> String {
    format!(
        "source: download\nurls:\n  - {url}\n{checksum_line}\nformat: qcow2\nboot: firmware\nfirst_boot: cloud-init\n"
    )
}

// ---------------------------------------------------------------- downloads

#[test]
fn downloads_verifies_and_records_then_reuses() {
    let srv = Server::start();
    let data = content(1 << 20, 1);
    srv.put("f.img", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("components/f.img");
    let expected = sum(Algorithm::Sha256, &data);
    let got = fetch(&dest, &srv.url("f.img"), &expected).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(
        (got.size, got.transferred, got.resumed_from),
        (1 << 20, 1 << 20, 0)
    );
    assert!(!part_of(&dest).exists());
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("components/f.img.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["artifacts"][0]["checksum"], expected.to_string());
    assert_eq!(m["artifacts"][0]["size"], 1 << 20);
    assert_eq!(m["url"], srv.url("f.img"));
    assert!(m["fetched_at"].as_str().unwrap().ends_with('Z'));

    // Second call: nothing is transferred.
    let again = fetch(&dest, &srv.url("f.img"), &expected).unwrap();
    assert_eq!(again.transferred, 0);
    assert_eq!(srv.requests().len(), 1);
}

#[test]
fn resumes_with_range_after_a_cut_connection() {
    let srv = Server::start();
    let data = content(1_000_000, 2);
    srv.put("big.img", data.clone());
    srv.behave(|b| {
        b.cut_after = Some((300_000, 1));
        b.etag = Some("\"v1\"".into());
    });
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("big.img");
    // The bar mode (indicatif hides itself when stderr is not a terminal).
    let got = run(kthw_lab::cache::fetch_with(
        &opts(),
        &[srv.url("big.img")],
        &sum(Algorithm::Sha256, &data),
        &dest,
        Progress::Bar,
    ))
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    let resumed_at: u64 = reqs[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("the second request asks for a range");
    assert_eq!(reqs[1].if_range.as_deref(), Some("\"v1\""));
    assert!(!PathBuf::from(format!("{}.part.validator", dest.display())).exists());
    assert!(
        (300_000 - (64 << 10)..=300_000).contains(&resumed_at),
        "{resumed_at}"
    );
    // Only the rest went over the wire the second time.
    assert_eq!(srv.body_bytes(), resumed_at + (1_000_000 - resumed_at));
    assert_eq!(got.transferred, 1_000_000);
}

#[test]
fn resumes_a_part_left_by_an_earlier_run() {
    let srv = Server::start();
    let data = content(500_000, 3);
    srv.put("x.img", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    std::fs::write(part_of(&dest), &data[..123_456]).unwrap();
    let got = fetch(&dest, &srv.url("x.img"), &sum(Algorithm::Sha512, &data)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=123456-"));
    assert_eq!(got.resumed_from, 123_456);
    assert_eq!(got.transferred, 500_000 - 123_456);
    assert_eq!(srv.body_bytes(), 500_000 - 123_456);
}

#[test]
fn a_part_of_a_file_that_changed_upstream_is_replaced_not_extended() {
    let srv = Server::start();
    let old = content(300_000, 15);
    let new = content(300_000, 16);
    srv.put("cur/x.img", new.clone());
    srv.behave(|b| b.etag = Some("\"v2\"".into()));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    std::fs::write(part_of(&dest), &old[..100_000]).unwrap();
    std::fs::write(format!("{}.part.validator", dest.display()), "\"v1\"").unwrap();
    let got = fetch(&dest, &srv.url("cur/x.img"), &sum(Algorithm::Sha256, &new)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), new);
    let reqs = srv.requests();
    assert_eq!(
        reqs.len(),
        1,
        "one request, no failed verification: {reqs:?}"
    );
    assert_eq!(reqs[0].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(got.transferred, 300_000);
}

#[test]
fn a_stalled_connection_times_out_and_resumes() {
    let srv = Server::start();
    let data = content(400_000, 17);
    srv.put("x.img", data.clone());
    srv.behave(|b| {
        b.cut_after = Some((150_000, 1));
        b.stall = Some(Duration::from_secs(5));
    });
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    let o = FetchOptions {
        stall_timeout: Duration::from_millis(400),
        ..opts()
    };
    let t = std::time::Instant::now();
    let got = run(kthw_lab::cache::fetch_with(
        &o,
        &[srv.url("x.img")],
        &sum(Algorithm::Sha256, &data),
        &dest,
        Progress::Lines,
    ))
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=150000-"));
    assert_eq!(got.transferred, 400_000);
}

#[test]
fn a_206_for_the_wrong_range_discards_the_part() {
    let srv = Server::start();
    let data = content(200_000, 19);
    srv.put("x.img", data.clone());
    srv.behave(|b| b.range_from_zero = true);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    std::fs::write(part_of(&dest), &data[..70_000]).unwrap();
    fetch(&dest, &srv.url("x.img"), &sum(Algorithm::Sha256, &data)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=70000-"));
    assert_eq!(reqs[1].range, None);
}

#[test]
fn a_server_that_ignores_range_restarts_from_zero() {
    let srv = Server::start();
    let data = content(400_000, 4);
    srv.put("x.img", data.clone());
    srv.behave(|b| b.ignore_range = true);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    std::fs::write(part_of(&dest), &data[..100_000]).unwrap();
    let got = fetch(&dest, &srv.url("x.img"), &sum(Algorithm::Sha256, &data)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=100000-"));
    assert_eq!(got.transferred, 400_000, "the whole file came again");
}

#[test]
fn a_complete_part_is_answered_416_and_verified_without_transfer() {
    let srv = Server::start();
    let data = content(200_000, 5);
    srv.put("x.img", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    std::fs::write(part_of(&dest), &data).unwrap();
    let got = fetch(&dest, &srv.url("x.img"), &sum(Algorithm::Sha256, &data)).unwrap();
    assert_eq!(got.transferred, 0);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(srv.requests()[0].range.as_deref(), Some("bytes=200000-"));
}

#[test]
fn a_corrupt_part_is_detected_and_downloaded_again_from_the_start() {
    let srv = Server::start();
    let data = content(300_000, 6);
    srv.put("x.img", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    std::fs::write(part_of(&dest), vec![0u8; 50_000]).unwrap();
    fetch(&dest, &srv.url("x.img"), &sum(Algorithm::Sha256, &data)).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let reqs = srv.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=50000-"));
    assert_eq!(reqs[1].range, None);
}

#[test]
fn checksum_mismatch_removes_the_part_and_never_places_the_file() {
    let srv = Server::start();
    let data = content(100_000, 7);
    srv.put("x.img", data.clone());
    srv.behave(|b| b.wrong_content = true);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    let expected = sum(Algorithm::Sha256, &data);
    let err = fetch(&dest, &srv.url("x.img"), &expected).unwrap_err();
    assert!(
        matches!(err, CacheError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&srv.url("x.img")) && msg.contains(&expected.to_string()),
        "{msg}"
    );
    assert!(
        err.hint().contains("kthw-lab cache import DIR"),
        "{}",
        err.hint()
    );
    assert!(!dest.exists());
    assert!(!part_of(&dest).exists());
    assert_eq!(srv.requests().len(), 1, "a fresh download is not retried");
}

#[test]
fn transient_statuses_are_retried_and_permanent_ones_are_not() {
    let srv = Server::start();
    let data = content(10_000, 8);
    srv.put("x.img", data.clone());
    srv.behave(|b| b.fail_first = vec![503, 500]);
    let dir = tempfile::tempdir().unwrap();
    let expected = sum(Algorithm::Sha256, &data);
    fetch(&dir.path().join("x.img"), &srv.url("x.img"), &expected).unwrap();
    assert_eq!(srv.requests().len(), 3);

    let err = fetch(
        &dir.path().join("y.img"),
        &srv.url("missing.img"),
        &expected,
    )
    .unwrap_err();
    assert!(
        matches!(err, CacheError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.hint().contains("catalog"), "{}", err.hint());
    assert_eq!(srv.requests().len(), 4);

    // Failing more often than allowed gives up after the bounded attempts.
    srv.behave(|b| b.fail_first = vec![503; 10]);
    let err = fetch(&dir.path().join("z.img"), &srv.url("x.img"), &expected).unwrap_err();
    assert!(
        matches!(err, CacheError::Transfer { attempts: 3, .. }),
        "{err:?}"
    );
    assert_eq!(srv.requests().len(), 7);
}

#[test]
fn mirrors_are_tried_in_order() {
    let srv = Server::start();
    let data = content(50_000, 18);
    srv.put("second/x.img", data.clone());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("x.img");
    let got = run(kthw_lab::cache::fetch_with(
        &opts(),
        &[srv.url("first/x.img"), srv.url("second/x.img")],
        &sum(Algorithm::Sha256, &data),
        &dest,
        Progress::Quiet,
    ))
    .unwrap();
    assert_eq!(got.url.as_deref(), Some(srv.url("second/x.img").as_str()));
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(srv.requests().len(), 2);
}

#[test]
fn an_unreachable_host_says_to_import() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/x.img");
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let err = fetch(
        &dir.path().join("x.img"),
        &url,
        &sum(Algorithm::Sha256, b""),
    )
    .unwrap_err();
    assert!(matches!(err, CacheError::Unreachable { .. }), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "gives up after 2 connection attempts"
    );
    assert_eq!(
        err.hint(),
        format!("this host cannot reach {url}: download the file elsewhere and use `kthw-lab cache import DIR`")
    );
}

#[test]
fn two_threads_fetching_the_same_entry_download_once() {
    let srv = Server::start();
    let data = content(2 << 20, 9);
    srv.put("img/disk.img", data.clone());
    srv.behave(|b| b.slow = Some(Duration::from_millis(5)));
    let expected = sum(Algorithm::Sha256, &data);
    let root = catalog_root(&[(
        "shared",
        &download_entry(&srv.url("img/disk.img"), &format!("checksum: {expected}")),
    )]);
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let cat = cat.clone();
            let cache = Cache::at(cache_dir.path()).with_options(opts());
            std::thread::spawn(move || run(cache.ensure_image(&cat, "shared", Progress::Quiet)))
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert_eq!(
        srv.requests_for("img/disk.img").len(),
        1,
        "{:?}",
        srv.requests()
    );
    assert_eq!(results[0].disk, results[1].disk);
    assert_eq!(
        results.iter().filter(|r| r.fetched).count(),
        1,
        "one downloaded, the other found it done"
    );
    assert_eq!(std::fs::read(&results[0].disk).unwrap(), data);
}

/// Run by the test below in two child processes (the test binary itself).
#[test]
#[ignore = "helper: run as a child process by two_processes_fetching_the_same_file_download_once"]
fn child_process_fetch() {
    let url = std::env::var("KTHW_CACHE_TEST_URL").expect(
        "a helper: two_processes_fetching_the_same_file_download_once runs it with KTHW_CACHE_TEST_URL",
    );
    let dest = PathBuf::from(std::env::var("KTHW_CACHE_TEST_DEST").unwrap());
    let expected: Checksum = std::env::var("KTHW_CACHE_TEST_SUM")
        .unwrap()
        .parse()
        .unwrap();
    let got = run(kthw_lab::cache::fetch_with(
        &opts(),
        &[url],
        &expected,
        &dest,
        Progress::Lines,
    ))
    .unwrap();
    println!("TRANSFERRED={}", got.transferred);
}

#[test]
fn two_processes_fetching_the_same_file_download_once() {
    let srv = Server::start();
    let data = content(1 << 20, 14);
    srv.put("p/x.img", data.clone());
    srv.behave(|b| b.slow = Some(Duration::from_millis(20)));
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("components/x.img");
    let children: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_process_fetch", "--ignored", "--nocapture"])
                .env("KTHW_CACHE_TEST_URL", srv.url("p/x.img"))
                .env("KTHW_CACHE_TEST_DEST", &dest)
                .env(
                    "KTHW_CACHE_TEST_SUM",
                    sum(Algorithm::Sha256, &data).to_string(),
                )
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut transferred = Vec::new();
    let mut stderrs = Vec::new();
    let mut waited = false;
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        waited |= stderr.contains("waiting for another kthw-lab");
        stderrs.push(stderr.to_string());
        transferred.extend(
            stdout
                .lines()
                .filter_map(|l| l.strip_prefix("TRANSFERRED="))
                .map(|n| n.parse::<u64>().unwrap()),
        );
    }
    transferred.sort();
    assert_eq!(
        transferred,
        [0, 1 << 20],
        "one downloaded, the other found it done"
    );
    assert!(
        stderrs
            .iter()
            .any(|e| e.contains("kthw-lab: downloading x.img (1.00 MiB)")
                && e.contains("kthw-lab: x.img verified: 1.00 MiB in")),
        "plain progress lines when stderr is not a terminal: {stderrs:?}"
    );
    // Usually (not always, under load) the second one starts while the first still
    // downloads and says that it waits; either way only one request reaches the server.
    eprintln!("second process waited for the lock: {waited}");
    assert_eq!(srv.requests().len(), 1);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

// ---------------------------------------------------------------- checksum lists

#[test]
fn checksum_lists_in_both_styles() {
    let a = "a".repeat(64);
    let b = "b".repeat(128);
    let sums256 = format!(
        "# comment\n\n{a} *noble.img\n{} *other.img\n",
        "c".repeat(64)
    );
    assert_eq!(
        find_in_sums(&sums256, Algorithm::Sha256, "noble.img")
            .unwrap()
            .to_string(),
        format!("sha256:{a}")
    );
    let sums512 = format!("{b}  debian-12.qcow2\n{}  ./other.raw\n", "d".repeat(128));
    assert_eq!(
        find_in_sums(&sums512, Algorithm::Sha512, "debian-12.qcow2")
            .unwrap()
            .to_string(),
        format!("sha512:{b}")
    );
    assert!(find_in_sums(&sums512, Algorithm::Sha512, "other.raw").is_ok());
    assert_eq!(
        find_in_sums(&sums512, Algorithm::Sha512, "nope.img"),
        Err(SumsError::Missing {
            file: "nope.img".into()
        })
    );
    // A sha256 line read as a sha512 list is a clear error about that line.
    assert!(matches!(
        find_in_sums(&sums256, Algorithm::Sha512, "noble.img"),
        Err(SumsError::BadLine { line: 3, .. })
    ));
}

#[test]
fn pull_takes_the_digest_from_the_published_checksum_file() {
    let srv = Server::start();
    let data = content(300_000, 10);
    srv.put("rel/noble.img", data.clone());
    let good = sum(Algorithm::Sha512, &data);
    srv.put(
        "rel/SHA512SUMS",
        format!(
            "{}  other.img\n{}  noble.img\n",
            "e".repeat(128),
            good.hex()
        )
        .into_bytes(),
    );
    let root = catalog_root(&[
        (
            "listed",
            &download_entry(
                &srv.url("rel/noble.img"),
                &format!(
                    "checksum_url: {}\nalgorithm: sha512",
                    srv.url("rel/SHA512SUMS")
                ),
            ),
        ),
        (
            "unlisted",
            &download_entry(
                &srv.url("rel/absent.img"),
                &format!(
                    "checksum_url: {}\nalgorithm: sha512",
                    srv.url("rel/SHA512SUMS")
                ),
            ),
        ),
    ]);
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let cache = Cache::at(tempfile::tempdir().unwrap().keep()).with_options(opts());
    let img = run(cache.ensure_image(&cat, "listed", Progress::Quiet)).unwrap();
    assert!(img.fetched);
    assert_eq!(img.disk.file_name().unwrap(), "noble.img");
    assert_eq!(img.manifest.artifacts[0].checksum, good);
    assert_eq!(
        img.manifest.checksum_source.as_deref(),
        Some(srv.url("rel/SHA512SUMS").as_str())
    );
    assert_eq!(img.kernel, None);
    let report = cache.verify_image(&cat, "listed").unwrap();
    assert_eq!(report.bytes, 300_000);

    let err = run(cache.ensure_image(&cat, "unlisted", Progress::Quiet)).unwrap_err();
    assert!(matches!(err, CacheError::ChecksumList { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.img"), "{err}");
    assert!(
        srv.requests_for("rel/absent.img").is_empty(),
        "nothing unverifiable is downloaded"
    );

    // Tampering with the cached file (same size) is caught by verify.
    let mut bytes = std::fs::read(&img.disk).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&img.disk, &bytes).unwrap();
    let err = cache.verify_image(&cat, "listed").unwrap_err();
    assert!(
        matches!(err, CacheError::CachedFileChanged { .. }),
        "{err:?}"
    );
    assert!(err.hint().contains("image pull listed"), "{}", err.hint());
    assert!(cache
        .render_list(&cat)
        .lines()
        .any(|l| l.starts_with("listed ") && l.contains(" no ")));
    // ... which forgets the entry, so ensure fetches it again.
    let again = run(cache.ensure_image(&cat, "listed", Progress::Quiet)).unwrap();
    assert!(again.fetched);
    cache.verify_image(&cat, "listed").unwrap();
}

// ---------------------------------------------------------------- import

#[test]
fn import_fills_the_cache_offline_and_checks_digests() {
    let data = content(250_000, 11);
    let bad = content(250_000, 12);
    let sums = sum(Algorithm::Sha512, &data);
    // The checksum URL points at a closed port: it must not be needed.
    let root = catalog_root(&[
        (
            "deb",
            &download_entry(
                "http://127.0.0.1:9/d/debian-12-generic-amd64.qcow2",
                "checksum_url: http://127.0.0.1:9/d/SHA512SUMS\nalgorithm: sha512",
            ),
        ),
        (
            "pinned",
            &download_entry(
                "http://127.0.0.1:9/p/pinned.img",
                &format!("checksum: {}", sum(Algorithm::Sha256, &data)),
            ),
        ),
        (
            "nolist",
            &download_entry(
                "http://127.0.0.1:9/n/nolist.img",
                "checksum_url: http://127.0.0.1:9/n/SHA256SUMS\nalgorithm: sha256",
            ),
        ),
    ]);
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let dl = tempfile::tempdir().unwrap();
    std::fs::write(dl.path().join("debian-12-generic-amd64.qcow2"), &data).unwrap();
    std::fs::write(
        dl.path().join("SHA512SUMS"),
        format!("{}  debian-12-generic-amd64.qcow2\n", sums.hex()),
    )
    .unwrap();
    std::fs::write(dl.path().join("pinned.img"), &bad).unwrap();
    std::fs::write(dl.path().join("nolist.img"), &data).unwrap();
    std::fs::write(dl.path().join("notes.txt"), "hello").unwrap();

    let opts = FetchOptions {
        attempts: 1,
        ..opts()
    };
    let cache = Cache::at(tempfile::tempdir().unwrap().keep()).with_options(opts);
    let report = run(cache.import_dir(&cat, dl.path(), Progress::Quiet)).unwrap();
    let by_name: HashMap<&str, &ImportOutcome> = report
        .items
        .iter()
        .map(|i| (i.image.as_str(), &i.outcome))
        .collect();
    assert!(matches!(
        by_name["deb"],
        ImportOutcome::Imported { size: 250_000, .. }
    ));
    assert!(
        matches!(
            by_name["pinned"],
            ImportOutcome::Failed(CacheError::ImportMismatch { .. })
        ),
        "{:?}",
        by_name["pinned"]
    );
    match by_name["nolist"] {
        ImportOutcome::Failed(e @ CacheError::NoChecksumOffline { .. }) => {
            assert!(e.hint().contains("SHA256SUMS"), "{}", e.hint())
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(report.unmatched, vec![dl.path().join("notes.txt")]);
    // The shipped debian-12 entry matches the same upstream file name and list.
    assert!(matches!(
        by_name["debian-12"],
        ImportOutcome::Imported { .. }
    ));
    assert_eq!(report.imported(), 2, "{}", report.render());
    assert_eq!(report.failures().count(), 2);
    assert!(report.render().contains("ignored:"), "{}", report.render());

    let img = run(cache.ensure_image(&cat, "deb", Progress::Quiet)).unwrap();
    assert!(!img.fetched, "the imported file is used as it is");
    assert_eq!(img.manifest.source, "import");
    cache.verify_image(&cat, "deb").unwrap();
    assert!(!cache.image_dir("pinned").join("pinned.img").exists());
    assert!(!cache.image_dir("pinned").join("pinned.img.part").exists());

    let again = run(cache.import_dir(&cat, dl.path(), Progress::Quiet)).unwrap();
    assert!(matches!(
        again
            .items
            .iter()
            .find(|i| i.image == "deb")
            .unwrap()
            .outcome,
        ImportOutcome::AlreadyCached
    ));
    let list = cache.render_list(&cat);
    assert!(
        list.lines()
            .any(|l| l.starts_with("deb ") && l.contains("yes (import)")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("pinned ") && l.contains(" no ")),
        "{list}"
    );
    cache.purge().unwrap();
    assert!(!cache.root().exists());
    cache.purge().unwrap();
}

// ---------------------------------------------------------------- catalog

#[test]
fn catalog_errors_carry_file_line_and_column() {
    let root = catalog_root(&[(
        "bad",
        "source: download\nurls:\n  - https://example.invalid/a.img\nchecksum: sha256:1234\nformat: qcow2\nboot: firmware\nfirst_boot: cloud-init\ncolour: blue\n",
    )]);
    let err = Catalog::load(&[root.path().to_path_buf()]).unwrap_err();
    let file = root.path().join("images/bad.yaml").display().to_string();
    let lines: Vec<String> = err.diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(err.diagnostics.len(), 2, "{lines:#?}");
    assert_eq!(
        lines[0],
        format!("{file}:4:11: checksum: a sha256 digest is 64 hex digits, found 4")
    );
    assert!(
        lines[1].starts_with(&format!("{file}:8:1: colour: unknown field `colour`")),
        "{}",
        lines[1]
    );
    assert!(err.report().contains("2 problems in the image catalog"));
}

#[test]
fn catalog_rejects_mixed_and_missing_fields() {
    let root = catalog_root(&[
        (
            "both",
            "source: download\nurls: [https://h/x.img]\nchecksum_url: https://h/SUMS\nformat: qcow2\nboot: direct-kernel\nfirst_boot: cloud-init\nrecipe: x.sh\n",
        ),
        ("builder", "source: build\nformat: vmdk\nboot: firmware\nfirst_boot: cloud-init\n"),
    ]);
    let err = Catalog::load(&[root.path().to_path_buf()]).unwrap_err();
    let text = err.report();
    for needle in [
        "both.yaml:1:1: algorithm: missing required field `algorithm`",
        "both.yaml:5:7: boot: direct-kernel boot needs the kernel",
        "both.yaml:7:9: recipe: `recipe` applies only to source: build",
        "builder.yaml:1:1: recipe: missing required field `recipe`",
        "builder.yaml:2:9: format: `vmdk` is not one of: qcow2, raw",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn catalog_files_override_builtin_entries_and_add_new_ones() {
    let root = catalog_root(&[(
        "debian-12",
        &download_entry(
            "http://127.0.0.1:9/mirror/debian.qcow2",
            &format!("checksum: sha256:{}", "f".repeat(64)),
        ),
    )]);
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let deb = cat.get("debian-12").unwrap();
    assert_eq!(deb.disk, "debian.qcow2");
    assert!(deb.origin.ends_with("images/debian-12.yaml"));
    assert!(cat
        .get("ubuntu-24.04")
        .unwrap()
        .origin
        .starts_with("<built-in"));
    // The repository's own catalog loads from the checkout too.
    let repo = Catalog::load(&[PathBuf::from(env!("CARGO_MANIFEST_DIR"))]).unwrap();
    assert_eq!(repo.names(), ["debian-12", "kthw-debian12", "ubuntu-24.04"]);
    let unknown = run(Cache::at(tempfile::tempdir().unwrap().keep()).ensure_image(
        &repo,
        "nope",
        Progress::Quiet,
    ))
    .unwrap_err();
    assert!(unknown
        .to_string()
        .contains("available: debian-12, kthw-debian12, ubuntu-24.04"));
}

// ---------------------------------------------------------------- local builds

const BUILD_ENTRY: &str = "source: build\nrecipe: fake/build.sh\nformat: qcow2\nboot: direct-kernel\ndisk: disk.qcow2\nkernel: vmlinuz\ninitrd: initrd.img\nfirst_boot: cloud-init\n";

fn write_recipe(root: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = root.join("images/fake/build.sh");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, format!("#!/bin/sh\nset -e\nout=$1\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn leftovers(cache: &Cache) -> Vec<String> {
    std::fs::read_dir(cache.images_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn build_places_the_output_atomically_and_records_digests() {
    let root = catalog_root(&[("fake", BUILD_ENTRY)]);
    write_recipe(
        root.path(),
        "echo building into $out\nprintf disk > $out/disk.qcow2\nprintf kernel > $out/vmlinuz\nprintf initrd > $out/initrd.img\necho '{\"cmdline\": \"root=/dev/vda\"}' > $out/manifest.json",
    );
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let cache = Cache::at(tempfile::tempdir().unwrap().keep()).with_options(opts());
    let img = run(cache.ensure_image(&cat, "fake", Progress::Quiet)).unwrap();
    assert!(img.fetched);
    assert_eq!(std::fs::read(&img.disk).unwrap(), b"disk");
    assert_eq!(
        img.kernel.as_deref(),
        Some(cache.image_dir("fake").join("vmlinuz").as_path())
    );
    assert_eq!(
        std::fs::read(img.initrd.as_ref().unwrap()).unwrap(),
        b"initrd"
    );
    assert_eq!(
        img.recipe_manifest,
        Some(cache.image_dir("fake").join("manifest.json"))
    );
    assert_eq!(img.manifest.source, "build");
    assert_eq!(img.manifest.artifacts.len(), 3);
    assert_eq!(
        img.manifest.artifacts[1].checksum,
        sum(Algorithm::Sha256, b"kernel")
    );
    assert_eq!(
        img.manifest.recipe_sha256.as_ref().map(String::len),
        Some(64)
    );
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
    let v = cache.verify_image(&cat, "fake").unwrap();
    assert_eq!(v.files.len(), 3);

    // Cached: the recipe does not run again.
    let again = run(cache.ensure_image(&cat, "fake", Progress::Quiet)).unwrap();
    assert!(!again.fetched);

    // A forced rebuild that fails leaves the previous build in place, and no temp dir.
    write_recipe(
        root.path(),
        "printf half > $out/disk.qcow2\necho 'mmdebstrap: cannot reach the mirror' >&2\nexit 3",
    );
    let err = run(cache.build_image(&cat, "fake", Progress::Quiet, true)).unwrap_err();
    match &err {
        CacheError::BuildFailed { status, tail, .. } => {
            assert_eq!(status, "exit status 3");
            assert_eq!(tail.last().unwrap(), "mmdebstrap: cannot reach the mirror");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .ends_with("(exit status 3): mmdebstrap: cannot reach the mirror"),
        "{err}"
    );
    assert_eq!(std::fs::read(&img.disk).unwrap(), b"disk");
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
    cache.verify_image(&cat, "fake").unwrap();

    // Tampering is caught for built images too.
    std::fs::write(img.kernel.as_ref().unwrap(), b"KERNEL").unwrap();
    assert!(matches!(
        cache.verify_image(&cat, "fake"),
        Err(CacheError::CachedFileChanged { .. })
    ));
}

#[test]
fn an_edited_recipe_rebuilds_the_cached_image() {
    let root = catalog_root(&[("fake", BUILD_ENTRY)]);
    let recipe = |disk: &str| {
        format!(
            "printf {disk} > $out/disk.qcow2\nprintf k > $out/vmlinuz\nprintf i > $out/initrd.img"
        )
    };
    write_recipe(root.path(), &recipe("one"));
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let cache = Cache::at(tempfile::tempdir().unwrap().keep()).with_options(opts());
    assert!(
        run(cache.ensure_image(&cat, "fake", Progress::Quiet))
            .unwrap()
            .fetched
    );
    assert!(
        !run(cache.ensure_image(&cat, "fake", Progress::Quiet))
            .unwrap()
            .fetched
    );

    // The image built by the old recipe no longer counts as cached.
    write_recipe(root.path(), &recipe("two"));
    let spec = cat.get("fake").unwrap();
    assert!(cache.cached(spec).is_none());
    let img = run(cache.ensure_image(&cat, "fake", Progress::Quiet)).unwrap();
    assert!(img.fetched, "an edited recipe must rebuild");
    assert_eq!(std::fs::read(&img.disk).unwrap(), b"two");
    assert!(
        !run(cache.ensure_image(&cat, "fake", Progress::Quiet))
            .unwrap()
            .fetched
    );
}

#[test]
fn a_failed_first_build_leaves_nothing_behind() {
    let root = catalog_root(&[("fake", BUILD_ENTRY)]);
    let cat_dir = root.path().to_path_buf();
    let cache = Cache::at(tempfile::tempdir().unwrap().keep()).with_options(opts());

    write_recipe(
        root.path(),
        "printf disk > $out/disk.qcow2\nprintf k > $out/vmlinuz",
    );
    let cat = Catalog::load(std::slice::from_ref(&cat_dir)).unwrap();
    let err = run(cache.ensure_image(&cat, "fake", Progress::Quiet)).unwrap_err();
    assert!(
        matches!(err, CacheError::BuildOutputMissing { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("initrd.img"), "{err}");
    assert!(!cache.image_dir("fake").exists());
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));

    write_recipe(root.path(), "exit 1");
    let err = run(cache.ensure_image(&cat, "fake", Progress::Quiet)).unwrap_err();
    assert!(matches!(err, CacheError::BuildFailed { .. }), "{err:?}");
    assert!(!cache.image_dir("fake").exists());
    assert!(leftovers(&cache).is_empty());
    assert!(matches!(
        cache.verify_image(&cat, "fake"),
        Err(CacheError::NotCached { .. })
    ));

    // The built-in entry carries no recipe: a clear error, not a crash.
    let builtin = Catalog::builtin().unwrap();
    let err = run(cache.ensure_image(&builtin, "kthw-debian12", Progress::Quiet)).unwrap_err();
    assert!(matches!(err, CacheError::RecipeMissing { .. }), "{err:?}");
    assert!(
        err.to_string().contains("images/kthw-debian12/build.sh"),
        "{err}"
    );
}

// ---------------------------------------------------------------- measurements

/// Throughput from loopback and verify time for a 600 MB image. Run with
/// `cargo nextest run --release --test cache --run-ignored only --no-capture measure`.
#[test]
#[ignore = "a measurement: 600 MB through loopback, run it in release"]
fn measure_600mb_download_and_verify() {
    const LEN: usize = 600_000_000;
    let srv = Server::start();
    let data = content(LEN, 13);
    let t = std::time::Instant::now();
    let sha256 = sum(Algorithm::Sha256, &data);
    let h256 = t.elapsed();
    let t = std::time::Instant::now();
    let sha512 = sum(Algorithm::Sha512, &data);
    let h512 = t.elapsed();
    srv.put("big/disk.img", data);
    let mb = LEN as f64 / 1e6;
    eprintln!(
        "in-memory hash of 600 MB: sha256 {:.2}s ({:.0} MB/s), sha512 {:.2}s ({:.0} MB/s)",
        h256.as_secs_f64(),
        mb / h256.as_secs_f64(),
        h512.as_secs_f64(),
        mb / h512.as_secs_f64()
    );
    for (alg, expected) in [("sha256", &sha256), ("sha512", &sha512)] {
        let root = catalog_root(&[(
            "big",
            &download_entry(&srv.url("big/disk.img"), &format!("checksum: {expected}")),
        )]);
        let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
        let cache_dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let cache = Cache::at(cache_dir.path()).with_options(opts());
        let t = std::time::Instant::now();
        let img = run(cache.ensure_image(&cat, "big", Progress::Lines)).unwrap();
        let dl = t.elapsed();
        assert!(img.fetched);
        let v = cache.verify_image(&cat, "big").unwrap();
        eprintln!(
            "{alg}: download+hash+fsync of 600 MB from loopback {:.2}s ({:.0} MB/s); verify {:.2}s ({:.0} MB/s)",
            dl.as_secs_f64(),
            mb / dl.as_secs_f64(),
            v.elapsed.as_secs_f64(),
            mb / v.elapsed.as_secs_f64()
        );
    }
}

#[test]
fn list_shows_cached_partial_and_missing_entries() {
    let cat = Catalog::builtin().unwrap();
    let cache = Cache::at(tempfile::tempdir().unwrap().keep());
    let dir = cache.image_dir("ubuntu-24.04");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("noble-server-cloudimg-amd64.img.part"),
        vec![0u8; 3 << 20],
    )
    .unwrap();
    let list = cache.render_list(&cat);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 4, "{list}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].ends_with("DIGEST"),
        "{list}"
    );
    assert!(
        lines[1].starts_with("debian-12 ") && lines[1].contains("download  firmware       no"),
        "{list}"
    );
    assert!(lines[2].contains("build     direct-kernel  no"), "{list}");
    assert!(lines[3].contains("partial (3.00 MiB)"), "{list}");
}
