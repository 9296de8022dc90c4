//! The native adapter folder (SPEC §6): `reft_config.json` + `adapter.safetensors`.
//!
//! Files are written atomically (temporary file in the same folder, fsync, rename), so a crash
//! never leaves a half-written adapter where a good one was. Loading checks the format version,
//! the base model's identity and every tensor's shape, with messages that say what differs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::{AdapterConfig, BaseModel, FORMAT_VERSION};
use super::Adapter;
use crate::intervention::Intervention;
use crate::load::LanguageModel;
use crate::{Error, Result};

/// Config file name.
pub const CONFIG_FILE: &str = "reft_config.json";
/// Weights file name.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";

impl BaseModel {
    /// The identity of a loaded model.
    pub fn of(lm: &LanguageModel) -> Self {
        let cfg = lm.decoder.config();
        Self {
            architecture: format!("{:?}", cfg.arch).to_lowercase(),
            hidden_size: cfg.hidden_size,
            num_layers: cfg.num_layers,
            vocab_size: cfg.vocab_size,
            tokenizer_fingerprint: tokenizer_fingerprint(&lm.tokenizer),
        }
    }
}

/// FNV-1a 64 over `id\ttoken\n` for every vocabulary entry: equal for a model's GGUF and HF
/// forms, different for models with other vocabularies.
pub fn tokenizer_fingerprint(tok: &crate::tokenizer::Tokenizer) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for id in 0..tok.vocab_size() as u32 {
        let t = tok.id_to_token(id).unwrap_or_default();
        for byte in format!("{id}\t{t}\n").bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("fnv1a64:{h:016x}")
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

impl Adapter {
    /// Saves to a folder (created if needed) as `reft_config.json` + `adapter.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors: Vec<(String, Tensor)> = self
            .tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| Error::InvalidArgument(format!("serialising adapter tensors: {e}")))?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        let mut config = self.config.clone();
        config.format_version = FORMAT_VERSION;
        let json = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::InvalidArgument(format!("serialising adapter config: {e}")))?;
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// Loads a native adapter folder for `base` (checked when both sides know their identity).
    pub fn load(
        dir: &Path,
        base: Option<&BaseModel>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: cfg_path.clone(),
            msg: format!("not a reft adapter config: {e}"),
        })?;
        if config.format_version > FORMAT_VERSION {
            return Err(Error::BadConfig {
                path: cfg_path,
                msg: format!(
                    "adapter format {} is newer than this reft understands ({FORMAT_VERSION})",
                    config.format_version
                ),
            });
        }
        let hidden: Option<usize> = match (base, &config.base_model) {
            (Some(m), Some(a)) => {
                check_base(m, a, dir)?;
                Some(m.hidden_size)
            }
            (Some(m), None) => Some(m.hidden_size),
            (None, Some(a)) => Some(a.hidden_size),
            // Adapters built in code without a model: the tensors tell the width.
            (None, None) => None,
        };
        if let Some(m) = base {
            for c in &config.interventions {
                if c.layer >= m.num_layers {
                    return Err(Error::BadConfig {
                        path: cfg_path.clone(),
                        msg: format!(
                            "intervention at layer {} but the model has {} layers",
                            c.layer, m.num_layers
                        ),
                    });
                }
            }
        }
        let w_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&w_path).map_err(|e| Error::io(&w_path, e))?;
        let bad = |msg: String| Error::BadWeights {
            path: w_path.clone(),
            msg,
        };
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            bad(format!(
                "not a valid safetensors file (truncated or corrupt?): {e}"
            ))
        })?;
        let all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut interventions = Vec::with_capacity(config.interventions.len());
        for (i, c) in config.interventions.iter().enumerate() {
            let prefix = format!("interventions.{i}.");
            let mut tensors = BTreeMap::new();
            for (name, t) in &all {
                if let Some(param) = name.strip_prefix(&prefix) {
                    tensors.insert(param.to_string(), t.clone());
                }
            }
            let d = match hidden {
                Some(d) => d,
                None => tensors
                    .values()
                    .filter_map(|t| t.dims().last().copied())
                    .max()
                    .ok_or_else(|| bad(format!("intervention {i} has no tensors")))?,
            };
            let iv =
                Intervention::from_tensors(c.shape(d), &tensors, dtype, device).map_err(|e| {
                    bad(format!(
                        "intervention {i} ({} at layer {}): {e}",
                        c.kind.name(),
                        c.layer
                    ))
                })?;
            interventions.push(iv);
        }
        Ok(Adapter::new(config, interventions))
    }
}

fn check_base(model: &BaseModel, adapter: &BaseModel, dir: &Path) -> Result<()> {
    let mut diffs = Vec::new();
    if model.hidden_size != adapter.hidden_size {
        diffs.push(format!(
            "hidden size {} vs {}",
            adapter.hidden_size, model.hidden_size
        ));
    }
    if model.num_layers != adapter.num_layers {
        diffs.push(format!(
            "{} vs {} layers",
            adapter.num_layers, model.num_layers
        ));
    }
    if model.vocab_size != adapter.vocab_size {
        diffs.push(format!(
            "vocabulary {} vs {}",
            adapter.vocab_size, model.vocab_size
        ));
    }
    if model.tokenizer_fingerprint != adapter.tokenizer_fingerprint {
        diffs.push("a different tokenizer vocabulary".into());
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::BadConfig {
        path: dir.to_path_buf(),
        msg: format!(
            "this adapter was made for another model ({} with {}): adapter vs this model: {}",
            adapter.architecture,
            adapter.hidden_size,
            diffs.join(", ")
        ),
    })
}
