//! RED: `Φ(h) = scale ⊙ h + bias` — a per-dimension rescaling and shift of the whole state.

use candle_core::Tensor;

use super::{get, Activation, Effective, Init, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Red;

impl KindDef for Red {
    fn specs(&self, d: usize, _: usize, _: &KindOptions) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "scale",
                shape: vec![d],
                init: Init::Constant(1.0),
            },
            ParamSpec {
                name: "bias",
                shape: vec![d],
                init: Init::Constant(0.0),
            },
        ]
    }

    fn delta(&self, h: &Tensor, p: &Effective, _: Activation) -> Result<Tensor> {
        let scaled = h
            .broadcast_mul(get(p, "scale")?)?
            .broadcast_add(get(p, "bias")?)?;
        Ok((scaled - h)?)
    }
}
