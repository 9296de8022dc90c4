//! The frozen pieces a [`super::Decoder`] is made of, and how each family's checkpoint names
//! and lays them out. The decoder's forward pass is one for all families; what differs is
//! which norm, which MLP and which position scheme a layer carries:
//!
//! | family | norm | MLP | positions | biases |
//! |---|---|---|---|---|
//! | Llama | RMSNorm | SwiGLU | RoPE | none |
//! | Qwen2 | RMSNorm | SwiGLU | RoPE | q, k, v |
//! | GPT-2 | LayerNorm (weight, bias) | `c_fc → gelu_new → c_proj` | learned table | all |
//!
//! GPT-2 checkpoints store their projections as `transformers`' Conv1D (`[in, out]`) with q, k
//! and v fused in one `c_attn`; they are transposed and split once here, so that the forward
//! pass sees the same `[out, in]` linears as for Llama.

use candle_core::Tensor;

use super::config::{Arch, DecoderConfig};
use crate::ops::{layer_norm, rms_norm, FrozenLinear, FusedLinears};
use crate::weights::{LoadContext, WeightSource};
use crate::{Error, Result};

/// A normalisation over the last dimension.
pub(super) enum Norm {
    /// RMSNorm with a weight.
    Rms(Tensor),
    /// LayerNorm with a weight and a bias.
    Layer { weight: Tensor, bias: Tensor },
}

impl Norm {
    /// The LayerNorm `{name}.weight` and `{name}.bias`, each `[d]` (GPT-2's and BERT's names).
    pub fn layer_from(
        source: &WeightSource,
        name: &str,
        d: usize,
        ctx: &LoadContext,
    ) -> Result<Self> {
        Ok(Norm::Layer {
            weight: source.get(&format!("{name}.weight"), &[d], ctx)?,
            bias: source.get(&format!("{name}.bias"), &[d], ctx)?,
        })
    }

    pub fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            Norm::Rms(w) => rms_norm(x, w, eps),
            Norm::Layer { weight, bias } => layer_norm(x, weight, bias, eps),
        }
    }

    fn num_parameters(&self) -> usize {
        match self {
            Norm::Rms(w) => w.elem_count(),
            Norm::Layer { weight, bias } => weight.elem_count() + bias.elem_count(),
        }
    }
}

/// The feed-forward block.
pub(super) enum Mlp {
    /// `down(silu(gate(x)) · up(x))`.
    SwiGlu {
        /// Gate and up projections.
        gate_up: FusedLinears,
        down: FrozenLinear,
    },
    /// `proj(gelu_tanh(fc(x)))` (GPT-2's `gelu_new`).
    Gelu {
        fc: FrozenLinear,
        proj: FrozenLinear,
    },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::SwiGlu { gate_up, down } => {
                let gu = gate_up.forward(x)?;
                down.forward(&(gu[0].silu()? * &gu[1])?)
            }
            // candle's `gelu` is the tanh approximation, with a backward.
            Mlp::Gelu { fc, proj } => proj.forward(&fc.forward(x)?.gelu()?),
        }
    }

    fn num_parameters(&self) -> usize {
        match self {
            Mlp::SwiGlu { gate_up, down } => fused_params(gate_up) + linear_params(down),
            Mlp::Gelu { fc, proj } => linear_params(fc) + linear_params(proj),
        }
    }
}

pub(super) struct Attention {
    /// q, k and v projections.
    pub qkv: FusedLinears,
    pub o: FrozenLinear,
}

pub(super) struct Layer {
    pub input_norm: Norm,
    pub post_attention_norm: Norm,
    pub attn: Attention,
    pub mlp: Mlp,
}

impl Layer {
    fn num_parameters(&self) -> usize {
        self.input_norm.num_parameters()
            + self.post_attention_norm.num_parameters()
            + fused_params(&self.attn.qkv)
            + linear_params(&self.attn.o)
            + self.mlp.num_parameters()
    }
}

/// Every frozen tensor of a decoder.
pub(super) struct Weights {
    pub embed: Tensor,
    /// Learned absolute position embeddings `[max_positions, d]`; `None` with RoPE.
    pub positions: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub norm: Norm,
    pub lm_head: FrozenLinear,
    /// Whether the config ties the head to the token embedding (then it is counted once, even
    /// when the file carries a copy).
    pub tied: bool,
}

impl Weights {
    /// Loads the tensors of `cfg`'s family.
    pub fn load(source: &WeightSource, cfg: &DecoderConfig, ctx: &LoadContext) -> Result<Self> {
        match cfg.arch {
            Arch::Llama | Arch::Qwen2 => load_llama(source, cfg, ctx),
            Arch::Gpt2 => load_gpt2(source, cfg, ctx),
        }
    }

    /// Number of parameters, counted from the tensors (a tied head once, as PyTorch does).
    pub fn num_parameters(&self) -> usize {
        let head = if self.tied {
            0
        } else {
            linear_params(&self.lm_head)
        };
        self.embed.elem_count()
            + self.positions.as_ref().map_or(0, Tensor::elem_count)
            + self.layers.iter().map(Layer::num_parameters).sum::<usize>()
            + self.norm.num_parameters()
            + head
    }
}

fn linear_params(l: &FrozenLinear) -> usize {
    l.weight().elem_count() + l.bias().map_or(0, Tensor::elem_count)
}

fn fused_params(f: &FusedLinears) -> usize {
    f.parts().iter().map(linear_params).sum()
}

