//! The build path with the real offline-image recipe (not run by default: it needs
//! root, mmdebstrap and a Debian mirror, and takes minutes).
//!
//! `KTHW_RECIPE=/path/to/images/kthw-debian12/build.sh cargo nextest run --release
//!  --test cache_real_build --run-ignored only --no-capture`

use std::path::PathBuf;
use std::time::Instant;

use kthw_lab::cache::{BootMethod, Cache, Catalog, Progress};

#[test]
#[ignore = "runs the real image recipe (root, mmdebstrap, a Debian mirror, minutes)"]
fn real_recipe_builds_verifies_and_is_reused() {
    // Run by hand only; without its recipe it fails rather than passing unrun.
    let recipe = std::env::var_os("KTHW_RECIPE")
        .map(PathBuf::from)
        .expect("set KTHW_RECIPE=/path/to/images/kthw-debian12/build.sh (see the header)");
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir_all(images.join("kthw-debian12")).unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        repo.join("images/kthw-debian12.yaml"),
        images.join("kthw-debian12.yaml"),
    )
    .unwrap();
    std::fs::copy(&recipe, images.join("kthw-debian12/build.sh")).unwrap();
    let cat = Catalog::load(&[root.path().to_path_buf()]).unwrap();
    let cache_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let cache = Cache::at(cache_dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();

    let t = Instant::now();
    let img = rt
        .block_on(cache.ensure_image(&cat, "kthw-debian12", Progress::Lines))
        .unwrap_or_else(|e| panic!("{e}\nhint: {}", e.hint()));
    eprintln!("build through the cache: {:.1}s", t.elapsed().as_secs_f64());
    assert!(img.fetched);
    assert_eq!(img.boot, BootMethod::DirectKernel);
    for p in [
        &img.disk,
        img.kernel.as_ref().unwrap(),
        img.initrd.as_ref().unwrap(),
    ] {
        assert!(p.is_file(), "{}", p.display());
    }
    assert!(img.recipe_manifest.is_some());
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img.disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");

    let t = Instant::now();
    let again = rt
        .block_on(cache.ensure_image(&cat, "kthw-debian12", Progress::Lines))
        .unwrap();
    eprintln!("second ensure: {:?}", t.elapsed());
    assert!(!again.fetched);

    let v = cache.verify_image(&cat, "kthw-debian12").unwrap();
    eprintln!(
        "verify: {} files, {} bytes in {:.2}s",
        v.files.len(),
        v.bytes,
        v.elapsed.as_secs_f64()
    );
    eprint!("{}", cache.render_list(&cat));
}
