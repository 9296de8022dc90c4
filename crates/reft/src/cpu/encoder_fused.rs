//! Fused forward and input-only backward of consecutive BERT-family encoder layers that carry
//! no hooks (f32 on the CPU): the encoder's counterpart of [`super::fused`]. Passes without a
//! graph (the layers below the lowest edit, inference) run the same forward and keep nothing.
//!
//! Why: with an intervention at every layer, each layer above the lowest edit runs with a graph
//! so that gradients reach the edits. As composed candle ops a post-LayerNorm layer is some
//! forty tensor ops forward and more backward, each allocating and handing work to threads, and
//! the padding rows of a batch (about half of an SST-2 batch of 32) are computed like real ones.
//! Here a run of hook-free layers is one custom op: the forward keeps exactly what the backward
//! needs (the packed q/k/v, the attention probabilities, the normalised rows and `1/σ` of both
//! LayerNorms, the feed-forward pre-activations), the backward forms only `dL/dh` (the weights
//! are frozen), padding rows are never computed (each example's real tokens are packed one
//! after another; bidirectional attention over real keys needs no mask then), and every product
//! goes to the `gemm` of [`crate::cpu::math`]. The maths is the composed path's
//! (`LN(h + Attn(h))`, `LN(h' + FFN(h'))`, exact-erf GELU); a test holds the two to the same
//! losses and gradients. Padding rows of the output are zeros (the composed path computes
//! values there that nothing real reads: padding keys are masked in every later layer), and
//! their gradient is zero.
//!
//! In the backward, rows whose output gradient is exactly zero (all but the first token of the
//! last layer under a first-token head) skip the row-wise part — both LayerNorms, the
//! feed-forward block and the attention output projection — since their gradient there is zero;
//! only the attention spreads gradient to them.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::math::{
    add_rows, contiguous, exp_shifted, f32s, gelu_erf, gelu_erf_back, layer_norm, layer_norm_back,
    linear_acc, linear_back, linear_bias, mm, scale as scale_by, softmax_back_row, View,
};
use crate::{Error, Result};

/// One encoder layer's frozen weights (cheap clones of the model's tensors), each contiguous.
#[derive(Clone)]
pub(crate) struct EncoderLayerWeights {
    /// q, k and v stacked `[3d, d]`, and their biases `[3d]`.
    pub qkv: Tensor,
    pub qkv_bias: Tensor,
    pub o: Tensor,
    pub o_bias: Tensor,
    pub norm1: (Tensor, Tensor),
    pub up: Tensor,
    pub up_bias: Tensor,
    pub down: Tensor,
    pub down_bias: Tensor,
    pub norm2: (Tensor, Tensor),
}

/// The shapes of one pass and where its real tokens are.
pub(crate) struct EncoderGeometry {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub nh: usize,
    pub eps: f32,
    /// Per example, its real columns in order; packed row `offsets[e] + i` is column
    /// `cols[e][i]` of example `e`.
    cols: Vec<Vec<usize>>,
    offsets: Vec<usize>,
}

