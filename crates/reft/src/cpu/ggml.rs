//! Quantized weights for the inference-only path (SPEC §7: "the decode loop may use quantized
//! matmuls").
//!
//! Decoding one token reads every weight once. SmolLM2's 537 MB of f32 weights cap decoding near
//! 20 tokens/s here; a GGUF file's own 4- or 8-bit blocks are 5–6× smaller. These kernels multiply
//! them with *f32* activations (no activation quantization, unlike llama.cpp), so the result is
//! the f32 product of the dequantized weights up to summation order: decoding stays faithful to
//! the f32 model that prefill, training and the parity tests use. A batch of sequences decoding
//! together (the server's continuous batch) multiplies several rows at once: each weight block
//! is unpacked once per tile of rows, so the batch costs little more weight traffic than one row.
//!
//! At load, each GGML block `[scale (f16), (min (f16)), 32 values]` is split into three arrays
//! (scales, mins, packed values) — the same bytes — so that a row's scales convert sixteen at a
//! time and the inner loop only unpacks values.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use half::f16;

use crate::Result;

/// Block formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 weights: f16 scale, 16 bytes of 4-bit values, `w = d (q − 8)`.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 16 bytes of 4-bit values, `w = d q + m`.
    Q4_1,
    /// 32 weights: f16 scale, 32 signed bytes, `w = d q`.
    Q8_0,
}

impl BlockFormat {
    /// The format for a GGML type, if supported.
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per GGML block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes of packed values per block.
    fn value_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }
}

/// A `[out, in]` weight matrix of GGML blocks, split into scales, mins and packed values.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    format: BlockFormat,
    out_dim: usize,
    in_dim: usize,
    /// Per block, `[out][in/32]`, f16 bits.
    scales: Vec<u16>,
    /// Per block (Q4_1 only), f16 bits.
    mins: Vec<u16>,
    /// Packed values, `[out][in/32][value_bytes]`.
    values: Vec<u8>,
}

impl QuantWeight {
    /// Splits raw GGML block bytes; `None` when the shape does not fit the format.
    pub fn new(format: BlockFormat, out_dim: usize, in_dim: usize, data: Vec<u8>) -> Option<Self> {
        let bb = format.block_bytes();
        if !in_dim.is_multiple_of(32) || data.len() != out_dim * in_dim / 32 * bb {
            return None;
        }
        let blocks = data.len() / bb;
        let vb = format.value_bytes();
        let mut scales = Vec::with_capacity(blocks);
        let mut mins = Vec::new();
        let mut values = Vec::with_capacity(blocks * vb);
        for blk in data.chunks_exact(bb) {
            scales.push(u16::from_le_bytes([blk[0], blk[1]]));
            if format == BlockFormat::Q4_1 {
                mins.push(u16::from_le_bytes([blk[2], blk[3]]));
            }
            values.extend_from_slice(&blk[bb - vb..]);
        }
        Some(Self {
            format,
            out_dim,
            in_dim,
            scales,
            mins,
            values,
        })
    }

    /// Reorders whole rows: row `i` of the result is row `perm[i]` of `self`.
    pub fn permute_rows(&self, perm: &[usize]) -> Self {
        let nb = self.in_dim / 32;
        let vb = self.format.value_bytes() * nb;
        let pick = |v: &[u16], r: usize| v[r * nb..(r + 1) * nb].to_vec();
        let mut out = Self {
            scales: Vec::new(),
            mins: Vec::new(),
            values: Vec::new(),
            ..*self
        };
        for &r in perm {
            out.scales.extend(pick(&self.scales, r));
            if !self.mins.is_empty() {
                out.mins.extend(pick(&self.mins, r));
            }
            out.values
                .extend_from_slice(&self.values[r * vb..(r + 1) * vb]);
        }
        out
    }

