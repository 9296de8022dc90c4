//! Summed cross-entropy of the LM head at chosen rows, as one op on the CPU.
//!
//! Why: the head is the largest product of a training step (`[rows, d] × [d, vocab]`), and as
//! candle ops the loss around it makes several passes over the `[rows, vocab]` logits (log-softmax,
//! gather, and their backward), each allocating tens of megabytes. Here the forward computes the
//! logits once, exponentiates them in place and returns the summed loss; the backward is one
//! product, `(softmax − onehot) · W = diag(1/Σ)·(exp · W) − W[targets]`, which never forms a
//! weight gradient. Normalising and subtracting on the `[rows, d]` product rather than on the
//! `[rows, vocab]` exponentials saves two passes over tens of megabytes per step.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::llama::Decoder;
use crate::cpu::math::{exp_shifted, f32s, mm, View};
use crate::{Error, Result};

struct HeadLoss {
    weight: Tensor,
    targets: Vec<u32>,
    /// `exp(logit − row max)` of each row, and each row's `1 / Σ exp`, kept by the forward
    /// for the backward.
    probs: Arc<Mutex<(Vec<f32>, Vec<f32>)>>,
    /// The decoder's spare buffer for it: `[rows, vocab]` is tens of megabytes, which the
    /// system allocator maps fresh (and the kernel zeroes page by page) on every step unless
    /// it is reused.
    spare: Arc<Mutex<Vec<f32>>>,
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("lm-head loss: contiguous f32 input expected")
        };
        let x = &x[a..b];
        let (guard, wl) = self.weight.storage_and_layout();
        let w = f32s(&guard, wl)?;
        let d = l.dims()[1];
        let n = self.targets.len();
        let vocab = w.len() / d;
        let mut probs = std::mem::take(&mut *self.spare.lock().expect("head-loss lock"));
        if probs.len() != n * vocab {
            probs = vec![0f32; n * vocab];
        }
        mm(
            &mut probs,
            vocab,
            View::rows(x, d),
            View::t(w, d),
            (n, vocab, d),
            false,
            true,
        );
        let (losses, inv_sums): (Vec<f64>, Vec<f32>) = probs
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let target = row[t as usize];
                let (max, sum) = exp_shifted(row);
                (sum.ln() + max as f64 - target as f64, (1.0 / sum) as f32)
            })
            .unzip();
        let loss: f64 = losses.iter().sum();
        *self.probs.lock().expect("head-loss lock") = (probs, inv_sums);
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let (exps, inv_sums) = std::mem::take(&mut *self.probs.lock().expect("head-loss lock"));
        let (guard, wl) = self.weight.storage_and_layout();
        let w = f32s(&guard, wl)?;
        let (n, d) = arg.dims2()?;
        let vocab = w.len() / d;
        if exps.len() != n * vocab || inv_sums.len() != n {
            candle_core::bail!("lm-head loss: backward before forward")
        }
        let mut dx = vec![0f32; n * d];
        mm(
            &mut dx,
            d,
            View::rows(&exps, vocab),
            View::rows(w, d),
            (n, d, vocab),
            false,
            true,
        );
        // Row r: g·(exp_r · W / Σ_r − W[t_r]).
        dx.par_chunks_mut(d)
            .zip(inv_sums.par_iter().zip(self.targets.par_iter()))
            .for_each(|(row, (&inv, &t))| {
                let wt = &w[t as usize * d..(t as usize + 1) * d];
                row.iter_mut()
                    .zip(wt)
                    .for_each(|(x, &wv)| *x = g * (*x * inv - wv));
            });
        *self.spare.lock().expect("head-loss lock") = exps;
        Ok(Some(Tensor::from_vec(dx, (n, d), arg.device())?))
    }
}

impl Decoder {
    /// Summed next-token cross-entropy of the LM head applied to `hidden` `[n, d]` (final
    /// normalised states) against `targets` (`n` token ids): a scalar, differentiable in
    /// `hidden`.
    pub fn head_loss(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let (n, _) = hidden.dims2()?;
        let vocab = self.config().vocab_size;
        if targets.len() != n || targets.iter().any(|&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "head loss: {n} rows need {n} target ids below {vocab}"
            )));
        }
        let weight = self.lm_head_weight();
        if self.fused_kernels_on() && hidden.dtype() == DType::F32 && weight.is_contiguous() {
            let op = HeadLoss {
                weight: weight.clone(),
                targets: targets.to_vec(),
                probs: Arc::new(Mutex::new((Vec::new(), Vec::new()))),
                spare: self.head_scratch().clone(),
            };
            return Ok(hidden.contiguous()?.apply_op1(op)?);
        }
        let logits = self.lm_head(hidden)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let t = Tensor::from_vec(targets.to_vec(), (n, 1), hidden.device())?;
        Ok(logp.gather(&t, 1)?.sum_all()?.neg()?)
    }
}
