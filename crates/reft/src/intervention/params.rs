//! Named intervention parameters: plain tensors, or an orthonormal `R` kept on its manifold by
//! the Householder parametrisation.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::orthogonal::{random_orthonormal, reflect_from};
use super::Effective;
use crate::{Error, Result};

/// How a parameter starts (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Orthonormal rows, as `torch.nn.init.orthogonal_` (for `R`).
    Orthogonal,
    /// Uniform in `±bound` (PyTorch's default for Linear weights and biases: `1/√fan_in`).
    Uniform(f64),
    /// Uniform in `[0, 1)` (`torch.rand`).
    UnitUniform,
    /// A constant.
    Constant(f64),
}

/// Declares one parameter of a kind.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// SPEC name (`R`, `W`, `b`, `W1`, …).
    pub name: &'static str,
    /// Shape (`R` is `[r, d]`).
    pub shape: Vec<usize>,
    /// Initialisation.
    pub init: Init,
}

/// One parameter's storage.
#[derive(Debug, Clone)]
pub enum Param {
    /// A tensor trained as is.
    Plain(Var),
    /// `R = reflect_from(raw, base)ᵀ`: `raw` `[d, r]` (starting at 0) is trained around the
    /// fixed `base` = `Rᵀ` at initialisation or load (see [`super::orthogonal`]).
    Orthogonal {
        /// The raw reflection matrix.
        raw: Var,
        /// `Rᵀ₀` `[d, r]`.
        base: Tensor,
        /// The exact `R` this was loaded from, with the raw matrix it mapped to: used while
        /// `raw` is unchanged, so that save → load → save and inference reproduce a stored `R`
        /// bit for bit instead of through a round trip of the parametrisation.
        loaded: Option<(Tensor, Tensor)>,
    },
}

/// An effective `R` used as a leaf in the model's graph, and the Householder graph behind it.
#[derive(Debug, Clone)]
pub struct OrthoLink {
    /// The leaf the model's forward used.
    pub leaf: Var,
    /// `R` computed from the raw matrix (carries the graph to it).
    pub graph: Tensor,
}

impl OrthoLink {
    /// `Σ graph ⊙ dL/dleaf`: its gradient w.r.t. the raw matrix is `dL/draw`.
    pub fn backward_term(
        &self,
        grads: &candle_core::backprop::GradStore,
    ) -> Result<Option<Tensor>> {
        Ok(match grads.get(self.leaf.as_tensor()) {
            Some(g) => Some((&self.graph * g)?.sum_all()?),
            None => None,
        })
    }
}

/// The parameters of one intervention, in declaration order.
#[derive(Debug, Clone)]
pub struct ParamSet {
    entries: Vec<(String, Param)>,
}

impl ParamSet {
    /// Initialises parameters from their specs with a seeded generator.
    pub fn init(specs: &[ParamSpec], seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut values = BTreeMap::new();
        for s in specs {
            let n: usize = s.shape.iter().product();
            let data: Vec<f64> = match s.init {
                Init::Orthogonal => {
                    let (r, d) = (s.shape[0], s.shape[1]);
                    let q = random_orthonormal(d, r, &mut rng); // [d, r]
                    (0..r * d).map(|k| q[(k % d) * r + k / d]).collect() // transpose to [r, d]
                }
                Init::Uniform(bound) => (0..n).map(|_| rng.gen_range(-bound..bound)).collect(),
                Init::UnitUniform => (0..n).map(|_| rng.gen_range(0.0..1.0)).collect(),
                Init::Constant(c) => vec![c; n],
            };
            values.insert(
                s.name.to_string(),
                Tensor::from_vec(data, s.shape.clone(), device)?,
            );
        }
        Self::from_tensors(specs, &values, dtype, device)
    }