    /// Stacks matrices of the same format and input width row-wise (e.g. q, k and v), so that
    /// one parallel call computes all of them.
    pub fn concat_rows(parts: &[&QuantWeight]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.in_dim != first.in_dim)
        {
            return None;
        }
        let mut out = Self {
            out_dim: parts.iter().map(|p| p.out_dim).sum(),
            scales: Vec::new(),
            mins: Vec::new(),
            values: Vec::new(),
            ..**first
        };
        for p in parts {
            out.scales.extend_from_slice(&p.scales);
            out.mins.extend_from_slice(&p.mins);
            out.values.extend_from_slice(&p.values);
        }
        Some(out)
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x Wᵀ` for `x` `[rows, in]` (f32, CPU), giving `[rows, out]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        if in_dim != self.in_dim {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: (self.out_dim, self.in_dim).into(),
                op: "quantized matmul",
            }
            .into());
        }
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; rows * self.out_dim];
        self.product(&xs, rows, &mut out);
        Ok(Tensor::from_vec(out, (rows, self.out_dim), &Device::Cpu)?)
    }

    /// `out = x Wᵀ` on plain slices: `xs` `[rows, in]` and `out` `[rows, out]`, row-major.
    /// Output columns are split between the thread team's threads.
    pub fn product(&self, xs: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(
            xs.len(),
            rows * self.in_dim,
            "quantized product: input size"
        );
        assert_eq!(
            out.len(),
            rows * self.out_dim,
            "quantized product: output size"
        );
        if rows == 0 || self.out_dim == 0 {
            return;
        }
        // Per-block sums of x, for the one-row kernel's min/offset terms (the tile kernel
        // dequantizes whole blocks instead).
        let sums: Vec<f32> = if self.uses_tiles(rows) {
            Vec::new()
        } else {
            xs.chunks_exact(32).map(|c| c.iter().sum()).collect()
        };
        let parts = crate::cpu::team::parts();
        let per_part = self.out_dim.div_ceil(parts);
        let dst = Columns {
            ptr: out.as_mut_ptr(),
            stride: self.out_dim,
        };
        crate::cpu::team::for_each_part(&|part| {
            let js = (part * per_part).min(self.out_dim)..((part + 1) * per_part).min(self.out_dim);
            // SAFETY: `out` is `[rows, out_dim]`; each part writes only its own columns `js`.
            unsafe { self.product_part(xs, &sums, rows, js, dst) };
        });
    }

    /// Columns `js` of `x Wᵀ` into `dst`.
    ///
    /// # Safety
    /// `dst` must address `rows` rows of `dst.stride ≥ js.end` floats that no one else writes.
    unsafe fn product_part(
        &self,
        xs: &[f32],
        sums: &[f32],
        rows: usize,
        js: std::ops::Range<usize>,
        dst: Columns,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            if self.uses_tiles(rows) {
                // SAFETY: the CPU supports the features the tile kernel enables (checked by
                // `uses_tiles`); the caller's contract on `dst` is passed on.
                unsafe { self.tiles_avx512(xs, rows, js, dst) };
                return;
            }
        }
        let in_dim = self.in_dim;
        let nb = in_dim / 32;
        let vb = self.format.value_bytes() * nb;
        for j in js {
            let row = self.row(j, nb, vb);
            for r in 0..rows {
                let x = &xs[r * in_dim..(r + 1) * in_dim];
                let v = dot(self.format, &row, x, &sums[r * nb..(r + 1) * nb]);
                // SAFETY: (r, j) is inside `dst` (the caller's contract).
                unsafe { dst.write(r, j, v) };
            }
        }
    }

    /// Whether a product of `rows` rows takes the multi-row kernel (AVX-512, more than one row).
    fn uses_tiles(&self, rows: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            rows > 1 && avx512_available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = rows;
            false
        }
    }

    /// Weight row `j`'s blocks.
    fn row(&self, j: usize, nb: usize, vb: usize) -> Row<'_> {
        Row {
            scales: &self.scales[j * nb..(j + 1) * nb],
            mins: if self.mins.is_empty() {
                &[]
            } else {
                &self.mins[j * nb..(j + 1) * nb]
            },
            values: &self.values[j * vb..(j + 1) * vb],
        }
    }

    /// Several rows of `x` at once (AVX-512): each weight block is unpacked to f32 once and
    /// multiplies a tile of up to [`TILE`] rows, so a decode batch reads and unpacks every
    /// weight once per tile instead of once per row. Weight rows go in panels that stay in
    /// the core's cache while every tile passes over them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn tiles_avx512(
        &self,
        xs: &[f32],
        rows: usize,
        js: std::ops::Range<usize>,
        dst: Columns,
    ) {
        let nb = self.in_dim / 32;
        let vb = self.format.value_bytes() * nb;
        let panel = (PANEL_BYTES / (vb + 4 * nb).max(1)).max(1);
        let mut scales = vec![0f32; 2 * nb];
        let mut p0 = js.start;
        while p0 < js.end {
            let p1 = (p0 + panel).min(js.end);
            let mut r0 = 0;
            while r0 < rows {
                // The widest tile that fits (16, 8, 4, 2 or 1 rows).
                let n = [TILE, 8, 4, 2, 1]
                    .into_iter()
                    .find(|&w| w <= rows - r0)
                    .unwrap_or(1);
                let x = &xs[r0 * self.in_dim..(r0 + n) * self.in_dim];
                for j in p0..p1 {
                    let row = self.row(j, nb, vb);
                    self.block_scales(&row, &mut scales);
                    let o = Columns {
                        // SAFETY: row r0 of `dst` (the caller's contract).
                        ptr: unsafe { dst.ptr.add(r0 * dst.stride + j) },
                        stride: dst.stride,
                    };
                    // SAFETY: `x` holds `n` rows of `in_dim`; the row's slices hold nb blocks;
                    // `o` addresses rows r0 .. r0 + n of column j.
                    unsafe {
                        match n {
                            16 => tile::<16>(self.format, &row, &scales, x, o),
                            8 => tile::<8>(self.format, &row, &scales, x, o),
                            4 => tile::<4>(self.format, &row, &scales, x, o),
                            2 => tile::<2>(self.format, &row, &scales, x, o),
                            _ => tile::<1>(self.format, &row, &scales, x, o),
                        }
                    }
                }
                r0 += n;
            }
            p0 = p1;
        }
    }

    /// A row's per-block scale `d` and offset `m` (`w = d q + m`) as f32, `[d…, m…]`.
    fn block_scales(&self, row: &Row, out: &mut [f32]) {
        let nb = row.scales.len();
        let (d, m) = out.split_at_mut(nb);
        for (o, &s) in d.iter_mut().zip(row.scales) {
            *o = f16::from_bits(s).to_f32();
        }
        match self.format {
            BlockFormat::Q4_1 => {
                for (o, &s) in m.iter_mut().zip(row.mins) {
                    *o = f16::from_bits(s).to_f32();
                }
            }
            BlockFormat::Q4_0 => {
                for (o, &s) in m.iter_mut().zip(d.iter()) {
                    *o = -8.0 * s;
                }
            }
            BlockFormat::Q8_0 => m.fill(0.0),
        }
    }
}

