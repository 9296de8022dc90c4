//! Plain-slice f32 maths behind the fused CPU kernels ([`super::fused`], the LM-head loss,
//! [`crate::cpu::encoder_fused`]): strided GEMM through the `gemm` crate, RMSNorm, LayerNorm, RoPE,
//! SwiGLU and exact-erf GELU with their backward passes.

use candle_core::{CpuStorage, Layout, Storage};
use rayon::prelude::*;

/// The contiguous f32 data behind a read guard of a CPU tensor.
pub(crate) fn f32s<'a, G: std::ops::Deref<Target = Storage>>(
    g: &'a G,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match (&**g, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("fused layers: expected contiguous f32 tensors on the CPU"),
    }
}

/// The contiguous part of a custom op's input `v` under layout `l`; `what` names the op in the
/// error.
pub(crate) fn contiguous<'a>(
    v: &'a [f32],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input is not contiguous"),
    }
}

/// A strided matrix operand: element `[i, j]` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
    /// A row-major matrix with row stride `rs` (a weight `[out, in]`, say) read transposed.
    pub fn t(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, `dst` with row stride `dst_rs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    dst: &mut [f32],
    dst_rs: usize,
    a: View,
    b: View,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let last = |v: View, r: usize, c: usize| (r - 1) * v.rs + (c - 1) * v.cs;
    assert!((m - 1) * dst_rs + n <= dst.len(), "mm: dst out of bounds");
    assert!(last(a, m, k) < a.data.len(), "mm: lhs out of bounds");
    assert!(last(b, k, n) < b.data.len(), "mm: rhs out of bounds");
    let threads = rayon::current_num_threads();
    // Parallel products are split here into one single-threaded `gemm` per thread over
    // disjoint blocks of output columns (or rows, when there are few columns): measured on
    // the training shapes ([202 × 576] by the layers' weights), `gemm`'s own threading is
    // 5–40 % slower than this, mostly from packing the same weight panels on both threads.
    let parts = if parallel { threads } else { 1 };
    let by_cols = n >= 64 * parts;
    let along = if by_cols { n } else { m };
    let parts = parts.min(along.div_ceil(16)).max(1);
    // Blocks of a multiple of 16 columns (one AVX-512 vector) or rows.
    let step = along.div_ceil(parts).next_multiple_of(16);
    let dst_len = dst.len();
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let block = |p: usize| {
        let lo = (p * step).min(along);
        let hi = ((p + 1) * step).min(along);
        if lo == hi {
            return;
        }
        let (dst_off, a_off, b_off, bm, bn) = if by_cols {
            (lo, 0, lo * b.cs, m, hi - lo)
        } else {
            (lo * dst_rs, lo * a.rs, 0, hi - lo, n)
        };
        debug_assert!(dst_off < dst_len);
        let dst = dst_ptr;
        // SAFETY: the asserts above keep every access of the three operands inside their
        // slices; blocks write disjoint elements of `dst`, which is borrowed mutably, so it
        // aliases neither input nor another block.
        unsafe {
            gemm::gemm(
                bm,
                bn,
                k,
                dst.0.add(dst_off),
                1,
                dst_rs as isize,
                accumulate,
                a.data.as_ptr().add(a_off),
                a.cs as isize,
                a.rs as isize,
                b.data.as_ptr().add(b_off),
                b.cs as isize,
                b.rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    if parts == 1 {
        block(0);
    } else {
        (0..parts).into_par_iter().for_each(block);
    }
}

/// A raw pointer that may cross threads (each thread writes its own block).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used by `mm`, whose blocks write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `x · W[out, in]ᵀ` for `rows` rows of `x`.
pub(crate) fn linear(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    linear_into(&mut y, x, w, (rows, inp, out), false);
    y
}

/// `dst (+)= x · W[out, in]ᵀ`: the product behind [`linear`], [`linear_acc`] and
/// [`linear_bias`].
fn linear_into(
    dst: &mut [f32],
    x: &[f32],
    w: &[f32],
    (rows, inp, out): (usize, usize, usize),
    accumulate: bool,
) {
    mm(
        dst,
        out,
        View::rows(x, inp),
        View::t(w, inp),
        (rows, out, inp),
        accumulate,
        true,
    );
}

/// `dst (+)= g · W[out, in]` (the input gradient of a frozen linear).
pub(crate) fn linear_back(
    dst: &mut [f32],
    g: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
) {
    mm(
        dst,
        inp,
        View::rows(g, out),
        View::rows(w, inp),
        (rows, inp, out),
        true,
        true,
    );
}

/// RMSNorm of each row; returns the normalised rows and each row's `1/rms`. On one thread:
/// for the few hundred rows of a training step, waking a second one cost more than it saved
/// (as for [`rope`]; the backward, with twice the arithmetic, gains from two).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let r: Vec<f32> = y
        .chunks_mut(d)
        .zip(x.chunks(d))
        .map(|(y, x)| rms_norm_row(y, x, w, eps))
        .collect();
    (y, r)
}

/// Adds to `dx` the input gradient of RMSNorm: `r·u − x·r³·mean(u⊙x)` with `u = g⊙w`.
pub(crate) fn rms_norm_back(dx: &mut [f32], g: &[f32], x: &[f32], r: &[f32], w: &[f32], d: usize) {
    dx.par_chunks_mut(d)
        .zip(g.par_chunks(d).zip(x.par_chunks(d)))
        .zip(r.par_iter())
        .for_each(|((dx, (g, x)), &r)| rms_norm_back_row(dx, g, x, w, r));
}

/// `x · W[out, in]ᵀ + b` for `rows` rows of `x`: the bias rows are written first and the
/// product accumulated onto them, which saves a pass over the output.
pub(crate) fn linear_bias(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    let mut y = b.repeat(rows);
    linear_acc(&mut y, x, w, rows, inp, out);
    y
}

/// `dst += x · W[out, in]ᵀ` (a frozen linear whose output lands on a residual).
pub(crate) fn linear_acc(
    dst: &mut [f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
) {
    linear_into(dst, x, w, (rows, inp, out), true);
}

/// `x += b` on every row of `x` (`b.len()` wide).
pub(crate) fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_mut(b.len().max(1)) {
        row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
    }
}

/// LayerNorm of each row, `y = x̂·w + b` with `x̂ = (x − mean)/√(var + eps)` (population
/// variance, as PyTorch's); returns `y`, `x̂` and each row's `1/√(var + eps)`, which is all its
/// backward needs. On one thread, for the reason given at [`rms_norm`].
pub(crate) fn layer_norm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    d: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let mut xhat = vec![0f32; x.len()];
    let r = y
        .chunks_mut(d)
        .zip(xhat.chunks_mut(d))
        .zip(x.chunks(d))
        .map(|((y, xh), x)| layer_norm_row(y, xh, x, w, b, eps))
        .collect();
    (y, xhat, r)
}

/// Replaces `g`, the gradient of a LayerNorm's output, by that of its input:
/// `r·(u − mean(u) − x̂·mean(u⊙x̂))` with `u = g⊙w` (in place: the output gradient is not
/// needed afterwards, so no second buffer).
pub(crate) fn layer_norm_back(g: &mut [f32], xhat: &[f32], r: &[f32], w: &[f32], d: usize) {
    g.par_chunks_mut(d)
        .zip(xhat.par_chunks(d))
        .zip(r.par_iter())
        .for_each(|((g, xh), &r)| layer_norm_back_row(g, xh, w, r));
}

/// Exact-erf GELU `u·Φ(u)` of every element, over threads (the feed-forward activations are
/// the largest elementwise pass of an encoder layer).
pub(crate) fn gelu_erf(u: &[f32]) -> Vec<f32> {
    let mut act = vec![0f32; u.len()];
    act.par_chunks_mut(4096)
        .zip(u.par_chunks(4096))
        .for_each(|(a, u)| gelu_erf_chunk(a, u));
    act
}

/// GELU backward in place: `g *= Φ(u) + u·φ(u)`.
pub(crate) fn gelu_erf_back(g: &mut [f32], u: &[f32]) {
    g.par_chunks_mut(4096)
        .zip(u.par_chunks(4096))
        .for_each(|(g, u)| gelu_erf_back_chunk(g, u));
}

/// Half-split rotary embedding in place on every head of every row (`width` = heads·hd).
pub(crate) fn rope(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    width: usize,
    hd: usize,
    backward: bool,
) {
    x.chunks_mut(width)
        .zip(cos.chunks(hd).zip(sin.chunks(hd)))
        .for_each(|(row, (c, s))| {
            for head in row.chunks_mut(hd) {
                rope_head(head, c, s, backward);
            }
        });
}

/// Defines a function whose body is compiled twice — for the baseline target and with AVX-512 —
/// and picks the wide version at run time when the CPU has it. The elementwise loops below are
/// written so that LLVM vectorises them; the baseline x86-64 target only has 4-wide SSE2.
macro_rules! wide_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// `exp(x)` without a library call, so that loops over it vectorise: Cody–Waite reduction to
/// `|r| ≤ ln2/2` and a degree-7 Taylor polynomial (relative error below 1e-7; arguments below
/// −87 give ~1e-38 instead of smaller values, which is what flush-to-zero does anyway).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0; // 1.5·2^23
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2^23 trick (vectorises without SSE4.1's roundps): `t`'s low
    // mantissa bits hold the integer `n`, read back from its bits below. A float-to-int cast
    // would not vectorise (Rust's saturating `as` became one scalar conversion per lane).
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    f32::from_bits((ni.wrapping_add(127) << 23) as u32) * p
}

/// Largest element (lane-wise, so that it vectorises).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(tail) {
        m = if v > m { v } else { m };
    }
    m
}

wide_fn! {
    /// Replaces `x` by `exp(x − max)` and returns `(max, Σ exp(x − max))`.
    pub(crate) fn exp_shifted(x: &mut [f32]) -> (f32, f64) {
        let max = max_of(x);
        let mut acc = [0f32; 16];
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - max);
                *a += *v;
            }
        }
        let mut sum: f64 = acc.iter().map(|&a| a as f64).sum();
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v as f64;
        }
        (max, sum)
    }
}

wide_fn! {
    /// `x *= s` elementwise.
    pub(crate) fn scale(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

wide_fn! {
    /// SwiGLU: `act = silu(gate) ⊙ up`.
    pub(crate) fn swiglu(act: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
            *a = g / (1.0 + exp(-g)) * u;
        }
    }
}

wide_fn! {
    /// SwiGLU backward: from `d_act` to the gradients of gate and up.
    pub(crate) fn swiglu_back(dg: &mut [f32], du: &mut [f32], da: &[f32], gate: &[f32], up: &[f32]) {
        for i in 0..da.len().min(dg.len()).min(du.len()).min(gate.len()).min(up.len()) {
            let (x, u, d) = (gate[i], up[i], da[i]);
            let sig = 1.0 / (1.0 + exp(-x));
            dg[i] = d * u * sig * (1.0 + x * (1.0 - sig));
            du[i] = d * x * sig;
        }
    }
}

/// Sum of `f(a[i], b[i], c[i])`, accumulated in 16 lanes so that it vectorises (a plain
/// `.sum()` keeps the sequential order and stays scalar).
#[inline(always)]
fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (ca, cb, cc) = (
        a[..n].chunks_exact(16),
        b[..n].chunks_exact(16),
        c[..n].chunks_exact(16),
    );
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder());
    let mut acc = [0f32; 16];
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        // Fixed-size views, so that the lane loop has no bounds checks and vectorises.
        let (x, y, z): (&[f32; 16], &[f32; 16], &[f32; 16]) = (
            x.try_into().expect("16 lanes"),
            y.try_into().expect("16 lanes"),
            z.try_into().expect("16 lanes"),
        );
        for j in 0..16 {
            acc[j] += f(x[j], y[j], z[j]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for ((&x, &y), &z) in tail {
        s += f(x, y, z);
    }
    s
}

wide_fn! {
    /// One row of RMSNorm: `y = x·r·w` with `r = 1/√(mean(x²) + eps)`; returns `r`.
    fn rms_norm_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let ms = lane_sum3(x, x, x, |a, _, _| a * a) / x.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
        r
    }
}

wide_fn! {
    /// One row of the RMSNorm backward (see [`rms_norm_back`]).
    fn rms_norm_back_row(dx: &mut [f32], g: &[f32], x: &[f32], w: &[f32], r: f32) {
        let dot = lane_sum3(g, w, x, |g, w, x| g * w * x);
        let c = r * r * r * dot / x.len() as f32;
        for (((dx, g), w), x) in dx.iter_mut().zip(g).zip(w).zip(x) {
            *dx += r * g * w - c * x;
        }
    }
}

/// `(Φ(x), φ(x))`, the standard normal distribution function and density, without a library
/// call so that loops over it vectorise. `erf` by Abramowitz & Stegun 7.1.26 (absolute error
/// below 1.5e-7, about one f32 rounding of `Φ`); the density shares its `exp`.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let e = exp(-z * z);
    let erf_abs = 1.0 - poly * e;
    let erf = if z < 0.0 { -erf_abs } else { erf_abs };
    (0.5 * (1.0 + erf), FRAC_1_SQRT_2PI * e)
}

wide_fn! {
    fn gelu_erf_chunk(act: &mut [f32], u: &[f32]) {
        for (a, &x) in act.iter_mut().zip(u) {
            *a = x * normal_cdf_pdf(x).0;
        }
    }
}

wide_fn! {
    fn gelu_erf_back_chunk(g: &mut [f32], u: &[f32]) {
        for (g, &x) in g.iter_mut().zip(u) {
            let (cdf, pdf) = normal_cdf_pdf(x);
            *g *= cdf + x * pdf;
        }
    }
}

wide_fn! {
    /// One row of LayerNorm (see [`layer_norm`]); returns `1/√(var + eps)`.
    fn layer_norm_row(y: &mut [f32], xhat: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) -> f32 {
        let n = x.len() as f32;
        let mean = lane_sum3(x, x, x, |a, _, _| a) / n;
        let var = lane_sum3(x, x, x, |a, _, _| (a - mean) * (a - mean)) / n;
        let r = 1.0 / (var + eps).sqrt();
        for i in 0..x.len().min(y.len()).min(xhat.len()).min(w.len()).min(b.len()) {
            let h = (x[i] - mean) * r;
            xhat[i] = h;
            y[i] = h * w[i] + b[i];
        }
        r
    }
}

wide_fn! {
    /// One row of the LayerNorm backward (see [`layer_norm_back`]).
    fn layer_norm_back_row(g: &mut [f32], xhat: &[f32], w: &[f32], r: f32) {
        let n = g.len() as f32;
        let mean_u = lane_sum3(g, w, w, |g, w, _| g * w) / n;
        let mean_ux = lane_sum3(g, w, xhat, |g, w, h| g * w * h) / n;
        for i in 0..g.len().min(xhat.len()).min(w.len()) {
            g[i] = r * (g[i] * w[i] - mean_u - xhat[i] * mean_ux);
        }
    }
}

wide_fn! {
    /// Half-split RoPE of one head in place (or its transpose, for the backward).
    fn rope_head(head: &mut [f32], c: &[f32], s: &[f32], backward: bool) {
        let half = head.len() / 2;
        let (lo, hi) = head.split_at_mut(half);
        let (c_lo, c_hi) = c.split_at(half);
        let (s_lo, s_hi) = s.split_at(half);
        if backward {
            for i in 0..half.min(hi.len()).min(c_hi.len()).min(s_hi.len()) {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c_lo[i] + b * s_hi[i];
                hi[i] = b * c_hi[i] - a * s_lo[i];
            }
        } else {
            for i in 0..half.min(hi.len()).min(c_hi.len()).min(s_hi.len()) {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c_lo[i] - b * s_lo[i];
                hi[i] = b * c_hi[i] + a * s_hi[i];
            }
        }
    }
}

wide_fn! {
    /// The softmax backward of one attention row, scaled: `ds = p⊙(ds − ⟨ds, p⟩)·scale`.
    pub(crate) fn softmax_back_row(ds: &mut [f32], p: &[f32], scale: f32) {
        let dot = lane_sum3(ds, p, p, |a, b, _| a * b);
        for (x, pv) in ds.iter_mut().zip(p) {
            *x = pv * (*x - dot) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operand layout the fused kernels use, single-threaded and split over threads,
    /// against a naive triple loop.
    #[test]
    fn split_and_single_threaded_products_agree_with_naive_sums() {
        let (m, n, k) = (7, 19, 33);
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        let a_data: Vec<f32> = (0..m * k).map(val).collect();
        let b_data: Vec<f32> = (0..k * n).map(|i| val(i + 5)).collect();
        // Row-major and transposed storage of each operand.
        let layouts = [
            (View::rows(&a_data, k), View::rows(&b_data, n)),
            (View::rows(&a_data, k), View::t(&b_data, k)),
            (View::t(&a_data, m), View::rows(&b_data, n)),
            (View::t(&a_data, m), View::t(&b_data, k)),
        ];
        for (li, (a, b)) in layouts.into_iter().enumerate() {
            let at = |i: usize, j: usize| a.data[i * a.rs + j * a.cs];
            let bt = |i: usize, j: usize| b.data[i * b.rs + j * b.cs];
            for parallel in [false, true] {
                for accumulate in [false, true] {
                    let mut got = vec![1.5f32; m * n];
                    mm(&mut got, n, a, b, (m, n, k), accumulate, parallel);
                    for i in 0..m {
                        for j in 0..n {
                            let want: f32 = (0..k).map(|q| at(i, q) * bt(q, j)).sum::<f32>()
                                + if accumulate { 1.5 } else { 0.0 };
                            let g = got[i * n + j];
                            assert!(
                                (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                                "layout {li} parallel {parallel} acc {accumulate} [{i},{j}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// GELU and its derivative against f64 with candle's erf, over the range activations take.
    #[test]
    fn gelu_erf_and_its_derivative_match_f64() {
        let xs: Vec<f32> = (0..=40_000).map(|i| -10.0 + i as f32 / 2000.0).collect();
        let act = gelu_erf(&xs);
        let mut g = vec![1f32; xs.len()];
        gelu_erf_back(&mut g, &xs);
        let (mut worst_f, mut worst_g) = (0f64, 0f64);
        for ((&x, &a), &d) in xs.iter().zip(&act).zip(&g) {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / 2f64.sqrt()));
            let pdf = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            worst_f = worst_f.max((a as f64 - x * cdf).abs() / (1.0 + x.abs()));
            worst_g = worst_g.max((d as f64 - (cdf + x * pdf)).abs());
        }
        assert!(worst_f < 3e-7, "gelu off by {worst_f:e}");
        assert!(worst_g < 3e-7, "gelu' off by {worst_g:e}");
    }

    /// LayerNorm forward against f64 sums, its backward against central differences of
    /// `Σ c⊙y` (f64 re-evaluation, so the differences are exact to ~1e-9).
    #[test]
    fn layer_norm_forward_and_backward_match_f64() {
        let (rows, d, eps) = (3, 37, 1e-5f32);
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        let x: Vec<f32> = (0..rows * d).map(|i| val(i) + (i / d) as f32).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + val(i + 3) / 4.0).collect();
        let b: Vec<f32> = (0..d).map(|i| val(i + 7) / 8.0).collect();
        let c: Vec<f32> = (0..rows * d).map(|i| val(i + 11)).collect();
        let reference = |x: &[f64]| -> Vec<f64> {
            let mut y = Vec::with_capacity(x.len());
            for row in x.chunks(d) {
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                let r = 1.0 / (var + eps as f64).sqrt();
                y.extend(
                    row.iter()
                        .enumerate()
                        .map(|(i, v)| (v - mean) * r * w[i] as f64 + b[i] as f64),
                );
            }
            y
        };
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (y, xhat, r) = layer_norm(&x, &w, &b, d, eps);
        for (got, want) in y.iter().zip(reference(&xd)) {
            assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
        let mut g = c.clone();
        layer_norm_back(&mut g, &xhat, &r, &w, d);
        let loss = |x: &[f64]| -> f64 {
            reference(x)
                .iter()
                .zip(&c)
                .map(|(y, &c)| y * c as f64)
                .sum()
        };
        for i in 0..rows * d {
            let h = 1e-4;
            let (mut hi, mut lo) = (xd.clone(), xd.clone());
            hi[i] += h;
            lo[i] -= h;
            let want = (loss(&hi) - loss(&lo)) / (2.0 * h);
            assert!(
                (g[i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "[{i}]: {} vs {want}",
                g[i]
            );
        }
    }

    #[test]
    fn exp_is_accurate_where_softmax_and_silu_use_it() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        let mut row = vec![1.0f32, 3.0, -2.0, 0.5];
        let (max, sum) = exp_shifted(&mut row);
        assert_eq!(max, 3.0);
        let want: f64 = [1.0f64, 3.0, -2.0, 0.5]
            .iter()
            .map(|v| (v - 3.0).exp())
            .sum();
        assert!((sum - want).abs() < 1e-6 * want, "{sum} vs {want}");
    }
}
