//! The frozen prefix of one training example, computed once (SPEC §7).
//!
//! Nothing below the start layer depends on the adapter, and in a causal LM nothing at
//! positions before the first edited one does either. So each step needs only: the hidden states
//! entering the start layer at positions ≥ `p0`, and the keys/values of positions < `p0` at the
//! layers from the start layer up.

use candle_core::Tensor;

use crate::adapter::Adapter;
use crate::data::Example;
use crate::load::LanguageModel;
use crate::model::llama::ForwardInput;
use crate::model::{Component, KvCache, Recorder, Site};
use crate::Result;

/// One example's cached frozen computation.
pub struct PrefixCache {
    /// First position recomputed each step.
    pub p0: usize,
    /// Layer at whose input each step starts.
    pub start_layer: usize,
    /// Hidden states entering `start_layer` at positions `p0..` (`None` when it is layer 0).
    pub hidden: Option<Tensor>,
    /// Keys/values of positions `..p0`.
    pub kv: KvCache,
}

impl PrefixCache {
    /// Runs the frozen model once over the example.
    pub fn build(lm: &LanguageModel, adapter: &Adapter, ex: &Example) -> Result<Self> {
        let cfg = lm.decoder.config();
        let p = ex.prompt_ids.len();
        let start_layer = adapter
            .config()
            .interventions
            .iter()
            .map(|c| {
                if c.component == Component::BlockOutput {
                    c.layer + 1
                } else {
                    c.layer
                }
            })
            .min()
            .unwrap_or(0)
            .min(cfg.num_layers);
        let mut p0 = p - 1; // the first labelled position's row must be recomputed
        for i in 0..adapter.interventions().len() {
            if let Some(&first) = adapter.positions_of(i, p)?.first() {
                p0 = p0.min(first);
            }
        }
        let ids = ex.ids();
        let dev = lm.decoder.device();
        let t = Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?;
        let site = (start_layer > 0).then(|| Site::new(start_layer - 1, Component::BlockOutput));
        let mut rec = Recorder::new(site);
        let mut kv = KvCache::new(cfg.num_layers);
        lm.decoder
            .forward(&ForwardInput::new(&t), &mut rec, Some(&mut kv))?;
        let kv = if p0 == 0 {
            KvCache::new(cfg.num_layers)
        } else {
            kv.truncate(p0)?;
            kv
        };
        let hidden = match site {
            Some(s) => Some(rec.states[&s].narrow(1, p0, ids.len() - p0)?.contiguous()?),
            None => None,
        };
        Ok(Self {
            p0,
            start_layer,
            hidden,
            kv,
        })
    }

    /// Approximate memory held.
    pub fn bytes(&self) -> usize {
        let h = self.hidden.as_ref().map_or(0, |h| h.elem_count() * 4);
        h + self.kv.elem_count() * 4
    }
}
