//! Fused forward and input-only backward of consecutive decoder layers that carry no hooks
//! (training; f32 on the CPU).
//!
//! Why: when an adapter is trained, every layer above the lowest edit must run with a graph so
//! that gradients reach the adapter. As candle ops that is dozens of small tensor ops per layer
//! and more in the backward, each allocating, zeroing and handing work to threads, and padded
//! rows are computed like real ones. Here a run of hook-free layers is a single custom op: the
//! forward keeps exactly the activations the backward needs, the backward forms only `dL/dh`
//! (weights are frozen), padding rows are skipped, and every product goes straight to `gemm`.
//! The maths is the composed path's (RMSNorm, half-split RoPE, grouped-query attention with
//! causal and padding masks, SwiGLU); a test holds the two to the same losses and gradients.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::math::{
    contiguous, exp_shifted, f32s, linear, linear_back, mm, rms_norm, rms_norm_back, rope,
    scale as scale_by, softmax_back_row, swiglu, swiglu_back, View,
};

/// One layer's frozen weights (cheap clones of the model's tensors).
#[derive(Clone)]
pub(crate) struct LayerWeights {
    pub in_norm: Tensor,
    pub post_norm: Tensor,
    /// q, k and v stacked `[(nh + 2·nkv)·hd, d]`.
    pub qkv: Tensor,
    pub qkv_bias: Option<Tensor>,
    pub o: Tensor,
    /// Gate and up stacked `[2·inter, d]`.
    pub gate_up: Tensor,
    pub down: Tensor,
}

/// The shapes and masks of one pass, with padding rows removed: example `e`'s real rows are
/// the contiguous columns `real[e].0 .. real[e].0 + real[e].1` of its sequence, and they are
/// stored one example after another ("packed rows").
pub(crate) struct Geometry {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub eps: f32,
    /// Cached positions before this pass (keys/values come from the cache).
    pub past: usize,
    /// Per example: first real column and number of real columns.
    pub real: Vec<(usize, usize)>,
    /// Per example: the cached positions its queries may see.
    pub prefix: Vec<Vec<usize>>,
    /// RoPE tables per packed row, `[rows, hd]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Geometry {
    /// Number of packed (real) rows.
    pub fn rows(&self) -> usize {
        self.real.iter().map(|r| r.1).sum()
    }

    /// The independent pieces of attention: every (example, kv head) pair.
    fn attention_tasks(&self) -> Vec<(usize, usize)> {
        let nkv = self.nkv;
        (0..self.b)
            .flat_map(|e| (0..nkv).map(move |kv| (e, kv)))
            .collect()
    }

    /// First packed row of each example.
    fn offsets(&self) -> Vec<usize> {
        let mut off = Vec::with_capacity(self.b);
        let mut acc = 0;
        for r in &self.real {
            off.push(acc);
            acc += r.1;
        }
        off
    }
}

/// Keys and values written by the run, per layer, `[packed rows, nkv·hd]` each.
pub(crate) type NewKv = Vec<(Vec<f32>, Vec<f32>)>;

/// The custom op over the hidden states entering the first layer of the run.
pub(crate) struct FusedBlocks {
    pub layers: Vec<LayerWeights>,
    /// Per layer, the cached keys and values `[b, nkv, past, hd]` (when `past > 0`).
    pub prefix_kv: Vec<Option<(Tensor, Tensor)>>,
    pub geo: Arc<Geometry>,
    /// Filled by the forward: what the backward needs, and the new keys/values.
    pub state: Arc<Mutex<FusedState>>,
}

/// What the forward leaves behind.
#[derive(Default)]
pub(crate) struct FusedState {
    saved: Vec<Saved>,
    /// Taken by the caller to extend its key/value cache.
    pub new_kv: NewKv,
}

/// What one layer's backward needs.
pub(crate) struct Saved {
    h_in: Vec<f32>,
    r1: Vec<f32>,
    /// Per (example, kv head), in [`Geometry::attention_tasks`] order.
    groups: Vec<GroupSaved>,
    h_mid: Vec<f32>,
    r2: Vec<f32>,
    /// Gate and up projections, `[rows, 2·inter]`.
    gate_up: Vec<f32>,
}

