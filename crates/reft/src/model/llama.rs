//! The decoder every causal LM runs on: the Llama family (Llama 2/3, SmolLM2, TinyLlama,
//! Mistral, Qwen2) and GPT-2, written so that every op between a hook point and the loss has a
//! backward: RMSNorm or LayerNorm, half-split RoPE or learned positions, grouped-query attention
//! with an explicit mask, SwiGLU or GELU MLP, tied or untied LM head. The per-family pieces and
//! their tensor names are in [`super::blocks`].

use candle_core::{DType, Device, Tensor, D};

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::blocks::{Attention, Layer, Mlp, Norm, Weights};
use super::config::{Arch, DecoderConfig};
use super::decode_step::StepInput;
use super::{
    has_inner_hooks, hook_free_run_end, run_hook, Component, Hooks, KvCache, Site, SiteContext,
};
use crate::cpu::fused::{FusedBlocks, FusedState, Geometry, LayerWeights};
use crate::ops::softmax_last_dim;
use crate::weights::{LoadContext, WeightSource};
use crate::{Error, Result};

/// Added to the attention scores of masked keys. Finite, so a fully masked row (a padding query)
/// gives a uniform distribution instead of NaN.
const MASKED: f64 = -1e30;

/// One forward pass's inputs.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// Token ids `[batch, seq]` (u32).
    pub input_ids: &'a Tensor,
    /// Per sequence, 1 for a real token and 0 for padding, over the cached tokens followed by
    /// this pass's tokens. `None`: every token is real.
    pub attention_mask: Option<&'a [Vec<u32>]>,
    /// Per sequence, the position (RoPE, or row of the learned table) of each of this pass's
    /// tokens. `None`: the cache length plus the column index (right padding or no padding).
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

/// How token positions enter the model.
enum Positions {
    /// Rotary embeddings of queries and keys, with these inverse frequencies.
    Rotary(Vec<f64>),
    /// A learned table (the weights' `positions`, `[max_positions, d]`) added to the token
    /// embeddings.
    Learned,
}

/// A frozen decoder (Llama family or GPT-2).
pub struct Decoder {
    cfg: DecoderConfig,
    w: Weights,
    positions: Positions,
    device: Device,
    dtype: DType,
    /// Whether training passes run hook-free layers as one fused op (see [`crate::cpu::fused`]).
    fused_layers: AtomicBool,
    /// A buffer the LM-head loss reuses from step to step (see [`super::head_loss`]).
    head_scratch: Arc<Mutex<Vec<f32>>>,
}

