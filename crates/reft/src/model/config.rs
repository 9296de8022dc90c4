//! The decoder configuration, read from a Hugging Face `config.json` or from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Which decoder family a model belongs to. All share one implementation ([`super::Decoder`]):
/// Llama and Qwen2 differ only in the attention biases and in how GGUF files store the
/// query/key weights; GPT-2 swaps the layer's pieces (see [`Arch::Gpt2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral (without sliding window).
    Llama,
    /// Qwen2: biases on the query, key and value projections.
    Qwen2,
    /// GPT-2: LayerNorm with bias instead of RMSNorm, learned absolute positions instead of
    /// RoPE, a GELU (tanh approximation) MLP instead of SwiGLU, biases on every projection.
    Gpt2,
}

impl Arch {
    /// Whether positions enter through rotary embeddings of queries and keys (otherwise, as in
    /// GPT-2, through a learned table added to the token embeddings).
    pub fn rotary(self) -> bool {
        self != Arch::Gpt2
    }
}

/// Hyper-parameters of a decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecoderConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Width of the residual stream, `d`.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Epsilon of the norms (RMSNorm; LayerNorm for GPT-2).
    pub norm_eps: f64,
    /// RoPE base frequency (unused with learned positions).
    pub rope_theta: f64,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases.
    pub attention_bias: bool,
    /// Longest context the model was trained for (with learned positions, a hard limit).
    pub max_position_embeddings: usize,
    /// Llama-3 style RoPE frequency scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
}

/// Llama 3.1 `rope_scaling` (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Llama3RopeScaling {
    /// Overall scale.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length of the original model.
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    rope_scaling: Option<serde_json::Value>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
}

impl DecoderConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::BadConfig {
            path: path.to_path_buf(),
            msg,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON file: {e}")))?;
        if json.get("model_type").and_then(|t| t.as_str()) == Some("gpt2") {
            let cfg = gpt2_config(json).map_err(bad)?;
            cfg.validate().map_err(bad)?;
            return Ok(cfg);
        }
        let hf: HfConfig =
            serde_json::from_value(json).map_err(|e| bad(format!("not a decoder config: {e}")))?;
        let arch = match hf.model_type.as_deref() {
            Some("llama") | Some("mistral") => Arch::Llama,
            Some("qwen2") => Arch::Qwen2,
            other => {
                return Err(bad(format!(
                    "model_type {other:?} is not supported (llama, mistral, qwen2, gpt2)"
                )))
            }
        };
        if hf.model_type.as_deref() == Some("mistral")
            && hf.sliding_window.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(bad("Mistral with a sliding window is not supported".into()));
        }
        if hf.use_sliding_window == Some(true) {
            return Err(bad("sliding-window attention is not supported".into()));
        }
        let rope_scaling = match hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str());
                if kind != Some("llama3") {
                    return Err(bad(format!(
                        "rope_scaling {v} is not supported (llama3 only)"
                    )));
                }
                Some(serde_json::from_value(v).map_err(|e| bad(format!("rope_scaling: {e}")))?)
            }
        };
        let cfg = DecoderConfig {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            vocab_size: hf.vocab_size,
            norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: hf.attention_bias.unwrap_or(arch == Arch::Qwen2),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            rope_scaling,
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks the head arithmetic, so that a bad config fails here and not inside a matmul.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return Err("head counts and head_dim must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.arch.rotary() && !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !self.arch.rotary() && self.num_heads * self.head_dim != self.hidden_size {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.hidden_size, self.num_heads
            ));
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err("layer count, hidden size and vocabulary must be positive".into());
        }
        Ok(())
    }
}

/// GPT-2's `config.json` (`GPT2LMHeadModel`), whose keys differ from the Llama family's.
#[derive(Deserialize)]
struct HfGpt2Config {
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    n_positions: Option<usize>,
    vocab_size: usize,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    tie_word_embeddings: Option<bool>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
}

/// A GPT-2 configuration, or why it cannot be run. Defaults are `transformers`' `GPT2Config`.
fn gpt2_config(json: serde_json::Value) -> std::result::Result<DecoderConfig, String> {
    let hf: HfGpt2Config =
        serde_json::from_value(json).map_err(|e| format!("not a GPT-2 config: {e}"))?;
    // The three spellings of GELU's tanh approximation; candle's `gelu` is exactly it.
    match hf.activation_function.as_deref() {
        None | Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => {}
        Some(other) => {
            return Err(format!(
                "activation_function `{other}` is not supported \
                 (gelu_new, gelu_pytorch_tanh, gelu_fast)"
            ))
        }
    }
    if hf.scale_attn_weights == Some(false) || hf.scale_attn_by_inverse_layer_idx == Some(true) {
        return Err("only the standard 1/sqrt(head_dim) attention scaling is supported".into());
    }
    if hf.add_cross_attention == Some(true) {
        return Err("GPT-2 with cross-attention is not supported".into());
    }
    Ok(DecoderConfig {
        arch: Arch::Gpt2,
        hidden_size: hf.n_embd,
        intermediate_size: hf.n_inner.unwrap_or(4 * hf.n_embd),
        num_layers: hf.n_layer,
        num_heads: hf.n_head,
        num_kv_heads: hf.n_head,
        head_dim: hf.n_embd / hf.n_head.max(1),
        vocab_size: hf.vocab_size,
        norm_eps: hf.layer_norm_epsilon.unwrap_or(1e-5),
        rope_theta: 10_000.0,
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(true),
        attention_bias: true,
        max_position_embeddings: hf.n_positions.unwrap_or(1024),
        rope_scaling: None,
    })
}
