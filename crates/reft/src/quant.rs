//! Quantized weights for the inference-only path (SPEC §7: "the decode loop may use quantized
//! matmuls").
//!
//! Decoding one token reads every weight once, so it is bound by memory bandwidth: SmolLM2's
//! 537 MB of f32 weights cap it near 20 tokens/s on a 2-core machine that streams ~10 GB/s. A GGUF
//! file's own 4- or 8-bit blocks are 5–6× smaller. These kernels multiply them with *f32*
//! activations (no activation quantization, unlike llama.cpp), so the result equals the f32
//! product of the dequantized weights up to summation order: decoding stays faithful to the f32
//! model that prefill, training and the parity tests use.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

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

    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A `[out, in]` weight matrix stored as GGML blocks, row by row.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    format: BlockFormat,
    out_dim: usize,
    in_dim: usize,
    data: Vec<u8>,
}

impl QuantWeight {
    /// Wraps raw block bytes; `None` when the shape does not fit the format.
    pub fn new(format: BlockFormat, out_dim: usize, in_dim: usize, data: Vec<u8>) -> Option<Self> {
        let ok =
            in_dim.is_multiple_of(32) && data.len() == out_dim * in_dim / 32 * format.block_bytes();
        ok.then_some(Self {
            format,
            out_dim,
            in_dim,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.in_dim / 32 * self.format.block_bytes()
    }

    /// Reorders whole rows: row `i` of the result is row `perm[i]` of `self`.
    pub fn permute_rows(&self, perm: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &r in perm {
            data.extend_from_slice(&self.data[r * rb..(r + 1) * rb]);
        }
        Self {
            data,
            ..self.clone()
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x Wᵀ` for `x` `[rows, in]` (f32, CPU), giving `[rows, out]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        assert_eq!(in_dim, self.in_dim, "quantized matmul: input width");
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let nb = in_dim / 32;
        // Per-block sums of x, for the `m`/offset terms.
        let sums: Vec<f32> = xs.chunks_exact(32).map(|c| c.iter().sum()).collect();
        let rb = self.row_bytes();
        let mut out_t = vec![0f32; self.out_dim * rows];
        // Few, large tasks: each parallel call costs thread wake-ups.
        let chunk = (self.out_dim / (4 * rayon::current_num_threads())).max(16);
        out_t
            .par_chunks_mut(chunk * rows)
            .enumerate()
            .for_each(|(ci, dst)| {
                for (k, o) in dst.chunks_mut(rows).enumerate() {
                    let j = ci * chunk + k;
                    let w = &self.data[j * rb..(j + 1) * rb];
                    for (r, slot) in o.iter_mut().enumerate() {
                        let x = &xs[r * in_dim..(r + 1) * in_dim];
                        let s = &sums[r * nb..(r + 1) * nb];
                        *slot = dot(self.format, w, x, s);
                    }
                }
            });
        let t = Tensor::from_vec(out_t, (self.out_dim, rows), &Device::Cpu)?;
        Ok(if rows == 1 {
            t.reshape((1, self.out_dim))?
        } else {
            t.t()?.contiguous()?
        })
    }
}

/// Dot product of one quantized row with `x`, dispatched to the widest available SIMD.
fn dot(format: BlockFormat, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { dot_avx512(format, w, x, sums) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_avx2(format, w, x, sums) };
        }
    }
    dot_generic(format, w, x, sums)
}

/// AVX-512 kernel: 16 lanes per block half; the f16 scales are converted with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `b` indexes raw block pointers too
unsafe fn dot_avx512(format: BlockFormat, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    // SAFETY: the caller checked the CPU features; every pointer below stays inside `w` and `x`
    // (nb blocks of bb bytes, and 32 inputs per block).
    unsafe {
        use std::arch::x86_64::*;
        let bb = format.block_bytes();
        let nb = w.len() / bb;
        debug_assert!(x.len() >= nb * 32 && sums.len() >= nb);
        let half_to_f32 = |lo: u8, hi: u8| -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                u16::from_le_bytes([lo, hi]),
            ))))
        };
        let mut acc = _mm512_setzero_ps();
        let mut offset = 0f32;
        let low_nibbles = _mm_set1_epi8(0x0F);
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for b in 0..nb {
            let blk = wp.add(b * bb);
            let xb = xp.add(b * 32);
            let d = half_to_f32(*blk, *blk.add(1));
            let (lo, hi) = match format {
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let start = if format == BlockFormat::Q4_1 { 4 } else { 2 };
                    let q = _mm_loadu_si128(blk.add(start) as *const __m128i);
                    let lo = _mm_and_si128(q, low_nibbles);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low_nibbles);
                    offset += if format == BlockFormat::Q4_1 {
                        half_to_f32(*blk.add(2), *blk.add(3)) * sums[b]
                    } else {
                        -8.0 * d * sums[b]
                    };
                    (_mm512_cvtepu8_epi32(lo), _mm512_cvtepu8_epi32(hi))
                }
                BlockFormat::Q8_0 => {
                    let lo = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let hi = _mm_loadu_si128(blk.add(18) as *const __m128i);
                    (_mm512_cvtepi8_epi32(lo), _mm512_cvtepi8_epi32(hi))
                }
            };
            let s = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), _mm512_loadu_ps(xb));
            let s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_loadu_ps(xb.add(16)), s);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
        }
        _mm512_reduce_add_ps(acc) + offset
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(format: BlockFormat, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    dot_generic(format, w, x, sums)
}

/// Plain code written so that the compiler vectorises it: 16 independent lanes per block.
#[inline(always)]
fn dot_generic(format: BlockFormat, w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut offset = 0f32;
    let bb = format.block_bytes();
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let xb: &[f32; 32] = x[b * 32..b * 32 + 32].try_into().expect("32-wide block");
        let mut s = [0f32; 16];
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let start = if format == BlockFormat::Q4_1 { 4 } else { 2 };
                let qs: &[u8; 16] = blk[start..start + 16].try_into().expect("16 bytes");
                for i in 0..16 {
                    s[i] = f32::from(qs[i] & 15) * xb[i] + f32::from(qs[i] >> 4) * xb[i + 16];
                }
                offset += if format == BlockFormat::Q4_1 {
                    f16::from_le_bytes([blk[2], blk[3]]).to_f32() * sums[b]
                } else {
                    -8.0 * d * sums[b]
                };
            }
            BlockFormat::Q8_0 => {
                let qs: &[u8; 32] = blk[2..34].try_into().expect("32 bytes");
                for i in 0..16 {
                    s[i] =
                        f32::from(qs[i] as i8) * xb[i] + f32::from(qs[i + 16] as i8) * xb[i + 16];
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

    fn check(t: GgmlDType) -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (40, 64), &dev)?;
        let q = QTensor::quantize(&w, t)?;
        let deq = q.dequantize(&dev)?;
        let fmt = BlockFormat::from_ggml(t).unwrap();
        let qw = QuantWeight::new(fmt, 40, 64, q.data()?.to_vec()).unwrap();
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1., (rows, 64), &dev)?;
            let want = x.matmul(&deq.t()?)?;
            let got = qw.matmul_t(&x)?;
            let err = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "{t:?} rows {rows}: {err}");
        }
        Ok(())
    }

    #[test]
    fn kernels_equal_the_dequantized_f32_product() -> Result<()> {
        check(GgmlDType::Q4_0)?;
        check(GgmlDType::Q4_1)?;
        check(GgmlDType::Q8_0)
    }
}
