//! One decoding step through a run of hook-free layers on plain f32 slices (inference, CPU).
//!
//! Why: a decode step multiplies one new row per sequence through every layer. As candle ops
//! that is some 25 small tensor ops per layer, each allocating and some handing work to a
//! thread pool of their own, and on two cores those pools and the products' thread team
//! spin against each other: measured, the ops cost more than the products at one sequence.
//! Here a run of layers is straight-line code over slices: the products go to the GGUF block
//! kernel (or the f32 GEMM) and attention reads the key/value cache in place, with one thread
//! team for both. The maths is the composed path's (RMSNorm, half-split RoPE, grouped-query
//! attention over the cached positions a row may see, SwiGLU); a test holds the two together.

use candle_core::{Device, Tensor};

use super::blocks::{Mlp, Norm};
use super::llama::Decoder;
use super::KvCache;
use crate::cpu::blocks_serve;
use crate::cpu::ggml::QuantWeight;
use crate::cpu::math::{add_rows, exp_shifted, f32s, linear, mm, rms_norm, rope, swiglu, View};
use crate::ops::FrozenLinear;
use crate::{Error, Result};

/// What every layer of one step shares.
pub(super) struct StepInput<'a> {
    /// Sequences (one new row each).
    pub b: usize,
    /// Per row, which of the `past + 1` key positions it may see (`None`: all).
    pub visible: Option<&'a [Vec<u32>]>,
    /// RoPE tables per row, `[b, hd]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Decoder {
    /// Whether decode steps may take [`Decoder::decode_run`]: every layer is RMSNorm +
    /// SwiGLU with an unbiased output projection (the Llama family), f32 on the CPU.
    pub(super) fn decode_step_supported(&self) -> bool {
        self.runs_fused_layers()
            && self.layers().iter().all(|l| {
                matches!(
                    (
                        &l.input_norm,
                        &l.post_attention_norm,
                        &l.mlp,
                        l.attn.o.bias()
                    ),
                    (Norm::Rms(_), Norm::Rms(_), Mlp::SwiGlu { .. }, None)
                )
            })
    }

    /// Runs layers `range` for one new row per sequence (`h` `[b, 1, d]`, no graph), appending
    /// each layer's keys and values to `cache`.
    pub(super) fn decode_run(
        &self,
        range: std::ops::Range<usize>,
        h: &Tensor,
        step: &StepInput,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let cfg = self.config();
        let (b, d) = (step.b, cfg.hidden_size);
        let mut hs = h.flatten_all()?.to_vec1::<f32>()?;
        if hs.len() != b * d {
            return Err(Error::InvalidArgument(format!(
                "decode step: hidden states of {} values for {b} rows of {d}",
                hs.len()
            )));
        }
        for l in range {
            self.decode_layer(l, &mut hs, step, cache)?;
        }
        Ok(Tensor::from_vec(hs, (b, 1, d), &Device::Cpu)?)
    }

    fn decode_layer(
        &self,
        l: usize,
        hs: &mut [f32],
        step: &StepInput,
        cache: &mut KvCache,
    ) -> Result<()> {
        let cfg = self.config();
        let (b, d, eps) = (step.b, cfg.hidden_size, cfg.norm_eps as f32);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let layer = &self.layers()[l];
        let (Norm::Rms(in_norm), Norm::Rms(post_norm), Mlp::SwiGlu { gate_up, down }) =
            (&layer.input_norm, &layer.post_attention_norm, &layer.mlp)
        else {
            return Err(Error::InvalidArgument(
                "decode step: the layer is not RMSNorm + SwiGLU".into(),
            ));
        };
        // Attention.
        let (x, _) = {
            let w = in_norm.contiguous()?;
            let (g, l) = w.storage_and_layout();
            rms_norm(hs, f32s(&g, l)?, d, eps)
        };
        let width = (nh + 2 * nkv) * hd;
        let qkv_ = &layer.attn.qkv;
        let mut qkv = product(qkv_.weight(), qkv_.bias(), qkv_.stacked_quant(), &x, b)?;
        for (e, row) in qkv.chunks_mut(width).enumerate() {
            let (qk, _) = row.split_at_mut((nh + nkv) * hd);
            let (c, s) = (&step.cos[e * hd..][..hd], &step.sin[e * hd..][..hd]);
            rope(qk, c, s, (nh + nkv) * hd, hd, false);
        }
        let (k_new, v_new) = split_kv(&qkv, b, nh, nkv, hd);
        let (k, v) = cache.append(
            l,
            &Tensor::from_vec(k_new, (b, nkv, 1, hd), &Device::Cpu)?,
            &Tensor::from_vec(v_new, (b, nkv, 1, hd), &Device::Cpu)?,
        )?;
        let attn = attend(&qkv, &k, &v, step, (nh, nkv, hd))?;
        let a = frozen(&layer.attn.o, &attn, b)?;
        add_rows(hs, &a);
        // Feed-forward.
        let (x, _) = {
            let w = post_norm.contiguous()?;
            let (g, l) = w.storage_and_layout();
            rms_norm(hs, f32s(&g, l)?, d, eps)
        };
        let gu = product(
            gate_up.weight(),
            gate_up.bias(),
            gate_up.stacked_quant(),
            &x,
            b,
        )?;
        let inter = gu.len() / b / 2;
        let mut act = vec![0f32; b * inter];
        for (a, g) in act.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
            swiglu(a, &g[..inter], &g[inter..]);
        }
        let m = frozen(down, &act, b)?;
        add_rows(hs, &m);
        Ok(())
    }
}