impl EncoderGeometry {
    /// The geometry of a `[b, t]` batch with `mask` (1 = real; `None`: all real). `None` when
    /// an example has no real token: the composed path gives its rows attention over every
    /// (masked) key, which packing cannot reproduce, so that pass stays composed.
    pub fn new(
        (b, t, d, nh): (usize, usize, usize, usize),
        eps: f64,
        mask: Option<&[Vec<u32>]>,
    ) -> Result<Option<Self>> {
        if d % nh != 0 {
            return Err(Error::InvalidArgument(format!(
                "hidden size {d} is not a multiple of the {nh} attention heads"
            )));
        }
        let mut cols = Vec::with_capacity(b);
        for e in 0..b {
            let real: Vec<usize> = match mask {
                Some(m) => {
                    let row = m.get(e).filter(|r| r.len() == t).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "the attention mask needs {b} rows of {t} entries"
                        ))
                    })?;
                    (0..t).filter(|&j| row[j] != 0).collect()
                }
                None => (0..t).collect(),
            };
            if real.is_empty() {
                return Ok(None);
            }
            cols.push(real);
        }
        let offsets = cols
            .iter()
            .scan(0, |acc, c| {
                let at = *acc;
                *acc += c.len();
                Some(at)
            })
            .collect();
        Ok(Some(Self {
            b,
            t,
            d,
            nh,
            eps: eps as f32,
            cols,
            offsets,
        }))
    }

    /// Number of packed (real) rows.
    pub fn rows(&self) -> usize {
        self.cols.iter().map(Vec::len).sum()
    }

    fn hd(&self) -> usize {
        self.d / self.nh
    }

    /// The independent pieces of attention: every (example, head) pair.
    fn tasks(&self) -> Vec<(usize, usize)> {
        let nh = self.nh;
        (0..self.b)
            .flat_map(|e| (0..nh).map(move |h| (e, h)))
            .collect()
    }

    /// Packs the real rows of `[b, t, d]` data.
    fn pack(&self, x: &[f32]) -> Vec<f32> {
        let d = self.d;
        let mut out = Vec::with_capacity(self.rows() * d);
        for (e, cols) in self.cols.iter().enumerate() {
            for &j in cols {
                let at = (e * self.t + j) * d;
                out.extend_from_slice(&x[at..at + d]);
            }
        }
        out
    }

    /// Unpacks rows into `[b, t, d]`, zeros at padding.
    fn unpack(&self, x: &[f32]) -> Vec<f32> {
        let d = self.d;
        let mut out = vec![0f32; self.b * self.t * d];
        for (e, cols) in self.cols.iter().enumerate() {
            for (i, &j) in cols.iter().enumerate() {
                let (at, r) = ((e * self.t + j) * d, (self.offsets[e] + i) * d);
                out[at..at + d].copy_from_slice(&x[r..r + d]);
            }
        }
        out
    }
}

/// The custom op over the hidden states entering the first layer of the run.
pub(crate) struct FusedEncoderLayers {
    pub layers: Vec<EncoderLayerWeights>,
    pub geo: Arc<EncoderGeometry>,
    /// Whether the forward keeps what the backward needs (the input carries a graph).
    pub keep: bool,
    /// Filled by the forward with what the backward needs, one entry per layer.
    pub state: Arc<Mutex<Vec<Saved>>>,
}

/// What one layer's backward needs (packed rows).
pub(crate) struct Saved {
    /// q, k, v `[rows, 3d]`.
    qkv: Vec<f32>,
    /// Attention probabilities per (example, head), in [`EncoderGeometry::tasks`] order,
    /// `[len, len]` each.
    probs: Vec<Vec<f32>>,
    /// The first LayerNorm's normalised rows and `1/σ`.
    xhat1: Vec<f32>,
    r1: Vec<f32>,
    /// The feed-forward pre-activations `[rows, inter]`.
    u: Vec<f32>,
    xhat2: Vec<f32>,
    r2: Vec<f32>,
}

/// Slices of one layer's weights.
struct W<'a> {
    qkv: &'a [f32],
    qkv_bias: &'a [f32],
    o: &'a [f32],
    o_bias: &'a [f32],
    norm1: (&'a [f32], &'a [f32]),
    up: &'a [f32],
    up_bias: &'a [f32],
    down: &'a [f32],
    down_bias: &'a [f32],
    norm2: (&'a [f32], &'a [f32]),
}

