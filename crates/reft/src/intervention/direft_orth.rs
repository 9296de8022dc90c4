//! pyreft's `DireftIntervention`: `Φ(h) = h + act(W h + b) R` with orthonormal `R`.

use candle_core::Tensor;

use super::{
    affine, get, linear_specs, r_spec, Activation, Effective, KindDef, KindOptions, ParamSpec,
};
use crate::Result;

pub struct DireftOrth;

impl KindDef for DireftOrth {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        let mut s = vec![r_spec(d, r)];
        s.extend(linear_specs("W", Some("b"), d, r));
        s
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let z = act.apply(&affine(h, get(p, "W")?, Some(get(p, "b")?))?)?;
        Ok(z.matmul(get(p, "R")?)?)
    }
}