/// One (example, kv head) attention group, as its forward leaves it for the backward.
struct GroupSaved {
    /// The group's queries (after RoPE), stacked head by head, `[rep·len, hd]`.
    qs: Vec<f32>,
    /// Visible keys and values `[s, hd]`, prefix first.
    kf: Vec<f32>,
    vf: Vec<f32>,
    /// The attention probabilities of the group's query heads, stacked head by head,
    /// `[rep·len, s]`.
    p: Vec<f32>,
}

/// Slices of one layer's weights.
struct W<'a> {
    in_norm: &'a [f32],
    post_norm: &'a [f32],
    qkv: &'a [f32],
    bias: Option<&'a [f32]>,
    o: &'a [f32],
    gate_up: &'a [f32],
    down: &'a [f32],
}

/// Runs `f` with slices of `w`'s tensors.
fn with_weights<R>(w: &LayerWeights, f: impl FnOnce(&W) -> R) -> candle_core::Result<R> {
    let mut tensors = vec![&w.in_norm, &w.post_norm, &w.qkv, &w.o, &w.gate_up, &w.down];
    tensors.extend(&w.qkv_bias);
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let s = guards
        .iter()
        .map(|(g, l)| f32s(g, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let w = W {
        in_norm: s[0],
        post_norm: s[1],
        qkv: s[2],
        o: s[3],
        gate_up: s[4],
        down: s[5],
        bias: s.get(6).copied(),
    };
    Ok(f(&w))
}

impl FusedBlocks {
    /// One layer forward over packed rows `h` `[rows, d]`; returns the output and what the
    /// backward needs, plus the layer's new keys and values.
    fn layer_forward(
        &self,
        w: &W,
        prefix: Option<(&[f32], &[f32])>,
        h_in: Vec<f32>,
    ) -> (Vec<f32>, Saved, (Vec<f32>, Vec<f32>)) {
        let g = &*self.geo;
        let (d, hd, nh, nkv) = (g.d, g.hd, g.nh, g.nkv);
        let n = g.rows();
        let inter = w.gate_up.len() / d / 2;
        let (x1, r1) = rms_norm(&h_in, w.in_norm, d, g.eps);
        let (wq, wk) = ((nh * hd), (nkv * hd));
        let mut qkv = linear(&x1, w.qkv, n, d, wq + 2 * wk);
        if let Some(b) = w.bias {
            for row in qkv.chunks_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
            }
        }
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(n * wq),
            Vec::with_capacity(n * wk),
            Vec::with_capacity(n * wk),
        );
        for row in qkv.chunks(wq + 2 * wk) {
            q.extend_from_slice(&row[..wq]);
            k.extend_from_slice(&row[wq..wq + wk]);
            v.extend_from_slice(&row[wq + wk..]);
        }
        rope(&mut q, &g.cos, &g.sin, nh * hd, hd, false);
        rope(&mut k, &g.cos, &g.sin, nkv * hd, hd, false);
        let (attn, groups) = self.attention_forward(&q, &k, &v, prefix);
        let a = linear(&attn, w.o, n, nh * hd, d);
        let h_mid: Vec<f32> = h_in.iter().zip(&a).map(|(h, a)| h + a).collect();
        let (x2, r2) = rms_norm(&h_mid, w.post_norm, d, g.eps);
        let gate_up = linear(&x2, w.gate_up, n, d, 2 * inter);
        let mut act = vec![0f32; n * inter];
        act.par_chunks_mut(inter)
            .zip(gate_up.par_chunks(2 * inter))
            .for_each(|(a, gu)| {
                let (gate, up) = gu.split_at(inter);
                swiglu(a, gate, up);
            });
        let mut out = h_mid.clone();
        mm(
            &mut out,
            d,
            View::rows(&act, inter),
            View::t(w.down, inter),
            (n, d, inter),
            true,
            true,
        );
        let saved = Saved {
            h_in,
            r1,
            groups,
            h_mid,
            r2,
            gate_up,
        };
        (out, saved, (k, v))
    }

    /// Attention over packed rows; returns the heads' outputs `[rows, nh·hd]` and, per
    /// (example, kv head), what the backward needs.
    fn attention_forward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        prefix: Option<(&[f32], &[f32])>,
    ) -> (Vec<f32>, Vec<GroupSaved>) {
        let g = &*self.geo;
        let (hd, nh, nkv) = (g.hd, g.nh, g.nkv);
        let rep = nh / nkv;
        let off = g.offsets();
        let scale = 1.0 / (hd as f32).sqrt();
        let tasks = g.attention_tasks();
        let results: Vec<_> = tasks
            .par_iter()
            .map(|&(e, kv)| {
                let len = g.real[e].1;
                let np = g.prefix[e].len();
                let s = np + len;
                // Visible keys and values: the example's cached prefix, then its new rows.
                let mut kf = Vec::with_capacity(s * hd);
                let mut vf = Vec::with_capacity(s * hd);
                if let Some((pk, pv)) = prefix {
                    for &j in &g.prefix[e] {
                        let at = ((e * nkv + kv) * g.past + j) * hd;
                        kf.extend_from_slice(&pk[at..at + hd]);
                        vf.extend_from_slice(&pv[at..at + hd]);
                    }
                }
                let rows = off[e]..off[e] + len;
                gather_heads(&mut kf, k, rows.clone(), nkv * hd, kv..kv + 1, hd);
                gather_heads(&mut vf, v, rows.clone(), nkv * hd, kv..kv + 1, hd);
                // The group's query heads share these keys: their queries are stacked head by
                // head (`[rep·len, hd]`) so that scores and mixes are one product each.
                let mut qs = Vec::with_capacity(rep * len * hd);
                gather_heads(&mut qs, q, rows, nh * hd, kv * rep..(kv + 1) * rep, hd);
                let rows = rep * len;
                let mut p = vec![0f32; rows * s];
                mm(
                    &mut p,
                    s,
                    View::rows(&qs, hd),
                    View::t(&kf, hd),
                    (rows, s, hd),
                    false,
                    false,
                );
                for (ri, row) in p.chunks_mut(s).enumerate() {
                    let visible = np + ri % len + 1;
                    scale_by(&mut row[..visible], scale);
                    let (_, sum) = exp_shifted(&mut row[..visible]);
                    scale_by(&mut row[..visible], (1.0 / sum) as f32);
                    row[visible..].fill(0.0);
                }
                let mut out = vec![0f32; rows * hd];
                mm(
                    &mut out,
                    hd,
                    View::rows(&p, s),
                    View::rows(&vf, hd),
                    (rows, hd, s),
                    false,
                    false,
                );
                (out, GroupSaved { qs, kf, vf, p })
            })
            .collect();
        let mut attn = vec![0f32; g.rows() * nh * hd];
        let mut groups = Vec::with_capacity(tasks.len());
        for (&(e, kv), (out, group)) in tasks.iter().zip(results) {
            let rows = off[e]..off[e] + g.real[e].1;
            scatter_heads(&mut attn, &out, rows, nh * hd, kv * rep..(kv + 1) * rep, hd);
            groups.push(group);
        }
        (attn, groups)
    }

    /// One layer backward: from `dy` `[rows, d]` to the gradient of the layer's input.
    fn layer_backward(&self, w: &W, s: &Saved, dy: Vec<f32>) -> Vec<f32> {
        let g = &*self.geo;
        let (d, hd, nh, nkv) = (g.d, g.hd, g.nh, g.nkv);
        let n = g.rows();
        let inter = w.gate_up.len() / d / 2;
        // MLP: out = h_mid + down(silu(gate) ⊙ up).
        let mut d_act = vec![0f32; n * inter];
        linear_back(&mut d_act, &dy, w.down, n, inter, d);
        let mut d_gu = vec![0f32; n * 2 * inter];
        d_gu.par_chunks_mut(2 * inter)
            .zip(d_act.par_chunks(inter).zip(s.gate_up.par_chunks(2 * inter)))
            .for_each(|(dgu, (da, gu))| {
                let (dg, du) = dgu.split_at_mut(inter);
                let (gate, up) = gu.split_at(inter);
                swiglu_back(dg, du, da, gate, up);
            });
        let mut d_x2 = vec![0f32; n * d];
        linear_back(&mut d_x2, &d_gu, w.gate_up, n, d, 2 * inter);
        let mut d_mid = dy;
        rms_norm_back(&mut d_mid, &d_x2, &s.h_mid, &s.r2, w.post_norm, d);
        // Attention: h_mid = h_in + o(attn(q, k, v)).
        let mut d_attn = vec![0f32; n * nh * hd];
        linear_back(&mut d_attn, &d_mid, w.o, n, nh * hd, d);
        let (mut dq, mut dk, dv) = self.attention_backward(s, &d_attn);
        rope(&mut dq, &g.cos, &g.sin, nh * hd, hd, true);
        rope(&mut dk, &g.cos, &g.sin, nkv * hd, hd, true);
        let (wq, wk) = (nh * hd, nkv * hd);
        let mut d_qkv = Vec::with_capacity(n * (wq + 2 * wk));
        for r in 0..n {
            d_qkv.extend_from_slice(&dq[r * wq..(r + 1) * wq]);
            d_qkv.extend_from_slice(&dk[r * wk..(r + 1) * wk]);
            d_qkv.extend_from_slice(&dv[r * wk..(r + 1) * wk]);
        }
        let mut d_x1 = vec![0f32; n * d];
        linear_back(&mut d_x1, &d_qkv, w.qkv, n, d, wq + 2 * wk);
        let mut d_in = d_mid;
        rms_norm_back(&mut d_in, &d_x1, &s.h_in, &s.r1, w.in_norm, d);
        d_in
    }

    /// Gradients of the (roped) queries, the new keys and the new values.
    fn attention_backward(&self, s: &Saved, d_attn: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let g = &*self.geo;
        let (hd, nh, nkv) = (g.hd, g.nh, g.nkv);
        let rep = nh / nkv;
        let off = g.offsets();
        let scale = 1.0 / (hd as f32).sqrt();
        let tasks = g.attention_tasks();
        let results: Vec<_> = tasks
            .par_iter()
            .enumerate()
            .map(|(ti, &(e, kv))| {
                let len = g.real[e].1;
                let np = g.prefix[e].len();
                let sl = np + len;
                let GroupSaved { qs, kf, vf, p } = &s.groups[ti];
                let rows = rep * len;
                let mut go = Vec::with_capacity(rows * hd);
                gather_heads(
                    &mut go,
                    d_attn,
                    off[e]..off[e] + len,
                    nh * hd,
                    kv * rep..(kv + 1) * rep,
                    hd,
                );
                // dV (new rows) = Σ over the group's heads of Pᵀ[new keys] · dO.
                let mut dv = vec![0f32; len * hd];
                mm(
                    &mut dv,
                    hd,
                    View::t(&p[np..], sl),
                    View::rows(&go, hd),
                    (len, hd, rows),
                    false,
                    false,
                );
                // dP = dO · Vᵀ, then the softmax backward, scaled.
                let mut ds = vec![0f32; rows * sl];
                mm(
                    &mut ds,
                    sl,
                    View::rows(&go, hd),
                    View::t(vf, hd),
                    (rows, sl, hd),
                    false,
                    false,
                );
                for (drow, prow) in ds.chunks_mut(sl).zip(p.chunks(sl)) {
                    softmax_back_row(drow, prow, scale);
                }
                // dQ = dS · K; dK (new rows) = dSᵀ[new keys] · Q.
                let mut dq = vec![0f32; rows * hd];
                mm(
                    &mut dq,
                    hd,
                    View::rows(&ds, sl),
                    View::rows(kf, hd),
                    (rows, hd, sl),
                    false,
                    false,
                );
                let mut dk = vec![0f32; len * hd];
                mm(
                    &mut dk,
                    hd,
                    View::t(&ds[np..], sl),
                    View::rows(qs, hd),
                    (len, hd, rows),
                    false,
                    false,
                );
                (dq, dk, dv)
            })
            .collect();
        let n = g.rows();
        let mut dq = vec![0f32; n * nh * hd];
        let mut dk = vec![0f32; n * nkv * hd];
        let mut dv = vec![0f32; n * nkv * hd];
        for (&(e, kv), (q, k, v)) in tasks.iter().zip(results) {
            let rows = off[e]..off[e] + g.real[e].1;
            scatter_heads(
                &mut dq,
                &q,
                rows.clone(),
                nh * hd,
                kv * rep..(kv + 1) * rep,
                hd,
            );
            scatter_heads(&mut dk, &k, rows.clone(), nkv * hd, kv..kv + 1, hd);
            scatter_heads(&mut dv, &v, rows, nkv * hd, kv..kv + 1, hd);
        }
        (dq, dk, dv)
    }

    /// Packs the real rows of `[b, t, d]` data.
    fn pack(&self, x: &[f32]) -> Vec<f32> {
        let g = &*self.geo;
        let mut out = Vec::with_capacity(g.rows() * g.d);
        for (e, &(lo, len)) in g.real.iter().enumerate() {
            let at = (e * g.t + lo) * g.d;
            out.extend_from_slice(&x[at..at + len * g.d]);
        }
        out
    }

    /// Unpacks rows into `[b, t, d]`, zeros at padding.
    fn unpack(&self, x: &[f32]) -> Vec<f32> {
        let g = &*self.geo;
        let mut out = vec![0f32; g.b * g.t * g.d];
        let mut r = 0;
        for (e, &(lo, len)) in g.real.iter().enumerate() {
            let at = (e * g.t + lo) * g.d;
            out[at..at + len * g.d].copy_from_slice(&x[r * g.d..(r + len) * g.d]);
            r += len;
        }
        out
    }
}