/// Runs `f` with slices of `w`'s tensors.
fn with_weights<R>(w: &EncoderLayerWeights, f: impl FnOnce(&W) -> R) -> candle_core::Result<R> {
    let tensors = [
        &w.qkv,
        &w.qkv_bias,
        &w.o,
        &w.o_bias,
        &w.norm1.0,
        &w.norm1.1,
        &w.up,
        &w.up_bias,
        &w.down,
        &w.down_bias,
        &w.norm2.0,
        &w.norm2.1,
    ];
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let s = guards
        .iter()
        .map(|(g, l)| f32s(g, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let w = W {
        qkv: s[0],
        qkv_bias: s[1],
        o: s[2],
        o_bias: s[3],
        norm1: (s[4], s[5]),
        up: s[6],
        up_bias: s[7],
        down: s[8],
        down_bias: s[9],
        norm2: (s[10], s[11]),
    };
    Ok(f(&w))
}

impl FusedEncoderLayers {
    /// One layer forward over packed rows `h` `[rows, d]`; returns the output and what the
    /// backward needs.
    fn layer_forward(&self, w: &W, h: Vec<f32>) -> (Vec<f32>, Saved) {
        let g = &*self.geo;
        let (d, n, eps) = (g.d, g.rows(), g.eps);
        let inter = w.up_bias.len();
        let qkv = linear_bias(&h, w.qkv, w.qkv_bias, n, d, 3 * d);
        let (attn, probs) = self.attention_forward(&qkv);
        // h' = LN(h + o(attn)): the residual and the bias first, the product onto them.
        let mut z1 = h;
        add_rows(&mut z1, w.o_bias);
        linear_acc(&mut z1, &attn, w.o, n, d, d);
        let (x1, xhat1, r1) = layer_norm(&z1, w.norm1.0, w.norm1.1, d, eps);
        // out = LN(h' + down(gelu(up(h')))).
        let u = linear_bias(&x1, w.up, w.up_bias, n, d, inter);
        let act = gelu_erf(&u);
        let mut z2 = x1;
        add_rows(&mut z2, w.down_bias);
        linear_acc(&mut z2, &act, w.down, n, inter, d);
        let (out, xhat2, r2) = layer_norm(&z2, w.norm2.0, w.norm2.1, d, eps);
        let saved = Saved {
            qkv,
            probs,
            xhat1,
            r1,
            u,
            xhat2,
            r2,
        };
        (out, saved)
    }

    /// Self-attention over packed rows `qkv` `[rows, 3d]`: the heads' outputs `[rows, d]` and
    /// the probabilities of every (example, head).
    fn attention_forward(&self, qkv: &[f32]) -> (Vec<f32>, Vec<Vec<f32>>) {
        let g = &*self.geo;
        let (d, hd) = (g.d, g.hd());
        let w3 = 3 * d;
        let scale = 1.0 / (hd as f32).sqrt();
        let tasks = g.tasks();
        let results: Vec<_> = tasks
            .par_iter()
            .map(|&(e, head)| {
                let (len, at) = (g.cols[e].len(), g.offsets[e] * w3 + head * hd);
                // Strided views into the packed q/k/v: no copies.
                let q = View::rows(&qkv[at..], w3);
                let mut p = vec![0f32; len * len];
                mm(
                    &mut p,
                    len,
                    q,
                    View::t(&qkv[at + d..], w3),
                    (len, len, hd),
                    false,
                    false,
                );
                for row in p.chunks_mut(len) {
                    scale_by(row, scale);
                    let (_, sum) = exp_shifted(row);
                    scale_by(row, (1.0 / sum) as f32);
                }
                let mut out = vec![0f32; len * hd];
                mm(
                    &mut out,
                    hd,
                    View::rows(&p, len),
                    View::rows(&qkv[at + 2 * d..], w3),
                    (len, hd, len),
                    false,
                    false,
                );
                (out, p)
            })
            .collect();
        let mut attn = vec![0f32; g.rows() * d];
        let mut probs = Vec::with_capacity(tasks.len());
        for (&(e, head), (out, p)) in tasks.iter().zip(results) {
            scatter_head(&mut attn, &out, g.offsets[e], d, head * hd, hd);
            probs.push(p);
        }
        (attn, probs)
    }

    /// One layer backward: from `dy` `[rows, d]` to the gradient of the layer's input.
    fn layer_backward(&self, w: &W, s: &Saved, dy: Vec<f32>) -> Vec<f32> {
        let g = &*self.geo;
        let (d, n) = (g.d, g.rows());
        let live: Vec<usize> = dy
            .par_chunks(d)
            .enumerate()
            .filter(|(_, row)| row.iter().any(|&x| x != 0.0))
            .map(|(i, _)| i)
            .collect();
        let (dz1, d_attn) = if live.len() == n {
            self.rowwise_backward(w, s, dy, None)
        } else {
            // Only the live rows: gather them, run the row-wise part, scatter back (zeros
            // elsewhere, which is what those rows' gradients are).
            let dy = gather_rows(&dy, &live, d);
            let (dz1, d_attn) = self.rowwise_backward(w, s, dy, Some(&live));
            (
                scatter_rows(&dz1, &live, n, d),
                scatter_rows(&d_attn, &live, n, d),
            )
        };
        let d_qkv = self.attention_backward(s, &d_attn);
        let mut dh = dz1;
        linear_back(&mut dh, &d_qkv, w.qkv, n, d, 3 * d);
        dh
    }

    /// The row-wise part of the backward, from the output gradient of `rows` (all when
    /// `None`) to the gradient of `h + o(attn)` and of the attention heads' outputs.
    fn rowwise_backward(
        &self,
        w: &W,
        s: &Saved,
        dy: Vec<f32>,
        rows: Option<&[usize]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = self.geo.d;
        let inter = w.up_bias.len();
        let pick = |x, width| pick_rows(x, rows, width);
        let (xhat2, xhat1, u) = (pick(&s.xhat2, d), pick(&s.xhat1, d), pick(&s.u, inter));
        let (r2, r1) = (pick(&s.r2, 1), pick(&s.r1, 1));
        let n = r1.len();
        let mut g = dy;
        layer_norm_back(&mut g, &xhat2, &r2, w.norm2.0, d);
        // Feed-forward: z2 = h' + down(gelu(u)), u = up(h').
        let mut da = vec![0f32; n * inter];
        linear_back(&mut da, &g, w.down, n, inter, d);
        gelu_erf_back(&mut da, &u);
        linear_back(&mut g, &da, w.up, n, d, inter);
        layer_norm_back(&mut g, &xhat1, &r1, w.norm1.0, d);
        let mut d_attn = vec![0f32; n * d];
        linear_back(&mut d_attn, &g, w.o, n, d, d);
        (g, d_attn)
    }

    /// Gradient of the packed q/k/v `[rows, 3d]` from that of the heads' outputs.
    fn attention_backward(&self, s: &Saved, d_attn: &[f32]) -> Vec<f32> {
        let g = &*self.geo;
        let (d, hd) = (g.d, g.hd());
        let w3 = 3 * d;
        let scale = 1.0 / (hd as f32).sqrt();
        let tasks = g.tasks();
        let qkv = &s.qkv;
        let results: Vec<_> = tasks
            .par_iter()
            .zip(&s.probs)
            .map(|(&(e, head), p)| {
                let len = g.cols[e].len();
                let at = g.offsets[e] * w3 + head * hd;
                let go = View::rows(&d_attn[g.offsets[e] * d + head * hd..], d);
                // dV = Pᵀ·dO; dP = dO·Vᵀ, then the softmax backward, scaled.
                let mut dv = vec![0f32; len * hd];
                mm(
                    &mut dv,
                    hd,
                    View::t(p, len),
                    go,
                    (len, hd, len),
                    false,
                    false,
                );
                let mut ds = vec![0f32; len * len];
                let vt = View::t(&qkv[at + 2 * d..], w3);
                mm(&mut ds, len, go, vt, (len, len, hd), false, false);
                for (drow, prow) in ds.chunks_mut(len).zip(p.chunks(len)) {
                    softmax_back_row(drow, prow, scale);
                }
                // dQ = dS·K; dK = dSᵀ·Q.
                let mut dq = vec![0f32; len * hd];
                let k = View::rows(&qkv[at + d..], w3);
                mm(
                    &mut dq,
                    hd,
                    View::rows(&ds, len),
                    k,
                    (len, hd, len),
                    false,
                    false,
                );
                let mut dk = vec![0f32; len * hd];
                let q = View::rows(&qkv[at..], w3);
                mm(
                    &mut dk,
                    hd,
                    View::t(&ds, len),
                    q,
                    (len, hd, len),
                    false,
                    false,
                );
                (dq, dk, dv)
            })
            .collect();
        let mut d_qkv = vec![0f32; g.rows() * w3];
        for (&(e, head), (dq, dk, dv)) in tasks.iter().zip(results) {
            let (row, col) = (g.offsets[e], head * hd);
            scatter_head(&mut d_qkv, &dq, row, w3, col, hd);
            scatter_head(&mut d_qkv, &dk, row, w3, d + col, hd);
            scatter_head(&mut d_qkv, &dv, row, w3, 2 * d + col, hd);
        }
        d_qkv
    }
}

/// Writes `block` `[len, hd]` into columns `col..col + hd` of rows `row..row + len` of `x`
/// (row stride `width`).
fn scatter_head(x: &mut [f32], block: &[f32], row: usize, width: usize, col: usize, hd: usize) {
    for (i, src) in block.chunks(hd).enumerate() {
        let at = (row + i) * width + col;
        x[at..at + hd].copy_from_slice(src);
    }
}

/// Rows `rows` of `x` (row width `width`), one after another.
fn gather_rows(x: &[f32], rows: &[usize], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&x[r * width..(r + 1) * width]);
    }
    out
}

