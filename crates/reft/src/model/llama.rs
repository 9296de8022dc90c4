//! The Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2), written so that
//! every op between a hook point and the loss has a backward: RMSNorm, half-split RoPE,
//! grouped-query attention with an explicit mask, SwiGLU MLP, tied or untied LM head.
//! Tensor names follow `transformers`' `LlamaForCausalLM`.

use candle_core::{DType, Device, Tensor, D};

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::config::DecoderConfig;
use super::fused::{FusedBlocks, FusedState, Geometry, LayerWeights};
use super::{run_hook, Component, Hooks, KvCache, Site, SiteContext};
use crate::ops::{rms_norm, softmax_last_dim, FrozenLinear, FusedLinears};
use crate::weights::{LoadContext, WeightSource};
use crate::{Error, Result};

/// Added to the attention scores of masked keys. Finite, so a fully masked row (a padding query)
/// gives a uniform distribution instead of NaN.
const MASKED: f64 = -1e30;

struct Attention {
    /// q, k and v projections.
    qkv: FusedLinears,
    o: FrozenLinear,
}

struct Mlp {
    /// Gate and up projections.
    gate_up: FusedLinears,
    down: FrozenLinear,
}

struct Layer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    attn: Attention,
    mlp: Mlp,
}

/// One forward pass's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// Token ids `[batch, seq]` (u32).
    pub input_ids: &'a Tensor,
    /// Per sequence, 1 for a real token and 0 for padding, over the cached tokens followed by
    /// this pass's tokens. `None`: every token is real.
    pub attention_mask: Option<&'a [Vec<u32>]>,
    /// Per sequence, the RoPE position of each of this pass's tokens. `None`: the cache length
    /// plus the column index (right padding or no padding).
    pub position_ids: Option<&'a [Vec<u32>]>,
    /// Start at the input of this layer with these hidden states `[batch, seq, d]` instead of
    /// embedding `input_ids` (whose shape still gives batch and length). Used to skip frozen
    /// layers whose output is cached. A hook at `block_output` of the layer before is applied
    /// to them first.
    pub start: Option<(usize, &'a Tensor)>,
}

impl<'a> ForwardInput<'a> {
    /// Input with no padding.
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            position_ids: None,
            start: None,
        }
    }
}

/// A frozen Llama-family decoder.
pub struct Decoder {
    cfg: DecoderConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: FrozenLinear,
    inv_freq: Vec<f64>,
    device: Device,
    dtype: DType,
    /// Whether training passes run hook-free layers as one fused op (see [`super::fused`]).
    fused_layers: AtomicBool,
    /// A buffer the LM-head loss reuses from step to step (see [`super::head_loss`]).
    head_scratch: Arc<Mutex<Vec<f32>>>,
}

