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

/// One frozen pass over a set of examples, kept whole: every layer's keys and values at every
/// position, and the hidden states entering every layer (when they fit the budget; else the
/// layers asked for). Any [`PrefixCache`] of
/// these examples is then a view into it, so a sweep's trials with other start layers or first
/// positions need no further pass unless they start at a layer not recorded yet.
pub struct FrozenPass {
    /// Per example (`None` past the memory budget), its keys and values.
    kv: Vec<Option<KvCache>>,
    /// Per recorded start layer (> 0), per example, the states entering it `[1, T, d]`.
    hidden: std::collections::BTreeMap<usize, Vec<Option<Tensor>>>,
    budget_bytes: usize,
    /// Passes run over the examples.
    pub passes: usize,
    /// The distinct per-example keys of the cache sets served so far.
    served: std::collections::HashSet<Vec<(usize, usize)>>,
}

impl FrozenPass {
    /// Nothing recorded yet; at most `budget_bytes` of keys and values will be kept (the
    /// examples past it run in full).
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            kv: Vec::new(),
            hidden: Default::default(),
            budget_bytes,
            passes: 0,
            served: Default::default(),
        }
    }

    /// Distinct cache sets served (one per distinct start layer and first position of the
    /// adapters asked for), all views of this pass.
    pub fn sets_served(&self) -> usize {
        self.served.len()
    }

    /// Runs the frozen model over `examples` unless every layer of `layers` (start layers) is
    /// recorded already; then records those and the ones recorded before.
    fn ensure(&mut self, lm: &LanguageModel, examples: &[Example], layers: &[usize]) -> Result<()> {
        let missing = layers
            .iter()
            .any(|&l| l > 0 && !self.hidden.contains_key(&l));
        if !missing && self.passes > 0 {
            return Ok(());
        }
        let mut wanted: Vec<usize> = self.hidden.keys().copied().collect();
        wanted.extend(layers.iter().copied().filter(|&l| l > 0));
        let cfg = lm.decoder.config();
        let n_layers = cfg.num_layers;
        // Every layer's input when they all fit the budget beside the keys and values, so that
        // no later trial needs a pass of its own.
        let tokens: usize = examples.iter().map(Example::len).sum();
        let per_token = 4 * n_layers * (2 * cfg.num_kv_heads * cfg.head_dim + cfg.hidden_size);
        if tokens.saturating_mul(per_token) <= self.budget_bytes {
            wanted.extend(1..n_layers);
        }
        wanted.sort_unstable();
        wanted.dedup();
        let dev = lm.decoder.device();
        let (mut kv, mut used) = (Vec::with_capacity(examples.len()), 0usize);
        let mut hidden: std::collections::BTreeMap<usize, Vec<Option<Tensor>>> =
            wanted.iter().map(|&l| (l, Vec::new())).collect();
        for ex in examples {
            if used >= self.budget_bytes {
                kv.push(None);
                hidden.values_mut().for_each(|v| v.push(None));
                continue;
            }
            let sites = wanted
                .iter()
                .map(|&l| Site::new(l - 1, Component::BlockOutput));
            let mut rec = Recorder::new(sites);
            let mut cache = KvCache::new(n_layers);
            let t = Tensor::new(ex.ids().as_slice(), dev)?.unsqueeze(0)?;
            lm.decoder
                .forward(&ForwardInput::new(&t), &mut rec, Some(&mut cache))?;
            used += cache.elem_count() * 4;
            for (&l, v) in hidden.iter_mut() {
                let h = rec.states.remove(&Site::new(l - 1, Component::BlockOutput));
                used += h.as_ref().map_or(0, |h| h.elem_count() * 4);
                v.push(h);
            }
            kv.push(Some(cache));
        }
        self.kv = kv;
        self.hidden = hidden;
        self.passes += 1;
        Ok(())
    }

    /// The prefix caches of `examples` for `adapter`, as views of this pass (running it first
    /// when it lacks the adapter's start layer).
    pub fn caches(
        &mut self,
        lm: &LanguageModel,
        adapter: &Adapter,
        examples: &[Example],
    ) -> Result<PrefixCaches> {
        let keys = examples
            .iter()
            .map(|ex| PrefixCache::key(lm, adapter, ex))
            .collect::<Result<Vec<_>>>()?;
        let starts: Vec<usize> = keys.iter().map(|k| k.0).collect();
        self.ensure(lm, examples, &starts)?;
        self.served.insert(keys.clone());
        let n_layers = lm.decoder.config().num_layers;
        let mut out = Vec::with_capacity(examples.len());
        for (i, (ex, &(start_layer, p0))) in examples.iter().zip(&keys).enumerate() {
            let Some(kv) = &self.kv[i] else {
                out.push(None);
                continue;
            };
            let t = ex.len();
            let hidden = match start_layer {
                0 => None,
                l => match &self.hidden[&l][i] {
                    Some(h) => Some(h.narrow(1, p0, t - p0)?),
                    None => {
                        out.push(None);
                        continue;
                    }
                },
            };
            let layers = (0..n_layers)
                .map(|l| match (l >= start_layer && p0 > 0, kv.layer(l)) {
                    (true, Some((k, v))) => Ok(Some((k.narrow(2, 0, p0)?, v.narrow(2, 0, p0)?))),
                    _ => Ok(None),
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(Some(PrefixCache {
                p0,
                start_layer,
                hidden,
                kv: KvCache::from_layers(layers),
            }));
        }
        Ok(Arc::new(out))
    }
}
