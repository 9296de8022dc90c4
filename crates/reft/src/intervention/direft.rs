//! DiReFT (the paper's): `Φ(h) = h + act(W1 h + b1) W2` — a low-rank additive edit with neither
//! orthogonality nor a difference term.

use candle_core::Tensor;

use super::{affine, get, Activation, Effective, Init, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Direft;

impl KindDef for Direft {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        let bound = 1.0 / (d as f64).sqrt();
        vec![
            ParamSpec {
                name: "W1",
                shape: vec![r, d],
                init: Init::Uniform(bound),
            },
            ParamSpec {
                name: "b1",
                shape: vec![r],
                init: Init::Uniform(bound),
            },
            ParamSpec {
                name: "W2",
                shape: vec![r, d],
                init: Init::Uniform(bound),
            },
        ]
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let z = act.apply(&affine(h, get(p, "W1")?, Some(get(p, "b1")?))?)?;
        Ok(z.matmul(get(p, "W2")?)?)
    }
}