/// Appends heads `heads` of packed rows `rows` (row stride `width`) to `out`, stacked head by
/// head: `[heads.len()·rows.len(), hd]`.
fn gather_heads(
    out: &mut Vec<f32>,
    x: &[f32],
    rows: Range<usize>,
    width: usize,
    heads: Range<usize>,
    hd: usize,
) {
    for h in heads {
        for i in rows.clone() {
            let at = i * width + h * hd;
            out.extend_from_slice(&x[at..at + hd]);
        }
    }
}

/// The inverse of [`gather_heads`]: writes stacked heads back into packed rows.
fn scatter_heads(
    x: &mut [f32],
    stacked: &[f32],
    rows: Range<usize>,
    width: usize,
    heads: Range<usize>,
    hd: usize,
) {
    let len = rows.len();
    for (h, block) in heads.zip(stacked.chunks(len * hd)) {
        for (i, src) in rows.clone().zip(block.chunks(hd)) {
            let at = i * width + h * hd;
            x[at..at + hd].copy_from_slice(src);
        }
    }
}

impl CustomOp1 for FusedBlocks {
    fn name(&self) -> &'static str {
        "fused-decoder-layers"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("fused layers: f32 only")
        };
        let mut h = self.pack(contiguous(v, l, "fused layers")?);
        let mut saved = Vec::with_capacity(self.layers.len());
        let mut new_kv = Vec::with_capacity(self.layers.len());
        for (lw, pkv) in self.layers.iter().zip(&self.prefix_kv) {
            let guards = pkv
                .as_ref()
                .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()));
            let prefix = match &guards {
                Some(((gk, lk), (gv, lv))) => Some((f32s(gk, lk)?, f32s(gv, lv)?)),
                None => None,
            };
            let (out, sv, kv) = with_weights(lw, |w| self.layer_forward(w, prefix, h))?;
            h = out;
            saved.push(sv);
            new_kv.push(kv);
        }
        *self.state.lock().expect("fused state lock") = FusedState { saved, new_kv };
        Ok((CpuStorage::F32(self.unpack(&h)), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dy = self.pack(&grad);
        let state = self.state.lock().expect("fused state lock");
        if state.saved.len() != self.layers.len() {
            candle_core::bail!("fused layers: backward before forward")
        }
        for (lw, s) in self.layers.iter().zip(&state.saved).rev() {
            dy = with_weights(lw, |w| self.layer_backward(w, s, dy))?;
        }
        let dx = self.unpack(&dy);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