/// The new keys and values `[b, nkv, 1, hd]` out of the stacked q/k/v rows.
fn split_kv(qkv: &[f32], b: usize, nh: usize, nkv: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
    let width = (nh + 2 * nkv) * hd;
    let (mut k, mut v) = (
        Vec::with_capacity(b * nkv * hd),
        Vec::with_capacity(b * nkv * hd),
    );
    for row in qkv.chunks(width) {
        k.extend_from_slice(&row[nh * hd..(nh + nkv) * hd]);
        v.extend_from_slice(&row[(nh + nkv) * hd..]);
    }
    (k, v)
}

/// A CPU tensor `[b, heads, s, hd]` whose last axis is contiguous, read in place.
struct CacheView<'a> {
    data: &'a [f32],
    start: usize,
    /// Strides of the batch and head axes; positions are `hd` apart.
    strides: [usize; 2],
}

impl CacheView<'_> {
    /// Positions `0..s` of sequence `e`, head `g`, as rows of `hd`.
    fn rows(&self, e: usize, g: usize, s: usize, hd: usize) -> &[f32] {
        let at = self.start + e * self.strides[0] + g * self.strides[1];
        &self.data[at..at + s * hd]
    }
}

/// Reads a cache tensor in place (f32 on the CPU, rows of `hd` contiguous).
fn cache_view<'a>(
    g: &'a candle_core::Storage,
    l: &candle_core::Layout,
    hd: usize,
) -> Result<CacheView<'a>> {
    match (g, l.stride()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), &[s0, s1, s2, 1])
            if s2 == hd =>
        {
            Ok(CacheView {
                data,
                start: l.start_offset(),
                strides: [s0, s1],
            })
        }
        _ => Err(Error::InvalidArgument(
            "decode step: the key/value cache is not f32 rows on the CPU".into(),
        )),
    }
}