/// How far ahead of the current block the AVX-512 kernel prefetches packed values.
const PREFETCH_BYTES: usize = 2048;

/// One weight row.
struct Row<'a> {
    scales: &'a [u16],
    mins: &'a [u16],
    values: &'a [u8],
}

/// Dot product of one quantized row with `x`, dispatched to the widest available SIMD.
fn dot(format: BlockFormat, row: &Row, x: &[f32], sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_available() {
            // SAFETY: the CPU supports the features `dot_avx512` enables (checked above).
            return unsafe { dot_avx512(format, row, x, sums) };
        }
    }
    dot_generic(format, row, x, sums)
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("fma")
    })
}

/// AVX-512: scales and mins convert sixteen at a time; each block is two 16-lane halves whose
/// unpacked values multiply `x`, then the block scale; two accumulators hide FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dot_avx512(format: BlockFormat, row: &Row, x: &[f32], sums: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = row.scales.len();
    debug_assert!(x.len() == nb * 32 && sums.len() == nb);
    // SAFETY: all pointers below index blocks < nb of `row` (nb scales/mins, nb·value_bytes
    // values) and of `x`/`sums` (nb·32, nb); masked loads stop at nb.
    unsafe {
        let vb = format.value_bytes();
        let (xp, vp) = (x.as_ptr(), row.values.as_ptr());
        let mut acc = [_mm512_setzero_ps(), _mm512_setzero_ps()];
        let mut offset = _mm512_setzero_ps();
        let mut d = [0f32; 16];
        let mut g = 0;
        while g < nb {
            let n = (nb - g).min(16);
            let mask16: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
            let dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask16,
                row.scales.as_ptr().add(g) as *const i16,
            ));
            let sv = _mm512_maskz_loadu_ps(mask16, sums.as_ptr().add(g));
            match format {
                BlockFormat::Q4_1 => {
                    let mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        mask16,
                        row.mins.as_ptr().add(g) as *const i16,
                    ));
                    offset = _mm512_fmadd_ps(mv, sv, offset);
                }
                BlockFormat::Q4_0 => {
                    offset = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(-8.0)), sv, offset);
                }
                BlockFormat::Q8_0 => {}
            }
            _mm512_storeu_ps(d.as_mut_ptr(), dv);
            for k in 0..n {
                let b = g + k;
                let xb = xp.add(b * 32);
                let q = vp.add(b * vb);
                // Stream ahead: the hardware prefetcher stops at page boundaries, and rows of
                // the next weight follow this one contiguously.
                _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BYTES) as *const i8);
                let (lo, hi) = unpack_block(format, q);
                let s = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
                let s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), s);
                acc[k & 1] = _mm512_fmadd_ps(_mm512_set1_ps(d[k]), s, acc[k & 1]);
            }
            g += n;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), offset))
    }
}

