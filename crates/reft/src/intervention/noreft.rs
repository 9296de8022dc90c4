//! NoReFT: `Φ(h) = h + (act(W1 h + b1) − (W2 h + b2)) W2` — LoReFT without the orthogonality.

use candle_core::Tensor;

use super::{affine, get, Activation, Effective, Init, KindDef, KindOptions, ParamSpec};
use crate::Result;

pub struct Noreft;

impl KindDef for Noreft {
    fn specs(&self, d: usize, r: usize, opts: &KindOptions) -> Vec<ParamSpec> {
        let bound = 1.0 / (d as f64).sqrt();
        let mut s = vec![
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
        ];
        if opts.proj_bias {
            s.push(ParamSpec {
                name: "b2",
                shape: vec![r],
                init: Init::Uniform(bound),
            });
        }
        s
    }

    fn delta(&self, h: &Tensor, p: &Effective, act: Activation) -> Result<Tensor> {
        let w2 = get(p, "W2")?;
        let target = act.apply(&affine(h, get(p, "W1")?, Some(get(p, "b1")?))?)?;
        let proj = affine(h, w2, p.get("b2"))?;
        Ok((target - proj)?.matmul(w2)?)
    }
}
