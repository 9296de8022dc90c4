//! AdamW with decoupled weight decay on every intervention parameter, learning-rate schedules
//! with warmup, and global-norm clipping (SPEC §5), with state that can be saved and restored
//! exactly.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// AdamW hyper-parameters (PyTorch's defaults for betas and epsilon).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied to every parameter).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables, as `torch.optim.AdamW`:
/// `p ← p − lr·wd·p; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
/// p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`.
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimiser for these variables with zeroed moments.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from gradients in `grads` (already clipped). Every
    /// variable must have a gradient: a missing one means the graph was cut.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let g = grads.get(var.as_tensor()).ok_or_else(|| {
                Error::InvalidArgument(format!("trainable tensor `{name}` received no gradient"))
            })?;
            let p = var.as_tensor();
            let p = if self.cfg.weight_decay != 0.0 {
                (p * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                p.clone()
            };
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + self.cfg.eps)?;
            let update = ((&self.m[i] / denom)? * (lr / bc1))?;
            var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// State for a checkpoint: `m.<name>`, `v.<name>`, and the step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::new();
        for (i, (n, _)) in self.vars.iter().enumerate() {
            out.push((format!("m.{n}"), self.m[i].clone()));
            out.push((format!("v.{n}"), self.v[i].clone()));
        }
        (out, self.step)
    }

    /// Restores [`state`](Self::state).
    pub fn restore(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, (n, var)) in self.vars.iter().enumerate() {
            for (slot, key) in [
                (&mut self.m[i], format!("m.{n}")),
                (&mut self.v[i], format!("v.{n}")),
            ] {
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::InvalidArgument(format!("optimiser state has no `{key}`"))
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::InvalidArgument(format!(
                        "optimiser state `{key}` has the wrong shape"
                    )));
                }
                *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear decay to zero (Hugging Face's default).
    Linear,
    /// Half-cosine decay to zero.
    Cosine,
    /// Constant.
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(Error::InvalidArgument(format!(
                "unknown schedule `{s}` (linear, cosine, constant)"
            ))),
        }
    }
}

impl Schedule {
    /// The multiplier of the peak rate at optimiser step `step` (0-based) of `total`, with
    /// `warmup` linear warmup steps — the same lambdas as `transformers`' schedulers.
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((total as f64 - step as f64)
                / (total.saturating_sub(warmup)).max(1) as f64)
                .max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Err(Error::InvalidArgument(format!("gradient norm is {norm}")));
    }
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two AdamW steps on p = [1, −2], g₁ = [0.5, −1], g₂ = [0.1, 0.3], lr 0.1, wd 0.01.
    /// Expected values from the formula in f64, which `torch.optim.AdamW` implements:
    /// step 1: m = 0.1g, v = 0.001g², m̂/(√v̂+ε) = sign(g)·(1 − ~1e-8) → p₁ = p·0.999 − 0.1·sign(g);
    /// step 2 follows the same recurrence (computed below by hand in f64).
    #[test]
    fn matches_the_pytorch_formula() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f64, -2.0], &dev)?;
        let mut opt = AdamW::new(
            vec![("p".into(), p.clone())],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.01,
                ..Default::default()
            },
        )?;
        let gs = [[0.5f64, -1.0], [0.1, 0.3]];
        let (mut pe, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (t, g) in gs.iter().enumerate() {
            let loss = (p.as_tensor() * Tensor::new(g, &dev)?)?.sum_all()?;
            let grads = loss.backward()?;
            opt.step(&grads, 0.1)?;
            let t = (t + 1) as i32;
            for k in 0..2 {
                pe[k] *= 1.0 - 0.1 * 0.01;
                m[k] = 0.9 * m[k] + 0.1 * g[k];
                v[k] = 0.999 * v[k] + 0.001 * g[k] * g[k];
                let denom = v[k].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                pe[k] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[k] / denom;
            }
        }
        let got = p.as_tensor().to_vec1::<f64>()?;
        // Literal values of the recurrence (computed in Python floats): p₂ = [0.81779690638, −1.85331714243].
        assert!(
            (got[0] - pe[0]).abs() < 1e-12 && (got[1] - pe[1]).abs() < 1e-12,
            "{got:?} vs {pe:?}"
        );
        assert!((got[0] - 0.8177969063826516).abs() < 1e-12, "{}", got[0]);
        assert!((got[1] - -1.8533171424282262).abs() < 1e-12, "{}", got[1]);
        Ok(())
    }

    #[test]
    fn schedules_follow_transformers() {
        assert_eq!(Schedule::Linear.factor(0, 100, 0), 1.0);
        assert!((Schedule::Linear.factor(99, 100, 0) - 0.01).abs() < 1e-12);
        assert_eq!(Schedule::Linear.factor(5, 100, 10), 0.5);
        assert!((Schedule::Cosine.factor(55, 100, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(50, 100, 10), 1.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::new(&[0.0f32, 0.0], &dev)?;
        let loss = (p.as_tensor() * Tensor::new(&[3.0f32, 4.0], &dev)?)?.sum_all()?;
        let mut grads = loss.backward()?;
        let vars = vec![("p".to_string(), p.clone())];
        let norm = clip_grad_norm(&mut grads, &vars, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let g = grads.get(p.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
        Ok(())
    }
}
