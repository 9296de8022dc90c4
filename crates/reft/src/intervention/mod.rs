//! Interventions Φ (SPEC §2): small trainable functions that edit hidden-state rows.
//!
//! Every kind is one file implementing [`KindDef`]: the parameters it needs (names and shapes as
//! in the SPEC, with their initialisation) and its edit `Φ(h) − h`. [`Intervention`] wraps a kind
//! with its parameters, activation and dropout, so the rest of the crate never matches on kinds.

mod consreft;
mod direft;
mod direft_orth;
mod lobireft;
mod loreft;
mod noreft;
pub mod orthogonal;
mod params;
mod red;
mod steer;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use params::{Init, OrthoLink, Param, ParamSet, ParamSpec};

/// Effective parameter tensors by SPEC name (`R` materialised `[r, d]`).
pub type Effective = BTreeMap<String, Tensor>;

/// The intervention kinds of SPEC §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `h + (act(W h + b) − R h) R`
    Loreft,
    /// `h + (act(W1 h + b1) − (W2 h + b2)) W2`
    Noreft,
    /// `h + act(W1 h + b1) W2` (the paper's DiReFT)
    Direft,
    /// `h + act(W h + b) R` (pyreft's `DireftIntervention`)
    DireftOrth,
    /// `h + (b − R h) R`
    Consreft,
    /// `h + b R`
    Lobireft,
    /// `scale ⊙ h + bias`
    Red,
    /// `h + vector`
    Steer,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 8] = [
        Kind::Loreft,
        Kind::Noreft,
        Kind::Direft,
        Kind::DireftOrth,
        Kind::Consreft,
        Kind::Lobireft,
        Kind::Red,
        Kind::Steer,
    ];

    /// The name used in configs, files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Loreft => "loreft",
            Kind::Noreft => "noreft",
            Kind::Direft => "direft",
            Kind::DireftOrth => "direft_orth",
            Kind::Consreft => "consreft",
            Kind::Lobireft => "lobireft",
            Kind::Red => "red",
            Kind::Steer => "steer",
        }
    }

    fn def(self) -> &'static dyn KindDef {
        match self {
            Kind::Loreft => &loreft::Loreft,
            Kind::Noreft => &noreft::Noreft,
            Kind::Direft => &direft::Direft,
            Kind::DireftOrth => &direft_orth::DireftOrth,
            Kind::Consreft => &consreft::Consreft,
            Kind::Lobireft => &lobireft::Lobireft,
            Kind::Red => &red::Red,
            Kind::Steer => &steer::Steer,
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown intervention kind `{s}` ({})",
                    names.join(", ")
                ))
            })
    }
}

/// The optional activation inside an intervention (identity by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    #[default]
    Linear,
    /// ReLU.
    Relu,
    /// GELU (exact, erf-based, as PyTorch's default).
    Gelu,
    /// SiLU.
    Silu,
    /// tanh.
    Tanh,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Linear => x.clone(),
            Activation::Relu => x.relu()?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::Silu => x.silu()?,
            Activation::Tanh => x.tanh()?,
        })
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            Error::InvalidArgument(format!(
                "unknown activation `{s}` (linear, relu, gelu, silu, tanh)"
            ))
        })
    }
}

/// What makes one kind: its parameters and its edit.
pub trait KindDef: Send + Sync {
    /// Parameters for hidden size `d` and rank `r`, in SPEC names and shapes.
    fn specs(&self, d: usize, r: usize, opts: &KindOptions) -> Vec<ParamSpec>;
    /// `Φ(h) − h` for rows `h` `[n, d]`.
    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor>;
}

/// Kind-specific switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindOptions {
    /// NoReFT: whether the projection `W2` has a bias `b2`.
    pub proj_bias: bool,
}

impl Default for KindOptions {
    fn default() -> Self {
        Self { proj_bias: true }
    }
}

/// The shape of one intervention: everything but its parameter values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InterventionShape {
    /// The kind.
    pub kind: Kind,
    /// Hidden size `d`.
    pub dim: usize,
    /// Rank `r` (ignored by `red` and `steer`).
    pub rank: usize,
    /// Activation.
    pub act: Activation,
    /// Dropout on the edit `Φ(h) − h`, training only.
    pub dropout: f64,
    /// Kind-specific switches.
    pub options: KindOptions,
}

