//! Plain-slice f32 maths behind the fused CPU kernels ([`super::fused`], the LM-head loss):
//! strided GEMM through the `gemm` crate, RMSNorm and RoPE with their backward passes.

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
    /// `W` `[out, in]` read as `Wᵀ` `[in, out]`.
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
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the three operands inside their slices,
    // and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `x · W[out, in]ᵀ` for `rows` rows of `x`.
pub(crate) fn linear(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * out];
    mm(
        &mut y,
        out,
        View::rows(x, inp),
        View::t(w, inp),
        (rows, out, inp),
        false,
        true,
    );
    y
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

/// RMSNorm of each row; returns the normalised rows and each row's `1/rms`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let r: Vec<f32> = y
        .par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .map(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
            r
        })
        .collect();
    (y, r)
}

/// Adds to `dx` the input gradient of RMSNorm: `r·u − x·r³·mean(u⊙x)` with `u = g⊙w`.
pub(crate) fn rms_norm_back(dx: &mut [f32], g: &[f32], x: &[f32], r: &[f32], w: &[f32], d: usize) {
    dx.par_chunks_mut(d)
        .zip(g.par_chunks(d).zip(x.par_chunks(d)))
        .zip(r.par_iter())
        .for_each(|((dx, (g, x)), &r)| {
            let dot: f32 = g.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
            let c = r * r * r * dot / d as f32;
            for (((dx, g), w), x) in dx.iter_mut().zip(g).zip(w).zip(x) {
                *dx += r * g * w - c * x;
            }
        });
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
    let half = hd / 2;
    x.par_chunks_mut(width)
        .zip(cos.par_chunks(hd).zip(sin.par_chunks(hd)))
        .for_each(|(row, (c, s))| {
            for head in row.chunks_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    if backward {
                        head[i] = a * c[i] + b * s[i + half];
                        head[i + half] = b * c[i + half] - a * s[i];
                    } else {
                        head[i] = a * c[i] - b * s[i];
                        head[i + half] = b * c[i + half] + a * s[i + half];
                    }
                }
            }
        });
}

pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