/// Rows `rows` of `x` (all of it, borrowed, when `None`).
fn pick_rows<'a>(x: &'a [f32], rows: Option<&[usize]>, width: usize) -> Cow<'a, [f32]> {
    match rows {
        Some(r) => Cow::Owned(gather_rows(x, r, width)),
        None => Cow::Borrowed(x),
    }
}

/// The inverse of [`gather_rows`] into `n` rows, zeros elsewhere.
fn scatter_rows(x: &[f32], rows: &[usize], n: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * width];
    for (src, &r) in x.chunks(width).zip(rows) {
        out[r * width..(r + 1) * width].copy_from_slice(src);
    }
    out
}

impl CustomOp1 for FusedEncoderLayers {
    fn name(&self) -> &'static str {
        "fused-encoder-layers"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("fused encoder layers: f32 only")
        };
        let g = &*self.geo;
        if l.shape().dims() != [g.b, g.t, g.d] {
            candle_core::bail!(
                "fused encoder layers: input {:?}, expected [{}, {}, {}]",
                l.shape(),
                g.b,
                g.t,
                g.d
            )
        }
        let mut h = g.pack(contiguous(v, l, "fused encoder layers")?);
        let mut saved = Vec::with_capacity(self.layers.len());
        for lw in &self.layers {
            let (out, sv) = with_weights(lw, |w| self.layer_forward(w, h))?;
            h = out;
            if self.keep {
                saved.push(sv);
            }
        }
        *self.state.lock().expect("fused state lock") = saved;
        Ok((CpuStorage::F32(g.unpack(&h)), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dy = self.geo.pack(&grad);
        let state = self.state.lock().expect("fused state lock");
        if !self.keep || state.len() != self.layers.len() {
            candle_core::bail!("fused encoder layers: backward before forward")
        }
        for (lw, s) in self.layers.iter().zip(state.iter()).rev() {
            dy = with_weights(lw, |w| self.layer_backward(w, s, dy))?;
        }
        let dx = self.geo.unpack(&dy);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