    /// Parameters with given values (`R` materialised `[r, d]` with orthonormal rows).
    pub fn from_tensors(
        specs: &[ParamSpec],
        values: &BTreeMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut entries = Vec::with_capacity(specs.len());
        for s in specs {
            let t = values.get(s.name).ok_or_else(|| {
                Error::InvalidArgument(format!("intervention parameter `{}` is missing", s.name))
            })?;
            if t.dims() != s.shape.as_slice() {
                return Err(Error::InvalidArgument(format!(
                    "intervention parameter `{}` has shape {:?}, expected {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                )));
            }
            let param = if s.init == Init::Orthogonal {
                let (r, d) = (s.shape[0], s.shape[1]);
                let rows = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                let q: Vec<f64> = (0..d * r).map(|k| rows[k % r][k / r]).collect(); // Rᵀ [d, r]
                check_orthonormal(s.name, &q, d, r)?;
                let base = Tensor::from_vec(q, (d, r), device)?.to_dtype(dtype)?;
                let raw = Tensor::zeros((d, r), dtype, device)?;
                let exact = t.to_device(device)?.to_dtype(dtype)?;
                let raw_var = Var::from_tensor(&raw)?;
                Param::Orthogonal {
                    raw: raw_var,
                    base,
                    loaded: Some((raw, exact)),
                }
            } else {
                Param::Plain(Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)?)
            };
            entries.push((s.name.to_string(), param));
        }
        Ok(Self { entries })
    }

    /// Effective tensors by name; `R` computed from its parametrisation. `detached`: no graph.
    pub fn effective(&self, detached: bool) -> Result<Effective> {
        Ok(self.effective_linked(detached)?.0)
    }

    /// Like [`effective`](Self::effective); when not detached, each orthogonal `R` is returned
    /// as a fresh leaf variable, linked to the Householder graph that computed it. candle keeps
    /// gradients only for variables, so the model's backward stops at the leaf (giving
    /// `dL/dR`, the gradient w.r.t. the effective `R`), and [`OrthoLink::backward_term`] carries
    /// it on to the raw matrix in a second, tiny backward.
    pub fn effective_linked(&self, detached: bool) -> Result<(Effective, Vec<OrthoLink>)> {
        let mut out = BTreeMap::new();
        let mut links = Vec::new();
        for (name, p) in &self.entries {
            let t = match p {
                Param::Plain(v) if detached => v.as_tensor().detach(),
                Param::Plain(v) => v.as_tensor().clone(),
                Param::Orthogonal { raw, base, loaded } => match loaded {
                    Some((snap, exact)) if detached && same(raw.as_tensor(), snap)? => {
                        exact.clone()
                    }
                    _ if detached => reflect_from(&raw.as_tensor().detach(), base)?.t()?,
                    _ => {
                        let graph = reflect_from(raw.as_tensor(), base)?.t()?;
                        let leaf = Var::from_tensor(&graph.detach())?;
                        let t = leaf.as_tensor().clone();
                        links.push(OrthoLink { leaf, graph });
                        t
                    }
                },
            };
            out.insert(name.clone(), t);
        }
        Ok((out, links))
    }

    /// Trainable variables (`R` as `R.raw`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.entries
            .iter()
            .map(|(n, p)| match p {
                Param::Plain(v) => (n.clone(), v.clone()),
                Param::Orthogonal { raw, .. } => (format!("{n}.raw"), raw.clone()),
            })
            .collect()
    }

    /// The fixed bases of orthogonal parameters (`Rᵀ₀`), by name: with the raw variables they
    /// determine `R`, so checkpoints store both.
    pub fn bases(&self) -> Vec<(String, Tensor)> {
        self.entries
            .iter()
            .filter_map(|(n, p)| match p {
                Param::Orthogonal { base, .. } => Some((n.clone(), base.clone())),
                Param::Plain(_) => None,
            })
            .collect()
    }

    /// Replaces the base of orthogonal parameter `name` (restoring a checkpoint).
    pub fn set_base(&mut self, name: &str, t: &Tensor) -> Result<()> {
        for (n, p) in &mut self.entries {
            if let Param::Orthogonal { base, loaded, .. } = p {
                if n == name {
                    if t.dims() != base.dims() {
                        return Err(Error::InvalidArgument(format!(
                            "base of `{name}` has the wrong shape"
                        )));
                    }
                    *base = t.to_dtype(base.dtype())?.to_device(base.device())?;
                    *loaded = None;
                    return Ok(());
                }
            }
        }
        Err(Error::InvalidArgument(format!(
            "no orthogonal parameter `{name}`"
        )))
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Exact equality of two tensors of the same shape.
fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.ne(b)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        == 0.0)
}

fn check_orthonormal(name: &str, q: &[f64], d: usize, r: usize) -> Result<()> {
    let mut worst = 0f64;
    for i in 0..r {
        for j in 0..=i {
            let dot: f64 = (0..d).map(|k| q[k * r + i] * q[k * r + j]).sum();
            worst = worst.max((dot - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    if worst > 1e-3 {
        return Err(Error::InvalidArgument(format!(
            "`{name}` must have orthonormal rows (‖R Rᵀ − I‖max = {worst:.2e})"
        )));
    }
    Ok(())
}