/// `transformers`' `LlamaForCausalLM` / `Qwen2ForCausalLM` names (GGUF names are mapped by the
/// source).
fn load_llama(source: &WeightSource, cfg: &DecoderConfig, ctx: &LoadContext) -> Result<Weights> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let get = |name: &str, shape: &[usize]| source.get(name, shape, ctx);
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<FrozenLinear> {
        let (w, q) = source.get_linear(&format!("{name}.weight"), &[out, inp], ctx)?;
        let b = if bias {
            Some(get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(FrozenLinear::new(w, b).with_quant(q))
    };
    let (embed, embed_q) =
        source.get_linear("model.embed_tokens.weight", &[cfg.vocab_size, d], ctx)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let bias = cfg.attention_bias;
        layers.push(Layer {
            input_norm: Norm::Rms(get(&format!("{p}.input_layernorm.weight"), &[d])?),
            post_attention_norm: Norm::Rms(get(
                &format!("{p}.post_attention_layernorm.weight"),
                &[d],
            )?),
            attn: Attention {
                qkv: FusedLinears::new(vec![
                    linear(&format!("{p}.self_attn.q_proj"), nh * hd, d, bias)?,
                    linear(&format!("{p}.self_attn.k_proj"), nkv * hd, d, bias)?,
                    linear(&format!("{p}.self_attn.v_proj"), nkv * hd, d, bias)?,
                ])?,
                o: linear(&format!("{p}.self_attn.o_proj"), d, nh * hd, false)?,
            },
            mlp: Mlp::SwiGlu {
                gate_up: FusedLinears::new(vec![
                    linear(&format!("{p}.mlp.gate_proj"), i, d, false)?,
                    linear(&format!("{p}.mlp.up_proj"), i, d, false)?,
                ])?,
                down: linear(&format!("{p}.mlp.down_proj"), d, i, false)?,
            },
        });
    }
    let norm = Norm::Rms(get("model.norm.weight", &[d])?);
    let tied = FrozenLinear::new(embed.clone(), None).with_quant(embed_q);
    Ok(Weights {
        embed,
        positions: None,
        layers,
        norm,
        lm_head: head(source, cfg, ctx, tied)?,
        tied: cfg.tie_word_embeddings,
    })
}

/// `transformers`' `GPT2LMHeadModel` names, with or without the `transformer.` prefix.
fn load_gpt2(source: &WeightSource, cfg: &DecoderConfig, ctx: &LoadContext) -> Result<Weights> {
    if let WeightSource::Gguf(g) = source {
        return Err(Error::BadConfig {
            path: g.path.clone(),
            msg: "GPT-2 is supported from Hugging Face folders (safetensors), not GGUF".into(),
        });
    }
    let p = if source.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let get = |name: &str, shape: &[usize]| source.get(name, shape, ctx);
    // Conv1D: weight `[in, out]`, always a bias.
    let conv = |name: &str, inp: usize, out: usize| -> Result<(Tensor, Tensor)> {
        let w = get(&format!("{name}.weight"), &[inp, out])?;
        Ok((w.t()?.contiguous()?, get(&format!("{name}.bias"), &[out])?))
    };
    let linear = |name: &str, inp: usize, out: usize| -> Result<FrozenLinear> {
        let (w, b) = conv(name, inp, out)?;
        Ok(FrozenLinear::new(w, Some(b)))
    };
    let norm = |name: &str| Norm::layer_from(source, name, d, ctx);
    let embed = get(&format!("{p}wte.weight"), &[cfg.vocab_size, d])?;
    let positions = get(&format!("{p}wpe.weight"), &[cfg.max_position_embeddings, d])?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let b = format!("{p}h.{l}");
        // `c_attn` is q|k|v along its output axis.
        let (w, bias) = conv(&format!("{b}.attn.c_attn"), d, 3 * d)?;
        let part = |j: usize| -> Result<FrozenLinear> {
            Ok(FrozenLinear::new(
                w.narrow(0, j * d, d)?,
                Some(bias.narrow(0, j * d, d)?),
            ))
        };
        layers.push(Layer {
            input_norm: norm(&format!("{b}.ln_1"))?,
            post_attention_norm: norm(&format!("{b}.ln_2"))?,
            attn: Attention {
                qkv: FusedLinears::new(vec![part(0)?, part(1)?, part(2)?])?,
                o: linear(&format!("{b}.attn.c_proj"), d, d)?,
            },
            mlp: Mlp::Gelu {
                fc: linear(&format!("{b}.mlp.c_fc"), d, i)?,
                proj: linear(&format!("{b}.mlp.c_proj"), i, d)?,
            },
        });
    }
    let norm = norm(&format!("{p}ln_f"))?;
    let lm_head = head(source, cfg, ctx, FrozenLinear::new(embed.clone(), None))?;
    Ok(Weights {
        embed,
        positions: Some(positions),
        layers,
        norm,
        lm_head,
        tied: cfg.tie_word_embeddings,
    })
}

/// The LM head (`lm_head.weight`, `[vocab, d]` in every family), or `tied` (the embedding)
/// whenever the config ties them, as transformers ties them on load. A tied checkpoint's own
/// copy of the head (torch.save keeps one over the embedding's storage) is not read: it would
/// be a second `[vocab, d]` matrix in memory.
fn head(
    source: &WeightSource,
    cfg: &DecoderConfig,
    ctx: &LoadContext,
    tied: FrozenLinear,
) -> Result<FrozenLinear> {
    if cfg.tie_word_embeddings {
        return Ok(tied);
    }
    let (w, q) = source.get_linear("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size], ctx)?;
    Ok(FrozenLinear::new(w, None).with_quant(q))
}