/// One block's 32 stored values as f32, values 0–15 and 16–31 (Q4: the low and high nibbles of
/// the 16 bytes; Q8: the signed bytes).
///
/// # Safety
/// `q` must point to the block's `value_bytes` bytes, and the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn unpack_block(
    format: BlockFormat,
    q: *const u8,
) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let (lo, hi) = if format == BlockFormat::Q8_0 {
            (
                _mm512_cvtepi8_epi32(_mm_loadu_si128(q as *const __m128i)),
                _mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(16) as *const __m128i)),
            )
        } else {
            let nibbles = _mm_set1_epi8(0x0F);
            let q = _mm_loadu_si128(q as *const __m128i);
            (
                _mm512_cvtepu8_epi32(_mm_and_si128(q, nibbles)),
                _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), nibbles)),
            )
        };
        (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
    }
}

/// Where a part of a product writes: element `(r, j)` at `ptr + r·stride + j`.
#[derive(Clone, Copy)]
struct Columns {
    ptr: *mut f32,
    stride: usize,
}

// SAFETY: parts of one product write disjoint columns (see `QuantWeight::product`).
unsafe impl Send for Columns {}
// SAFETY: as above.
unsafe impl Sync for Columns {}

impl Columns {
    /// # Safety
    /// `(r, j)` must be inside the buffer and written by no one else.
    unsafe fn write(self, r: usize, j: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.ptr.add(r * self.stride + j) = v };
    }
}

/// Rows of `x` per tile of the multi-row kernel (accumulators held in registers).
const TILE: usize = 16;

/// Bytes of packed weight rows per panel of the multi-row kernel (about half a core's L2).
const PANEL_BYTES: usize = 256 * 1024;

/// `o[i] = x_i · w` for the `R` rows `x_i` of `x` and one weight row, its blocks dequantized
/// to f32 in registers (`w = d q + m`) once for all `R` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile<const R: usize>(
    format: BlockFormat,
    row: &Row,
    scales: &[f32],
    x: &[f32],
    o: Columns,
) {
    use std::arch::x86_64::*;
    let nb = row.scales.len();
    let in_dim = nb * 32;
    debug_assert!(x.len() >= R * in_dim && scales.len() >= 2 * nb);
    // SAFETY: block b < nb reads bytes b·vb .. (b+1)·vb of the row's values, floats
    // i·in_dim + b·32 .. +32 of `x` for i < R, and scales b and nb + b.
    unsafe {
        let vb = format.value_bytes();
        let (xp, vp) = (x.as_ptr(), row.values.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let q = vp.add(b * vb);
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(PREFETCH_BYTES) as *const i8);
            let (lo, hi) = unpack_block(format, q);
            let d = _mm512_set1_ps(*scales.get_unchecked(b));
            let m = _mm512_set1_ps(*scales.get_unchecked(nb + b));
            let wlo = _mm512_fmadd_ps(lo, d, m);
            let whi = _mm512_fmadd_ps(hi, d, m);
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = xp.add(i * in_dim + b * 32);
                *a = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xb), *a);
                *a = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xb.add(16)), *a);
            }
        }
        for (i, a) in acc.into_iter().enumerate() {
            o.write(i, 0, _mm512_reduce_add_ps(a));
        }
    }
}

