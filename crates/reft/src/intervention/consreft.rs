//! ConsReFT: `Φ(h) = h + (b − R h) R` — an input-independent target in a learned subspace (the
//! paper's memorisation kind).

use candle_core::Tensor;

use super::{get, r_spec, target_spec, Activation, Effective, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Consreft;

impl KindDef for Consreft {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        vec![r_spec(d, r), target_spec(r)]
    }

    fn delta(&self, h: &Tensor, p: &Effective, _: Activation) -> Result<Tensor> {
        let r = get(p, "R")?;
        let diff = h.matmul(&r.t()?)?.neg()?.broadcast_add(get(p, "b")?)?;
        Ok(diff.matmul(r)?)
    }
}
