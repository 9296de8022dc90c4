//! DiReFT (the paper's): `Φ(h) = h + act(W1 h + b1) W2` — a low-rank additive edit with neither
//! orthogonality nor a difference term.

use candle_core::Tensor;

use super::{affine, get, linear_specs, Activation, Effective, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Direft;

impl KindDef for Direft {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        let mut s = linear_specs("W1", Some("b1"), d, r);
        s.extend(linear_specs("W2", None, d, r));
        s
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let z = act.apply(&affine(h, get(p, "W1")?, Some(get(p, "b1")?))?)?;
        Ok(z.matmul(get(p, "W2")?)?)
    }
}
