//! LoReFT: `Φ(h) = h + (act(W h + b) − R h) R` — replace the projection of `h` on an
//! orthonormal subspace by a learned affine target.

use candle_core::Tensor;

use super::{
    affine, get, linear_specs, r_spec, Activation, Effective, KindDef, KindOptions, ParamSpec,
};
use crate::Result;

pub struct Loreft;

impl KindDef for Loreft {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        let mut s = vec![r_spec(d, r)];
        s.extend(linear_specs("W", Some("b"), d, r));
        s
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let r = get(p, "R")?;
        let target = act.apply(&affine(h, get(p, "W")?, Some(get(p, "b")?))?)?;
        Ok((target - h.matmul(&r.t()?)?)?.matmul(r)?)
    }
}