/// Attention of each row's query heads over the cached positions it may see; `qkv` holds the
/// roped queries, `k`/`v` the whole cache `[b, nkv, s, hd]` (this step's row included).
fn attend(
    qkv: &[f32],
    k: &Tensor,
    v: &Tensor,
    step: &StepInput,
    (nh, nkv, hd): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let (b, s) = (step.b, k.dim(2)?);
    // The cache's buffers are rows of `hd`; any other layout is copied into one.
    let rows_of_hd = |t: &Tensor| t.dims().len() == 4 && t.stride()[2..] == [hd, 1];
    let (k, v) = match (rows_of_hd(k), rows_of_hd(v)) {
        (true, true) => (k.clone(), v.clone()),
        _ => (k.contiguous()?, v.contiguous()?),
    };
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (kv_k, kv_v) = (cache_view(&kg, kl, hd)?, cache_view(&vg, vl, hd)?);
    let rep = nh / nkv;
    let width = (nh + 2 * nkv) * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; b * nh * hd];
    let tasks = b * nkv;
    let parts = crate::cpu::team::parts();
    let per_part = tasks.div_ceil(parts).max(1);
    let slots: Vec<std::sync::Mutex<&mut [f32]>> = out
        .chunks_mut(per_part * rep * hd)
        .map(std::sync::Mutex::new)
        .collect();
    crate::cpu::team::for_each_part(&|part| {
        let Some(slot) = slots.get(part) else { return };
        let mut dst = slot.lock().unwrap_or_else(|p| p.into_inner());
        let mut scores = vec![0f32; rep * s];
        for (i, o) in dst.chunks_mut(rep * hd).enumerate() {
            let task = part * per_part + i;
            let (e, g) = (task / nkv, task % nkv);
            let q = &qkv[e * width + g * rep * hd..][..rep * hd];
            let visible = step.visible.map(|m| &m[e][..]);
            attend_group(
                q,
                kv_k.rows(e, g, s, hd),
                kv_v.rows(e, g, s, hd),
                visible,
                (rep, s, hd, scale),
                &mut scores,
                o,
            );
        }
    });
    Ok(out)
}

/// Softmax attention of `rep` query rows over `s` key/value rows, masked by `visible`.
fn attend_group(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    visible: Option<&[u32]>,
    (rep, s, hd, scale): (usize, usize, usize, f32),
    scores: &mut [f32],
    out: &mut [f32],
) {
    mm(
        scores,
        s,
        View::rows(q, hd),
        View::t(k, hd),
        (rep, s, hd),
        false,
        false,
    );
    for row in scores.chunks_mut(s) {
        for (j, x) in row.iter_mut().enumerate() {
            let seen = visible.is_none_or(|m| m.get(j).is_some_and(|&f| f != 0));
            *x = if seen { *x * scale } else { f32::NEG_INFINITY };
        }
        let (_, sum) = exp_shifted(row);
        let inv = (1.0 / sum) as f32;
        for (j, x) in row.iter_mut().enumerate() {
            let seen = visible.is_none_or(|m| m.get(j).is_some_and(|&f| f != 0));
            *x = if seen { *x * inv } else { 0.0 };
        }
    }
    mm(
        out,
        hd,
        View::rows(scores, s),
        View::rows(v, hd),
        (rep, hd, s),
        false,
        false,
    );
}

fn frozen(l: &FrozenLinear, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    product(l.weight(), l.bias(), l.quant(), x, rows)
}

/// `x Wᵀ + bias` for `rows` rows of `x` on slices: the GGUF blocks for as many rows as they
/// serve best ([`blocks_serve`]), else the f32 GEMM.
fn product(
    weight: &Tensor,
    bias: Option<&Tensor>,
    quant: Option<&QuantWeight>,
    x: &[f32],
    rows: usize,
) -> Result<Vec<f32>> {
    let (out, inp) = weight.dims2()?;
    let mut y = match quant.filter(|_| blocks_serve(rows)) {
        Some(q) => {
            let mut y = vec![0f32; rows * out];
            q.product(x, rows, &mut y);
            y
        }
        None => {
            let w = weight.contiguous()?;
            let (g, l) = w.storage_and_layout();
            linear(x, f32s(&g, l)?, rows, inp, out)
        }
    };
    if let Some(bias) = bias {
        add_rows(&mut y, &bias.to_vec1::<f32>()?);
    }
    Ok(y)
}