impl Decoder {
    /// Loads the weights of `cfg` from `source` onto `device` in `dtype`. With
    /// `keep_quantized`, a GGUF file's 4/8-bit blocks are kept too, for fast decoding (see
    /// [`crate::cpu::ggml`]); training and prefill always use the f32 weights.
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
        let w = Weights::load(source, &cfg, &ctx)?;
        let positions = match &w.positions {
            Some(_) => Positions::Learned,
            None => Positions::Rotary(inverse_frequencies(&cfg)),
        };
        Ok(Self {
            cfg,
            w,
            positions,
            device: device.clone(),
            dtype,
            fused_layers: AtomicBool::new(true),
            head_scratch: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Number of model parameters (a tied head counted once, as PyTorch counts them).
    pub fn num_parameters(&self) -> usize {
        self.w.num_parameters()
    }

    /// The most tokens a sequence may have, where that is a hard limit: the rows of a learned
    /// position table (GPT-2). `None` with RoPE, which has no table to run out of.
    pub fn context_limit(&self) -> Option<usize> {
        match self.positions {
            Positions::Learned => Some(self.cfg.max_position_embeddings),
            Positions::Rotary(_) => None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns the fused training kernels (hook-free layers, LM-head loss) on (the default) or
    /// off. Both give the same losses and gradients; off, every op is a candle op (slower).
    pub fn set_fused_layers(&self, on: bool) {
        self.fused_layers
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether passes with a graph take the fused path for hook-free layers (on, f32, CPU, and
    /// a Llama-family model: the fused kernels know RMSNorm, RoPE and SwiGLU only, so GPT-2
    /// trains through the composed ops).
    pub fn runs_fused_layers(&self) -> bool {
        self.fused_kernels_on() && self.cfg.arch != Arch::Gpt2
    }

    /// Whether the fused CPU kernels that serve every family (the LM-head loss) are used.
    pub(crate) fn fused_kernels_on(&self) -> bool {
        self.fused_layers.load(std::sync::atomic::Ordering::Relaxed)
            && self.dtype == DType::F32
            && self.device.is_cpu()
    }

    /// The layers' frozen weights.
    pub(super) fn layers(&self) -> &[Layer] {
        &self.w.layers
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
        let pos = self.position_ids(b, t, past, input.position_ids)?;
        let rope = match &self.positions {
            Positions::Rotary(inv_freq) => Some(self.rope_tables(b, t, &pos, inv_freq)?),
            Positions::Learned => None,
        };
        let mask = self.attention_mask(b, t, past, input.attention_mask)?;

        let (first_layer, mut h) = match input.start {
            Some((layer, h)) => (layer, h.clone()),
            None => (0, self.embed(input.input_ids, &pos)?),
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
        // Decoding steps (one new token per sequence after a prompt, no graph) run hook-free
        // layers on slices (see `super::decode_step`).
        let step = match (&rope, cache.as_deref()) {
            (Some((cos, sin)), Some(c))
                if t == 1 && past > 0 && c.keeps_appended() && self.decode_step_supported() =>
            {
                Some(StepInput {
                    b,
                    visible: input.attention_mask,
                    cos: cos.flatten_all()?.to_vec1::<f32>()?,
                    sin: sin.flatten_all()?.to_vec1::<f32>()?,
                })
            }
            _ => None,
        };
        let n_layers = self.cfg.num_layers;
        let eps = self.cfg.norm_eps;
        let inner_hooks = |l: usize| has_inner_hooks(&sites, l);
        let mut l = first_layer;
        while l < n_layers {
            h = hook(l, Component::BlockInput, h)?;
            if fused && h.track_op() && geo.is_none() {
                geo = Some(self.fused_geometry(b, t, past, input.attention_mask, rope.as_ref())?);
            }
            let run_end = |l: usize| hook_free_run_end(&sites, l, n_layers);
            if let Some(geo) = geo
                .as_ref()
                .and_then(Option::as_ref)
                .filter(|_| !inner_hooks(l))
            {
                // A run of layers with no hook inside: one fused op.
                let end = run_end(l);
                h = self.fused_run(l..end, &h, geo, cache.as_deref_mut())?;
                h = hook(end - 1, Component::BlockOutput, h)?;
                l = end;
                continue;
            }
            if let (Some(step), Some(c)) = (
                step.as_ref().filter(|_| !inner_hooks(l) && !h.track_op()),
                cache.as_deref_mut(),
            ) {
                // A decoding step through a run of hook-free layers, on slices.
                let end = run_end(l);
                h = self.decode_run(l..end, &h, step, c)?;
                h = hook(end - 1, Component::BlockOutput, h)?;
                l = end;
                continue;
            }
            let layer = &self.w.layers[l];
            let x = layer.input_norm.forward(&h, eps)?;
            let kv = cache.as_deref_mut().map(|c| (c, l));
            let a = self.attention(&layer.attn, &x, rope.as_ref(), mask.as_ref(), kv)?;
            let a = hook(l, Component::AttentionOutput, a)?;
            h = (h + a)?;
            let x = layer.post_attention_norm.forward(&h, eps)?;
            let m = layer.mlp.forward(&x)?;
            let m = hook(l, Component::MlpOutput, m)?;
            h = (h + m)?;
            h = hook(l, Component::BlockOutput, h)?;
            l += 1;
        }
        self.w.norm.forward(&h, eps)
    }

    /// Applies the LM head to final hidden states `[…, d]`, giving logits `[…, vocab]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.w.lm_head.forward(hidden)
    }

    /// The LM-head loss's reusable buffer.
    pub(crate) fn head_scratch(&self) -> &Arc<Mutex<Vec<f32>>> {
        &self.head_scratch
    }

    /// The LM head's weight `[vocab, d]`.
    pub(crate) fn lm_head_weight(&self) -> &Tensor {
        self.w.lm_head.weight()
    }

    /// Token embeddings of `ids` `[b, t]`, plus the learned position embeddings of `pos` (one
    /// per token, row-major) when the model has them.
    fn embed(&self, ids: &Tensor, pos: &[u32]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.cfg.hidden_size;
        let h = self
            .w
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let Some(table) = &self.w.positions else {
            return Ok(h);
        };
        let rows = table.dim(0)?;
        if let Some(&p) = pos.iter().find(|&&p| p as usize >= rows) {
            return Err(Error::InvalidArgument(format!(
                "position {p} is past the model's {rows} learned positions (the context is too long)"
            )));
        }
        let idx = Tensor::from_slice(pos, b * t, &self.device)?;
        Ok((h + table.index_select(&idx, 0)?.reshape((b, t, d))?)?)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let qkv = attn.qkv.forward(x)?;
        let q = qkv[0].reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = qkv[1].reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = qkv[2].reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let (q, k) = match rope {
            Some((cos, sin)) => (apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?),
            None => (q, k.contiguous()?),
        };
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
    /// real tokens are not contiguous or the model has no RoPE tables (then the composed path
    /// runs).
    fn fused_geometry(
        &self,
        b: usize,
        t: usize,
        past: usize,
        mask: Option<&[Vec<u32>]>,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Option<Arc<Geometry>>> {
        let Some((cos, sin)) = rope else {
            return Ok(None);
        };
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
            eps: self.cfg.norm_eps as f32,
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
            let layer = &self.w.layers[l];
            let (Norm::Rms(in_norm), Norm::Rms(post_norm), Mlp::SwiGlu { gate_up, down }, None) = (
                &layer.input_norm,
                &layer.post_attention_norm,
                &layer.mlp,
                layer.attn.o.bias(),
            ) else {
                return Err(Error::InvalidArgument(format!(
                    "the fused layers do not support {:?} models",
                    self.cfg.arch
                )));
            };
            layers.push(LayerWeights {
                in_norm: in_norm.contiguous()?,
                post_norm: post_norm.contiguous()?,
                qkv: layer.attn.qkv.weight().contiguous()?,
                qkv_bias: layer.attn.qkv.bias().cloned(),
                o: layer.attn.o.weight().contiguous()?,
                gate_up: gate_up.weight().contiguous()?,
                down: down.weight().contiguous()?,
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

    /// Each token's position, row-major `[b·t]`: `positions` when given, else the cache length
    /// plus the column index.
    fn position_ids(
        &self,
        b: usize,
        t: usize,
        past: usize,
        positions: Option<&[Vec<u32>]>,
    ) -> Result<Vec<u32>> {
        match positions {
            Some(p) if p.len() != b || p.iter().any(|row| row.len() != t) => Err(
                Error::InvalidArgument(format!("position ids must be [{b}][{t}]")),
            ),
            Some(p) => Ok(p.concat()),
            None => Ok((0..b)
                .flat_map(|_| (0..t).map(move |ti| (past + ti) as u32))
                .collect()),
        }
    }

    /// cos/sin tables `[b, 1, t, head_dim]` for the positions `pos` (`[b·t]`).
    fn rope_tables(
        &self,
        b: usize,
        t: usize,
        pos: &[u32],
        inv_freq: &[f64],
    ) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let hd = self.cfg.head_dim;
        let mut cos = vec![0f64; b * t * hd];
        let mut sin = vec![0f64; b * t * hd];
        for (row, &p) in pos.iter().enumerate() {
            let base = row * hd;
            for (i, f) in inv_freq.iter().enumerate() {
                let (s, c) = (p as f64 * f).sin_cos();
                cos[base + i] = c;
                cos[base + i + half] = c;
                sin[base + i] = s;
                sin[base + i + half] = s;
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