/// Portable version, written so that the compiler can vectorise the 16-lane inner loops.
fn dot_generic(format: BlockFormat, row: &Row, x: &[f32], sums: &[f32]) -> f32 {
    let vb = format.value_bytes();
    let mut acc = [0f32; 16];
    let mut offset = 0f32;
    for (b, q) in row.values.chunks_exact(vb).enumerate() {
        let d = f16::from_bits(row.scales[b]).to_f32();
        let xb = &x[b * 32..b * 32 + 32];
        let mut s = [0f32; 16];
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                for i in 0..16 {
                    s[i] = f32::from(q[i] & 15) * xb[i] + f32::from(q[i] >> 4) * xb[i + 16];
                }
                offset += if format == BlockFormat::Q4_1 {
                    f16::from_bits(row.mins[b]).to_f32() * sums[b]
                } else {
                    -8.0 * d * sums[b]
                };
            }
            BlockFormat::Q8_0 => {
                for i in 0..16 {
                    s[i] = f32::from(q[i] as i8) * xb[i] + f32::from(q[i + 16] as i8) * xb[i + 16];
                }
            }
        }
        for i in 0..16 {
            acc[i] += d * s[i];
        }
    }
    acc.iter().sum::<f32>() + offset
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    fn check(t: GgmlDType, in_dim: usize) -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (40, in_dim), &dev)?;
        let q = QTensor::quantize(&w, t)?;
        let deq = q.dequantize(&dev)?;
        let fmt = BlockFormat::from_ggml(t).unwrap();
        let qw = QuantWeight::new(fmt, 40, in_dim, q.data()?.to_vec()).unwrap();
        // 1: the one-row kernel; the others: tiles of 16, 8, 4, 2 and 1 rows in mixes.
        for rows in [1, 2, 3, 8, 13, 16, 23, 33] {
            let x = Tensor::randn(0f32, 1., (rows, in_dim), &dev)?;
            let want = x.matmul(&deq.t()?)?;
            let got = qw.matmul_t(&x)?;
            let err = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-3, "{t:?} in {in_dim} rows {rows}: {err}");
            // The portable kernel agrees too.
            let xs = x.get(0)?.to_vec1::<f32>()?;
            let sums: Vec<f32> = xs.chunks_exact(32).map(|c| c.iter().sum()).collect();
            let nb = in_dim / 32;
            let row = Row {
                scales: &qw.scales[..nb],
                mins: if qw.mins.is_empty() {
                    &[]
                } else {
                    &qw.mins[..nb]
                },
                values: &qw.values[..nb * fmt.value_bytes()],
            };
            let g = dot_generic(fmt, &row, &xs, &sums);
            let w0 = want.get(0)?.get(0)?.to_scalar::<f32>()?;
            assert!((g - w0).abs() < 1e-3, "{t:?} generic: {g} vs {w0}");
        }
        Ok(())
    }

    #[test]
    fn kernels_equal_the_dequantized_f32_product() -> Result<()> {
        // 64: a partial group of scales; 576 = 18 blocks: one full group of 16 plus a tail.
        for in_dim in [64, 576, 1024] {
            check(GgmlDType::Q4_0, in_dim)?;
            check(GgmlDType::Q4_1, in_dim)?;
            check(GgmlDType::Q8_0, in_dim)?;
        }
        Ok(())
    }

    #[test]
    fn permuted_and_stacked_rows_stay_aligned() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 64), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let qw = QuantWeight::new(BlockFormat::Q4_1, 6, 64, q.data()?.to_vec()).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 64), &dev)?;
        let base = qw.matmul_t(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let perm = [5, 0, 3, 1, 4, 2];
        let p = qw
            .permute_rows(&perm)
            .matmul_t(&x)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (i, &r) in perm.iter().enumerate() {
            assert_eq!(p[i], base[r]);
        }
        let both = QuantWeight::concat_rows(&[&qw, &qw]).unwrap();
        let s = both.matmul_t(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&s[..6], &base[..]);
        assert_eq!(&s[6..], &base[..]);
        Ok(())
    }
}
