//! Steering vector: `Φ(h) = h + vector` (activation addition).

use candle_core::Tensor;

use super::{get, Activation, Effective, Init, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Steer;

impl KindDef for Steer {
    fn specs(&self, d: usize, _: usize, _: &KindOptions) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "vector",
            shape: vec![d],
            init: Init::Constant(0.0),
        }]
    }

    fn delta(&self, h: &Tensor, p: &Effective, _: Activation) -> Result<Tensor> {
        Ok(get(p, "vector")?.broadcast_as(h.shape())?.contiguous()?)
    }
}