impl Decoder {
    /// Loads the weights of `cfg` from `source` onto `device` in `dtype`. With
    /// `keep_quantized`, a GGUF file's 4/8-bit blocks are kept too, for fast decoding (see
    /// [`crate::quant`]); training and prefill always use the f32 weights.
    pub fn load(
        source: &WeightSource,
        cfg: DecoderConfig,
        device: &Device,
        dtype: DType,
        keep_quantized: bool,
    ) -> Result<Self> {
        let ctx = LoadContext {
            device: device.clone(),
            dtype,
            arch: cfg.arch,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            keep_quantized,
        };
        let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let get = |name: &str, shape: &[usize]| source.get(name, shape, &ctx);
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<FrozenLinear> {
            let (w, q) = source.get_linear(&format!("{name}.weight"), &[out, inp], &ctx)?;
            let b = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(FrozenLinear::new(w, b).with_quant(q))
        };
        let (embed, embed_q) =
            source.get_linear("model.embed_tokens.weight", &[cfg.vocab_size, d], &ctx)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.attention_bias;
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[d])?,
                post_attention_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                attn: Attention {
                    qkv: FusedLinears::new(vec![
                        linear(&format!("{p}.self_attn.q_proj"), nh * hd, d, bias)?,
                        linear(&format!("{p}.self_attn.k_proj"), nkv * hd, d, bias)?,
                        linear(&format!("{p}.self_attn.v_proj"), nkv * hd, d, bias)?,
                    ])?,
                    o: linear(&format!("{p}.self_attn.o_proj"), d, nh * hd, false)?,
                },
                mlp: Mlp {
                    gate_up: FusedLinears::new(vec![
                        linear(&format!("{p}.mlp.gate_proj"), i, d, false)?,
                        linear(&format!("{p}.mlp.up_proj"), i, d, false)?,
                    ])?,
                    down: linear(&format!("{p}.mlp.down_proj"), d, i, false)?,
                },
            });
        }
        let norm = get("model.norm.weight", &[d])?;
        // Some tied checkpoints still carry a copy of the head; a missing head means tied.
        let tied = FrozenLinear::new(embed.clone(), None).with_quant(embed_q);
        let lm_head = if !cfg.tie_word_embeddings || source.contains("lm_head.weight") {
            match linear("lm_head", cfg.vocab_size, d, false) {
                Ok(head) => head,
                Err(Error::MissingTensor { .. }) if cfg.tie_word_embeddings => tied,
                Err(e) => return Err(e),
            }
        } else {
            tied
        };
        let inv_freq = inverse_frequencies(&cfg);
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            dtype,
            fused_layers: AtomicBool::new(true),
            head_scratch: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Number of model parameters (a tied head counted once, as PyTorch counts them).
    pub fn num_parameters(&self) -> usize {
        let c = &self.cfg;
        let (d, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let bias = if c.attention_bias {
            (c.num_heads + 2 * c.num_kv_heads) * hd
        } else {
            0
        };
        let attn = d * c.num_heads * hd * 2 + d * c.num_kv_heads * hd * 2 + bias;
        let layer = attn + 3 * d * i + 2 * d;
        let head = if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * d
        };
        c.vocab_size * d + c.num_layers * layer + d + head
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns the fused training path for hook-free layers on (the default) or off. Both give
    /// the same losses and gradients; off, every op is a candle op (slower).
    pub fn set_fused_layers(&self, on: bool) {
        self.fused_layers
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether passes with a graph take the fused path (on, f32, CPU).
    pub fn runs_fused_layers(&self) -> bool {
        self.fused_layers.load(std::sync::atomic::Ordering::Relaxed)
            && self.dtype == DType::F32
            && self.device.is_cpu()
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the decoder and returns the final normalised hidden states `[batch, seq, d]`.
    ///
    /// `hooks` sees (and may replace) the hidden states at the sites it lists. With `cache`, keys
    /// and values of this pass are appended to it and earlier ones are attended to.
    pub fn forward(
        &self,
        input: &ForwardInput,
        hooks: &mut dyn Hooks,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input.input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let sites = hooks.sites();
        for s in &sites {
            if s.layer >= self.cfg.num_layers {
                return Err(Error::InvalidArgument(format!(
                    "hook at layer {} but the model has {} layers",
                    s.layer, self.cfg.num_layers
                )));
            }
        }
        let ctx = SiteContext { past_len: past };
        let (cos, sin) = self.rope_tables(b, t, past, input.position_ids)?;
        let mask = self.attention_mask(b, t, past, input.attention_mask)?;

        let (first_layer, mut h) = match input.start {
            Some((layer, h)) => (layer, h.clone()),
            None => {
                let ids = input.input_ids.flatten_all()?;
                (
                    0,
                    self.embed
                        .index_select(&ids, 0)?
                        .reshape((b, t, self.cfg.hidden_size))?,
                )
            }
        };
        let mut hook = |layer: usize, c: Component, h: Tensor| -> Result<Tensor> {
            run_hook(hooks, &sites, &ctx, Site::new(layer, c), h)
        };
        if first_layer > 0 {
            h = hook(first_layer - 1, Component::BlockOutput, h)?;
        }
        // The fused path serves passes that record a graph (training), from the first layer
        // whose input carries one.
        let fused = self.runs_fused_layers() && h.dtype() == DType::F32;
        let mut geo: Option<Option<Arc<Geometry>>> = None;
        let n_layers = self.cfg.num_layers;
        let at = |l: usize, c: Component| sites.contains(&Site::new(l, c));
        let inner_hooks =
            |l: usize| at(l, Component::AttentionOutput) || at(l, Component::MlpOutput);
        let mut l = first_layer;
        while l < n_layers {
            h = hook(l, Component::BlockInput, h)?;
            if fused && h.track_op() && geo.is_none() {
                geo = Some(self.fused_geometry(b, t, past, input.attention_mask, &cos, &sin)?);
            }
            if let Some(geo) = geo
                .as_ref()
                .and_then(Option::as_ref)
                .filter(|_| !inner_hooks(l))
            {
                // A run of layers with no hook inside: one fused op.
                let mut end = l + 1;
                while end < n_layers
                    && !inner_hooks(end)
                    && !at(end - 1, Component::BlockOutput)
                    && !at(end, Component::BlockInput)
                {
                    end += 1;
                }
                h = self.fused_run(l..end, &h, geo, cache.as_deref_mut())?;
                h = hook(end - 1, Component::BlockOutput, h)?;
                l = end;
                continue;
            }
            let layer = &self.layers[l];
            let x = rms_norm(&h, &layer.input_norm, self.cfg.rms_norm_eps)?;
            let kv = cache.as_deref_mut().map(|c| (c, l));
            let a = self.attention(&layer.attn, &x, &cos, &sin, mask.as_ref(), kv)?;
            let a = hook(l, Component::AttentionOutput, a)?;
            h = (h + a)?;
            let x = rms_norm(&h, &layer.post_attention_norm, self.cfg.rms_norm_eps)?;
            let gate_up = layer.mlp.gate_up.forward(&x)?;
            let m = layer
                .mlp
                .down
                .forward(&(gate_up[0].silu()? * &gate_up[1])?)?;
            let m = hook(l, Component::MlpOutput, m)?;
            h = (h + m)?;
            h = hook(l, Component::BlockOutput, h)?;
            l += 1;
        }
        rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Applies the LM head to final hidden states `[…, d]`, giving logits `[…, vocab]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// The LM-head loss's reusable buffer.
    pub(crate) fn head_scratch(&self) -> &Arc<Mutex<Vec<f32>>> {
        &self.head_scratch
    }

    /// The LM head's weight `[vocab, d]`.
    pub(crate) fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let qkv = attn.qkv.forward(x)?;
        let q = qkv[0].reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = qkv[1].reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = qkv[2].reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match cache {
            Some((c, l)) => c.append(l, &k, &v.contiguous()?)?,
            None => (k, v.contiguous()?),
        };
        let s = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads that share a KV
        // head are stacked along the sequence axis.
        let rep = nh / nkv;
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, nkv, rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.reshape((b, nkv, rep, t, s))?.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores.reshape((b, nkv, rep * t, s))?)?;
        let out = probs.matmul(&v)?.reshape((b, nh, t, hd))?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        attn.o.forward(&out)
    }

    /// Where the real rows of each sequence are, for the fused path; `None` when an example's
    /// real tokens are not contiguous (then the composed path runs).
    fn fused_geometry(
        &self,
        b: usize,
        t: usize,
        past: usize,
        mask: Option<&[Vec<u32>]>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<Arc<Geometry>>> {
        let (mut real, mut prefix) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for bi in 0..b {
            let visible = |j: usize| mask.is_none_or(|m| m[bi][j] != 0);
            let cols: Vec<usize> = (0..t).filter(|&i| visible(past + i)).collect();
            let lo = cols.first().copied().unwrap_or(0);
            if cols.last().is_some_and(|&hi| hi + 1 - lo != cols.len()) {
                return Ok(None);
            }
            real.push((lo, cols.len()));
            prefix.push((0..past).filter(|&j| visible(j)).collect());
        }
        let hd = self.cfg.head_dim;
        let table = |x: &Tensor| -> Result<Vec<f32>> {
            let all = x.flatten_all()?.to_vec1::<f32>()?;
            let mut out = Vec::new();
            for (bi, &(lo, len)) in real.iter().enumerate() {
                out.extend_from_slice(&all[(bi * t + lo) * hd..(bi * t + lo + len) * hd]);
            }
            Ok(out)
        };
        let (cos, sin) = (table(cos)?, table(sin)?);
        Ok(Some(Arc::new(Geometry {
            b,
            t,
            d: self.cfg.hidden_size,
            nh: self.cfg.num_heads,
            nkv: self.cfg.num_kv_heads,
            hd,
            eps: self.cfg.rms_norm_eps as f32,
            past,
            real,
            prefix,
            cos,
            sin,
        })))
    }

    /// Layers `range` as one fused op on `h` `[b, t, d]`; their keys and values are appended to
    /// `cache` (zeros at padding).
    fn fused_run(
        &self,
        range: std::ops::Range<usize>,
        h: &Tensor,
        geo: &Arc<Geometry>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut layers = Vec::with_capacity(range.len());
        let mut prefix_kv = Vec::with_capacity(range.len());
        for l in range.clone() {
            let layer = &self.layers[l];
            layers.push(LayerWeights {
                in_norm: layer.input_norm.contiguous()?,
                post_norm: layer.post_attention_norm.contiguous()?,
                qkv: layer.attn.qkv.weight().contiguous()?,
                qkv_bias: layer.attn.qkv.bias().cloned(),
                o: layer.attn.o.weight().contiguous()?,
                gate_up: layer.mlp.gate_up.weight().contiguous()?,
                down: layer.mlp.down.weight().contiguous()?,
            });
            let pkv = match (geo.past, cache.as_deref()) {
                (0, _) => None,
                (_, Some(c)) => match c.layer(l) {
                    Some((k, v)) => Some((k.contiguous()?, v.contiguous()?)),
                    None => {
                        return Err(Error::InvalidArgument(format!(
                            "the key/value cache has no entry for layer {l}"
                        )))
                    }
                },
                (_, None) => None,
            };
            prefix_kv.push(pkv);
        }
        let state = Arc::new(Mutex::new(FusedState::default()));
        let op = FusedBlocks {
            layers,
            prefix_kv,
            geo: geo.clone(),
            state: state.clone(),
        };
        let out = h.contiguous()?.apply_op1(op)?;
        if let Some(c) = cache.filter(|c| c.keeps_appended()) {
            let new_kv = std::mem::take(&mut state.lock().expect("fused state lock").new_kv);
            let (nkv, hd, t) = (geo.nkv, geo.hd, geo.t);
            for (l, (k, v)) in range.zip(new_kv) {
                let unpack = |x: &[f32]| -> Result<Tensor> {
                    let mut out = vec![0f32; geo.b * nkv * t * hd];
                    let mut row = 0;
                    for (bi, &(lo, len)) in geo.real.iter().enumerate() {
                        for i in 0..len {
                            for g in 0..nkv {
                                let src = (row + i) * nkv * hd + g * hd;
                                let dst = ((bi * nkv + g) * t + lo + i) * hd;
                                out[dst..dst + hd].copy_from_slice(&x[src..src + hd]);
                            }
                        }
                        row += len;
                    }
                    Ok(Tensor::from_vec(out, (geo.b, nkv, t, hd), &self.device)?)
                };
                c.append(l, &unpack(&k)?, &unpack(&v)?)?;
            }
        }
        Ok(out)
    }

    /// Additive mask `[b, 1, 1, t, past + t]`, or `None` when nothing needs masking.
    fn attention_mask(
        &self,
        b: usize,
        t: usize,
        past: usize,
        padding: Option<&[Vec<u32>]>,
    ) -> Result<Option<Tensor>> {
        let s = past + t;
        if let Some(p) = padding {
            if p.len() != b || p.iter().any(|row| row.len() != s) {
                return Err(Error::InvalidArgument(format!(
                    "attention mask must be [{b}][{s}] (cached + new tokens)"
                )));
            }
        }
        let has_padding = padding.is_some_and(|p| p.iter().flatten().any(|&m| m == 0));
        if t == 1 && !has_padding {
            return Ok(None);
        }
        let mut data = vec![0f64; b * t * s];
        for bi in 0..b {
            for ti in 0..t {
                for j in 0..s {
                    let visible = j <= past + ti && padding.is_none_or(|p| p[bi][j] != 0);
                    if !visible {
                        data[(bi * t + ti) * s + j] = MASKED;
                    }
                }
            }
        }
        let m = Tensor::from_vec(data, (b, 1, 1, t, s), &self.device)?.to_dtype(self.dtype)?;
        Ok(Some(m))
    }

    /// cos/sin tables `[b, 1, t, head_dim]` for this pass's positions.
    fn rope_tables(
        &self,
        b: usize,
        t: usize,
        past: usize,
        positions: Option<&[Vec<u32>]>,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(p) = positions {
            if p.len() != b || p.iter().any(|row| row.len() != t) {
                return Err(Error::InvalidArgument(format!(
                    "position ids must be [{b}][{t}]"
                )));
            }
        }
        let half = self.cfg.head_dim / 2;
        let hd = self.cfg.head_dim;
        let mut cos = vec![0f64; b * t * hd];
        let mut sin = vec![0f64; b * t * hd];
        for bi in 0..b {
            for ti in 0..t {
                let pos = positions.map_or((past + ti) as f64, |p| p[bi][ti] as f64);
                let base = (bi * t + ti) * hd;
                for (i, f) in self.inv_freq.iter().enumerate() {
                    let (s, c) = (pos * f).sin_cos();
                    cos[base + i] = c;
                    cos[base + i + half] = c;
                    sin[base + i] = s;
                    sin[base + i + half] = s;
                }
            }
        }
        let mk = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (b, 1, t, hd), &self.device)?.to_dtype(self.dtype)?)
        };
        Ok((mk(cos)?, mk(sin)?))
    }
}

/// Half-split rotary embedding: `x·cos + rotate_half(x)·sin`, composed of differentiable ops.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// RoPE inverse frequencies, with Llama-3 scaling when configured.
fn inverse_frequencies(cfg: &DecoderConfig) -> Vec<f64> {
    let hd = cfg.head_dim as f64;
    let base: Vec<f64> = (0..cfg.head_dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd))
        .collect();
    let Some(s) = &cfg.rope_scaling else {
        return base;
    };
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}
