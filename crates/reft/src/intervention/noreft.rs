//! NoReFT: `Φ(h) = h + (act(W1 h + b1) − (W2 h + b2)) W2` — LoReFT without the orthogonality.

use candle_core::Tensor;

use super::{affine, get, linear_specs, Activation, Effective, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Noreft;

impl KindDef for Noreft {
    fn specs(&self, d: usize, r: usize, opts: &KindOptions) -> Vec<ParamSpec> {
        let mut s = linear_specs("W1", Some("b1"), d, r);
        s.extend(linear_specs("W2", opts.proj_bias.then_some("b2"), d, r));
        s
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let w2 = get(p, "W2")?;
        let target = act.apply(&affine(h, get(p, "W1")?, Some(get(p, "b1")?))?)?;
        let proj = affine(h, w2, p.get("b2"))?;
        Ok((target - proj)?.matmul(w2)?)
    }
}