/// One intervention: a kind with its parameters.
pub struct Intervention {
    shape: InterventionShape,
    params: ParamSet,
}

impl std::fmt::Debug for Intervention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intervention")
            .field("shape", &self.shape)
            .finish()
    }
}

impl Intervention {
    /// A freshly initialised intervention (SPEC §2 initialisation, reproducible from `seed`).
    pub fn init(
        shape: InterventionShape,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let specs = shape
            .kind
            .def()
            .specs(shape.dim, shape.rank, &shape.options);
        let params = ParamSet::init(&specs, seed, dtype, device)?;
        Ok(Self { shape, params })
    }

    /// An intervention with given parameter values (SPEC names, `R` materialised `[r, d]`);
    /// every shape is checked.
    pub fn from_tensors(
        shape: InterventionShape,
        tensors: &BTreeMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let specs = shape
            .kind
            .def()
            .specs(shape.dim, shape.rank, &shape.options);
        let params = ParamSet::from_tensors(&specs, tensors, dtype, device)?;
        Ok(Self { shape, params })
    }

    /// Kind, sizes and switches.
    pub fn shape(&self) -> &InterventionShape {
        &self.shape
    }

    /// The parameters.
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// Trainable variables, by name (`R` appears as its raw Householder matrix `R.raw`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.params.vars()
    }

    /// Mutable parameters (restoring checkpoints).
    pub fn params_mut(&mut self) -> &mut ParamSet {
        &mut self.params
    }

    /// Number of trainable scalars, counted as pyreft counts them (`R` as `d × r`).
    pub fn num_parameters(&self) -> usize {
        self.params.num_parameters()
    }

    /// Effective parameter tensors for one forward pass; `detached` for inference (no graph).
    pub fn effective(&self, detached: bool) -> Result<Effective> {
        self.params.effective(detached)
    }

    /// Effective parameters plus the links that carry `R`'s gradient to its raw matrix (see
    /// [`ParamSet::effective_linked`]).
    pub fn effective_linked(&self, detached: bool) -> Result<(Effective, Vec<OrthoLink>)> {
        self.params.effective_linked(detached)
    }

    /// `Φ(h)` for rows `h` `[n, d]` given [`effective`](Self::effective) parameters; dropout on
    /// the edit when `train` is set.
    pub fn apply(&self, h: &Tensor, p: &Effective, train: bool) -> Result<Tensor> {
        let edit = self.shape.kind.def().delta(h, p, self.shape.act)?;
        let edit = if train && self.shape.dropout > 0.0 {
            candle_nn::ops::dropout(&edit, self.shape.dropout as f32)?
        } else {
            edit
        };
        Ok((h + edit)?)
    }
}

/// The orthonormal `R` `[r, d]` (shared by every kind with a learned subspace).
fn r_spec(d: usize, r: usize) -> ParamSpec {
    ParamSpec {
        name: "R",
        shape: vec![r, d],
        init: Init::Orthogonal,
    }
}

/// A PyTorch-initialised `nn.Linear(d, r)`: weight `[r, d]` and optional bias `[r]`, both
/// uniform in `±1/√d`.
fn linear_specs(
    weight: &'static str,
    bias: Option<&'static str>,
    d: usize,
    r: usize,
) -> Vec<ParamSpec> {
    let bound = 1.0 / (d as f64).sqrt();
    let mut v = vec![ParamSpec {
        name: weight,
        shape: vec![r, d],
        init: Init::Uniform(bound),
    }];
    if let Some(b) = bias {
        v.push(ParamSpec {
            name: b,
            shape: vec![r],
            init: Init::Uniform(bound),
        });
    }
    v
}

/// A learned target `b` `[r]`, uniform in `[0, 1)` as `torch.rand`.
fn target_spec(r: usize) -> ParamSpec {
    ParamSpec {
        name: "b",
        shape: vec![r],
        init: Init::UnitUniform,
    }
}

/// `x Wᵀ + b` for rows `x` `[n, d]`, `W` `[r, d]`, `b` `[r]`.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A named effective parameter, or an error naming it.
fn get<'a>(p: &'a Effective, name: &str) -> Result<&'a Tensor> {
    p.get(name)
        .ok_or_else(|| Error::InvalidArgument(format!("missing intervention parameter `{name}`")))
}
