//! LoBiReFT: `Φ(h) = h + b R` — a learned bias inside a learned subspace.

use candle_core::Tensor;

use super::{get, r_spec, target_spec, Activation, Effective, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Lobireft;

impl KindDef for Lobireft {
    fn specs(&self, d: usize, r: usize, _: &KindOptions) -> Vec<ParamSpec> {
        vec![r_spec(d, r), target_spec(r)]
    }

    fn delta(&self, h: &Tensor, p: &Effective, _: Activation) -> Result<Tensor> {
        let shift = get(p, "b")?.unsqueeze(0)?.matmul(get(p, "R")?)?; // [1, d]
        Ok(shift.broadcast_as(h.shape())?.contiguous()?)
    }
}
