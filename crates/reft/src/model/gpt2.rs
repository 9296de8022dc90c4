//! GPT-2 with the same hook points as the other decoders: learned absolute positions, pre-
//! LayerNorm blocks, one fused `c_attn` projection stored in `transformers`' Conv1D layout
//! (`[in, out]`, transposed here once at load), GELU with the tanh approximation (`gelu_new`),
//! and the LM head tied to the token embeddings. Hook components follow pyvene's GPT-2 mapping:
//! `attention_output` and `mlp_output` are the blocks' outputs before the residual additions.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{run_hook, Component, Hooks, Site, SiteContext};
use crate::ops::{layer_norm, softmax_last_dim, FrozenLinear};
use crate::weights::{LoadContext, WeightSource};
use crate::{Error, Result};

/// Added to the scores of masked keys (finite, so a fully masked padding row stays finite).
const MASKED: f64 = -1e30;

/// GPT-2's shape, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Width (`n_embd`).
    pub hidden_size: usize,
    /// Layers (`n_layer`).
    pub num_layers: usize,
    /// Attention heads (`n_head`).
    pub num_heads: usize,
    /// Feed-forward width (`n_inner`, default 4 × width).
    pub intermediate_size: usize,
    /// Learned positions (`n_positions`).
    pub max_positions: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Gpt2Config {
    /// Reads a Hugging Face `config.json` of a GPT-2 model.
    pub fn from_hf_json(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::BadConfig {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if v["model_type"].as_str() != Some("gpt2") {
            return Err(bad(format!("not a GPT-2 model: {:?}", v["model_type"])));
        }
        if let Some(act) = v["activation_function"]
            .as_str()
            .filter(|a| *a != "gelu_new")
        {
            return Err(bad(format!(
                "activation `{act}` is not supported (gelu_new)"
            )));
        }
        let num = |k: &str| -> Result<usize> {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing `{k}`")))
        };
        let d = num("n_embd")?;
        Ok(Self {
            hidden_size: d,
            num_layers: num("n_layer")?,
            num_heads: num("n_head")?,
            intermediate_size: v["n_inner"].as_u64().map_or(4 * d, |x| x as usize),
            max_positions: num("n_positions")?,
            vocab_size: num("vocab_size")?,
            layer_norm_eps: v["layer_norm_epsilon"].as_f64().unwrap_or(1e-5),
        })
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Block {
    ln_1: Norm,
    c_attn: FrozenLinear,
    attn_proj: FrozenLinear,
    ln_2: Norm,
    c_fc: FrozenLinear,
    mlp_proj: FrozenLinear,
}

/// A frozen GPT-2.
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: FrozenLinear,
    device: Device,
}

impl Gpt2 {
    /// Loads `cfg`'s weights (names with or without the `transformer.` prefix).
    pub fn load(
        source: &WeightSource,
        cfg: Gpt2Config,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let ctx = LoadContext::safetensors(device, dtype);
        let p = if source.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let get = |name: &str, shape: &[usize]| source.get(name, shape, &ctx);
        // Conv1D stores `[in, out]`; FrozenLinear wants `[out, in]`.
        let conv = |name: &str, inp: usize, out: usize| -> Result<FrozenLinear> {
            let w = get(&format!("{name}.weight"), &[inp, out])?
                .t()?
                .contiguous()?;
            Ok(FrozenLinear::new(
                w,
                Some(get(&format!("{name}.bias"), &[out])?),
            ))
        };
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                weight: get(&format!("{name}.weight"), &[d])?,
                bias: get(&format!("{name}.bias"), &[d])?,
            })
        };
        let wte = get(&format!("{p}wte.weight"), &[cfg.vocab_size, d])?;
        let wpe = get(&format!("{p}wpe.weight"), &[cfg.max_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let b = format!("{p}h.{l}");
            blocks.push(Block {
                ln_1: norm(&format!("{b}.ln_1"))?,
                c_attn: conv(&format!("{b}.attn.c_attn"), d, 3 * d)?,
                attn_proj: conv(&format!("{b}.attn.c_proj"), d, d)?,
                ln_2: norm(&format!("{b}.ln_2"))?,
                c_fc: conv(&format!("{b}.mlp.c_fc"), d, i)?,
                mlp_proj: conv(&format!("{b}.mlp.c_proj"), i, d)?,
            });
        }
        let ln_f = norm(&format!("{p}ln_f"))?;
        let head = FrozenLinear::new(wte.clone(), None);
        Ok(Self {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            head,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// Runs the model on `input_ids` `[b, t]` (positions `0..t`; right padding marked by
    /// `attention_mask`, 1 = real) and returns the final normalised hidden states `[b, t, d]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_positions {
            return Err(Error::InvalidArgument(format!(
                "{t} tokens exceed GPT-2's {} positions",
                self.cfg.max_positions
            )));
        }
        let (d, nh) = (self.cfg.hidden_size, self.cfg.num_heads);
        let hd = d / nh;
        let eps = self.cfg.layer_norm_eps;
        let sites = hooks.sites();
        let ctx = SiteContext { past_len: 0 };
        let mut hook = |layer: usize, c: Component, h: Tensor| -> Result<Tensor> {
            run_hook(hooks, &sites, &ctx, Site::new(layer, c), h)
        };
        let pos = Tensor::arange(0u32, t as u32, &self.device)?;
        let mut h = self
            .wte
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, d))?
            .broadcast_add(&self.wpe.index_select(&pos, 0)?)?;
        let mut mask = vec![0f64; b * t * t];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..t {
                    let visible = k <= q && attention_mask.is_none_or(|m| m[bi][k] != 0);
                    if !visible {
                        mask[(bi * t + q) * t + k] = MASKED;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &self.device)?.to_dtype(h.dtype())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, blk) in self.blocks.iter().enumerate() {
            h = hook(l, Component::BlockInput, h)?;
            let x = layer_norm(&h, &blk.ln_1.weight, &blk.ln_1.bias, eps)?;
            let qkv = blk.c_attn.forward(&x)?;
            let heads = |i: usize| -> Result<Tensor> {
                Ok(qkv
                    .narrow(2, i * d, d)?
                    .reshape((b, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let a = softmax_last_dim(&scores)?
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, d))?;
            let a = hook(l, Component::AttentionOutput, blk.attn_proj.forward(&a)?)?;
            h = (h + a)?;
            let x = layer_norm(&h, &blk.ln_2.weight, &blk.ln_2.bias, eps)?;
            let m = blk.mlp_proj.forward(&blk.c_fc.forward(&x)?.gelu()?)?;
            let m = hook(l, Component::MlpOutput, m)?;
            h = (h + m)?;
            h = hook(l, Component::BlockOutput, h)?;
        }
        layer_norm(&h, &self.ln_f.weight, &self.ln_f.bias, eps)
    }

    /// The tied LM head: logits `[…, vocab]` from final hidden states `[…, d]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.head.forward(hidden)
    }
}
