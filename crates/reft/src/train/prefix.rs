//! The frozen prefix of one training example, computed once (SPEC §7).
//!
//! Nothing below the start layer depends on the adapter, and in a causal LM nothing at
//! positions before the first edited one does either. So each step needs only: the hidden states
//! entering the start layer at positions ≥ `p0`, and the keys/values of positions < `p0` at the
//! layers from the start layer up.

use std::sync::Arc;

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

/// The frozen prefixes of a training set (`None` for examples past the memory budget), shared
/// by every trainer whose adapter has the same [`PrefixCache::key`] on each example: a sweep's
/// trials that start at the same layer and position.
pub type PrefixCaches = Arc<Vec<Option<PrefixCache>>>;

impl PrefixCache {
    /// `(start layer, first recomputed position)` of `adapter` on `ex`: what the cache holds
    /// depends on nothing else, so adapters with equal keys share it.
    pub fn key(lm: &LanguageModel, adapter: &Adapter, ex: &Example) -> Result<(usize, usize)> {
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
        Ok((start_layer, p0))
    }

    /// The caches of `examples` for `adapter`, in order, until `budget_bytes` are held (the
    /// rest run in full).
    pub fn build_all(
        lm: &LanguageModel,
        adapter: &Adapter,
        examples: &[Example],
        budget_bytes: usize,
    ) -> Result<PrefixCaches> {
        let mut caches = Vec::with_capacity(examples.len());
        let mut used = 0usize;
        for ex in examples {
            let c = if used < budget_bytes {
                let c = Self::build(lm, adapter, ex)?;
                used += c.bytes();
                Some(c)
            } else {
                None
            };
            caches.push(c);
        }
        Ok(Arc::new(caches))
    }

    /// Runs the frozen model once over the example.
    pub fn build(lm: &LanguageModel, adapter: &Adapter, ex: &Example) -> Result<Self> {
        let cfg = lm.decoder.config();
        let (start_layer, p0) = Self::key(lm, adapter, ex)?;
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
