//! LoReFT: `Φ(h) = h + (act(W h + b) − R h) R` — replace the projection of `h` on an
//! orthonormal subspace by a learned affine target.

use candle_core::Tensor;

use super::{affine, get, Activation, Effective, Init, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Loreft;

impl KindDef for Loreft {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        let bound = 1.0 / (d as f64).sqrt();
        vec![
            ParamSpec {
                name: "R",
                shape: vec![r, d],
                init: Init::Orthogonal,
            },
            ParamSpec {
                name: "W",
                shape: vec![r, d],
                init: Init::Uniform(bound),
            },
            ParamSpec {
                name: "b",
                shape: vec![r],
                init: Init::Uniform(bound),
            },
        ]
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let r = get(p, "R")?;
        let target = act.apply(&affine(h, get(p, "W")?, Some(get(p, "b")?))?)?;
        Ok((target - h.matmul(&r.t()?)?)?.matmul(r)?)
    }
}
