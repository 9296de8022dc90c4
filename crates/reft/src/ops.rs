//! Tensor operations whose backward is what ReFT needs (SPEC §7, §8).
//!
//! * [`FrozenLinear`]: a linear layer whose weight is frozen. candle's matmul backward always
//!   computes the gradient of both operands; for a frozen weight that is wasted work as large as
//!   the forward itself. Here the product is computed without a graph, then re-attached to the
//!   input through a custom op whose backward is only `dL/dx = g · W`.
//! * Normalisation and softmax: candle's fused kernels record no backward and cut gradients
//!   silently. The model calls these helpers, which take the fused kernel when no gradient can
//!   flow (inference) and the composed, differentiable form otherwise.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use crate::cpu::ggml::QuantWeight;
use crate::Result;

/// A linear layer `y = x Wᵀ + b` whose parameters never receive gradients.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    quant: Option<std::sync::Arc<QuantWeight>>,
}

impl FrozenLinear {
    /// Wraps a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            quant: None,
        }
    }

    /// Adds quantized blocks of the same weight, used when no gradient can flow and few rows
    /// are multiplied (decoding).
    pub fn with_quant(mut self, quant: Option<QuantWeight>) -> Self {
        self.quant = quant.map(std::sync::Arc::new);
        self
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The quantized blocks of the weight, if kept.
    pub(crate) fn quant(&self) -> Option<&QuantWeight> {
        self.quant.as_deref()
    }

    /// Applies the layer to `x` of shape `[…, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has at least one dim");
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let fast = self.quant.as_ref().filter(|_| quant_eligible(x, rows));
        let y = match fast {
            Some(q) => q.matmul_t(&x2)?,
            None => x2.detach().matmul(&self.weight.t()?)?,
        };
        let y = if x.track_op() {
            x2.apply_op2(
                &y,
                InputGradOnly {
                    weight: self.weight.clone(),
                },
            )?
        } else {
            y
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = self.weight.dim(0)?;
        let y = y.reshape(out_dims)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Whether a product with `rows` rows of `x` may use quantized blocks: inference only (no
/// graph), few rows, f32 on the CPU.
fn quant_eligible(x: &Tensor, rows: usize) -> bool {
    !x.track_op()
        && crate::cpu::blocks_serve(rows)
        && x.dtype() == DType::F32
        && x.device().is_cpu()
}

/// Several frozen linears over the same input (q/k/v; gate/up). When their quantized blocks
/// can be used, one stacked matrix computes all of them in one parallel call, which halves the
/// thread hand-offs per decoded token; otherwise each runs on its own.
#[derive(Debug, Clone)]
pub struct FusedLinears {
    parts: Vec<FrozenLinear>,
    stacked: Option<std::sync::Arc<QuantWeight>>,
    /// The parts' weights stacked `[Σ out, in]` (each part's weight is a view into it, so
    /// stacking costs no memory), and their biases if all have one.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FusedLinears {
    /// Groups `parts` (at least one, all with the same input size); quantized blocks are
    /// stacked only if every part has blocks of one format.
    pub fn new(mut parts: Vec<FrozenLinear>) -> Result<Self> {
        let quants: Option<Vec<&QuantWeight>> = parts.iter().map(|p| p.quant.as_deref()).collect();
        let stacked = quants
            .and_then(|q| QuantWeight::concat_rows(&q))
            .map(std::sync::Arc::new);
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        // Stacked biases exist when any part has one (zeros stand in for the others).
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            let b = parts
                .iter()
                .map(|p| match &p.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(p.weight.dim(0)?, p.weight.dtype(), p.weight.device()),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        let mut start = 0;
        for p in &mut parts {
            let rows = p.weight.dim(0)?;
            p.weight = weight.narrow(0, start, rows)?;
            start += rows;
        }
        Ok(Self {
            parts,
            stacked,
            weight,
            bias,
        })
    }

    /// All parts' weights stacked, `[Σ out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// All parts' biases stacked, if every part has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The parts' quantized blocks stacked like [`weight`](Self::weight), if every part has
    /// blocks of one format.
    pub(crate) fn stacked_quant(&self) -> Option<&QuantWeight> {
        self.stacked.as_deref()
    }

    /// The parts.
    pub fn parts(&self) -> &[FrozenLinear] {
        &self.parts
    }

    /// Applies every part to `x` `[…, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has at least one dim");
        let rows = x.elem_count() / in_dim.max(1);
        let Some(stacked) = self.stacked.as_ref().filter(|_| quant_eligible(x, rows)) else {
            return self.parts.iter().map(|p| p.forward(x)).collect();
        };
        let y = stacked.matmul_t(&x.reshape((rows, in_dim))?)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let width = p.weight.dim(0)?;
            let mut part_dims = dims.clone();
            *part_dims.last_mut().expect("non-empty dims") = width;
            let t = y
                .narrow(1, start, width)?
                .contiguous()?
                .reshape(part_dims)?;
            out.push(match &p.bias {
                Some(b) => t.broadcast_add(b)?,
                None => t,
            });
            start += width;
        }
        Ok(out)
    }
}

/// Custom op `(x, y) ↦ y` where `y = x Wᵀ` was computed without a graph; its backward gives
/// `x` the gradient `g W` and `y` none, so no weight gradient is ever formed.
struct InputGradOnly {
    weight: Tensor,
}

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn slice<T: Clone>(v: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(v[a..b].to_vec()),
                None => candle_core::bail!("frozen-linear: product is not contiguous"),
            }
        }
        let out = match s2 {
            CpuStorage::F32(v) => CpuStorage::F32(slice(v, l2)?),
            CpuStorage::F64(v) => CpuStorage::F64(slice(v, l2)?),
            CpuStorage::F16(v) => CpuStorage::F16(slice(v, l2)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(slice(v, l2)?),
            _ => candle_core::bail!("frozen-linear: unsupported dtype"),
        };
        Ok((out, l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.weight)?), None))
    }
}

/// RMSNorm `x / sqrt(mean(x²) + eps) · w` over the last dimension, differentiable when `x`
/// carries a graph.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.track_op() && x.dtype() == DType::F32 && x.is_contiguous() {
        return Ok(candle_nn::ops::rms_norm(x, weight, eps as f32)?);
    }
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// LayerNorm `(x − mean) / sqrt(var + eps) · w + b` over the last dimension, composed of
/// differentiable ops (candle's fused kernel has no backward).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Softmax over the last dimension, differentiable when `x` carries a graph.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() && x.is_contiguous() {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_gives_input_gradient_only() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev)?;
        let lin = FrozenLinear::new(w.clone(), Some(Tensor::new(&[0.5f32, -0.5], &dev)?));
        let x = Var::new(&[[1f32, 0., -1.]], &dev)?;
        let y = lin.forward(x.as_tensor())?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![-1.5, -2.5]]);
        let grads = y.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("x gets a gradient");
        assert_eq!(gx.to_vec2::<f32>()?, vec![vec![5., 7., 9.]]);
        assert!(
            grads.get(&w).is_none(),
            "the frozen weight must get no gradient"
        );
        Ok(())
    }

    #[test]
    fn composed_and_fused_norms_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 8), &dev)?;
        let w = Tensor::randn(0f32, 1., 8, &dev)?;
        let fused = rms_norm(&x, &w, 1e-6)?;
        let v = Var::from_tensor(&x)?;
        let slow = rms_norm(v.as_tensor(), &w, 1e-6)?;
        let diff = (fused - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
