//! The running decode batch: the one decode loop behind `reft generate` and the server.
//!
//! Sequences are prefilled in groups (each group with its own hooks, so each request's adapter
//! edits only its own prompt) and then decode together, one token per sequence per step, from one
//! left-padded KV cache. A group that is prefilled while others decode joins the batch between
//! steps ([`DecodeBatch::merge`]); a finished or cancelled sequence leaves it at once, and padding
//! that no remaining sequence needs is dropped. Every sequence keeps its own positions, sampler
//! and stop rules, so what it generates does not depend on what it was batched with (up to the
//! summation order of batched products).

use candle_core::Tensor;

use super::{advance, drop_partial_char, flush, last_logits, FinishReason, Generation};
use super::{GenerationConfig, PaddingLayout, Sampler, SeqState};
use crate::model::llama::ForwardInput;
use crate::model::{Decoder, Hooks, KvCache, PrefixKv, PromptLayout};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A prompt to continue, with its own settings and a caller's tag that events carry.
#[derive(Debug, Clone)]
pub struct Request {
    /// Reported back with every event of this sequence.
    pub tag: u64,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub cfg: GenerationConfig,
}

/// One sequence of the batch.
struct Row {
    tag: u64,
    cfg: GenerationConfig,
    sampler: Sampler,
    /// Prompt and generated ids, for the repetition penalty.
    seen: Vec<u32>,
    state: SeqState,
    /// Position of the next token (real tokens so far).
    position: usize,
    /// New tokens this sequence may still produce.
    budget: usize,
    /// The next token's logits, from the last pass.
    logits: Vec<f32>,
    /// Ended, but kept in a batch with fixed rows.
    done: bool,
}

/// What a step produced for one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Text that became final.
    Text {
        /// The request's tag.
        tag: u64,
        /// The new text.
        text: String,
    },
    /// The sequence ended and left the batch.
    Done {
        /// The request's tag.
        tag: u64,
        /// Everything it generated, and why it ended.
        generation: Generation,
    },
}

/// Sequences decoding together.
pub struct DecodeBatch {
    rows: Vec<Row>,
    cache: KvCache,
    /// Per row, over the cached positions: 1 for a real token, 0 for padding.
    mask: Vec<Vec<u32>>,
    pad_id: u32,
    /// Ended sequences stay in place (decoding padding) instead of leaving: for hooks that
    /// act on generated tokens, which address rows and columns as they were prepared.
    fixed_rows: bool,
}

impl DecodeBatch {
    /// An empty batch for `model`.
    pub fn new(model: &Decoder, tokenizer: &Tokenizer) -> Self {
        Self {
            rows: Vec::new(),
            cache: KvCache::new(model.config().num_layers),
            mask: Vec::new(),
            pad_id: tokenizer
                .pad_id
                .or(tokenizer.eos_ids.first().copied())
                .unwrap_or(0),
            fixed_rows: false,
        }
    }

    /// Keeps ended sequences in place until all have ended (see [`DecodeBatch::step`]); a batch
    /// with fixed rows takes no new sequences.
    pub fn with_fixed_rows(mut self) -> Self {
        self.fixed_rows = true;
        self
    }

    /// Sequences still decoding.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no sequence is decoding.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The tags of the sequences still decoding, in batch order.
    pub fn tags(&self) -> Vec<u64> {
        self.rows.iter().map(|r| r.tag).collect()
    }

    /// Prefills `requests` as one left-padded pass with `hooks` (prepared here for their
    /// layout) and returns them as a batch ready to decode.
    pub fn prefill(
        model: &Decoder,
        tokenizer: &Tokenizer,
        requests: Vec<Request>,
        hooks: &mut dyn Hooks,
    ) -> Result<Self> {
        let none = vec![None; requests.len()];
        Self::prefill_reusing(model, tokenizer, requests, none, hooks)
    }

    /// [`prefill`](Self::prefill), where each request may start from the cached keys and
    /// values of its first positions (`reused[i]`, computed by the same model for the same
    /// tokens), so that only the rest of its prompt runs. `hooks` must edit no reused position:
    /// their edits would not reach the reused keys and values.
    ///
    /// Row `i` is laid out as `[padding][its reused prefix]` in the cache, then
    /// `[padding][the rest of its prompt]` in the pass, so that every row's prompt ends in the
    /// same column; the hooks see a prompt of the full length whose left padding is the row's
    /// two runs of padding together, which places every position past the prefix in its column.
    pub fn prefill_reusing(
        model: &Decoder,
        tokenizer: &Tokenizer,
        requests: Vec<Request>,
        reused: Vec<Option<PrefixKv>>,
        hooks: &mut dyn Hooks,
    ) -> Result<Self> {
        let mut batch = Self::new(model, tokenizer);
        if requests.is_empty() {
            return Ok(batch);
        }
        if requests.iter().any(|r| r.prompt.is_empty()) {
            return Err(Error::InvalidArgument(
                "cannot generate from an empty prompt".into(),
            ));
        }
        let limit = model.context_limit();
        if let (Some(n), Some(long)) = (limit, requests.iter().map(|r| r.prompt.len()).max()) {
            if long >= n {
                return Err(Error::InvalidArgument(format!(
                    "a prompt of {long} tokens leaves no room in the model's context of {n} positions"
                )));
            }
        }
        let cached: Vec<usize> = reused
            .iter()
            .map(|p| p.as_ref().map_or(0, |p| p.len))
            .collect();
        if requests
            .iter()
            .zip(&cached)
            .any(|(r, &c)| c >= r.prompt.len())
        {
            return Err(Error::InvalidArgument(
                "a reused prefix must leave at least one prompt token to run".into(),
            ));
        }
        let rest: Vec<Vec<u32>> = requests
            .iter()
            .zip(&cached)
            .map(|(r, &c)| r.prompt[c..].to_vec())
            .collect();
        let layout = PaddingLayout::left(&rest);
        let (b, width) = (rest.len(), layout.width);
        let past = cached.iter().copied().max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * width);
        let mut positions = Vec::with_capacity(b);
        let mut hook_pad = Vec::with_capacity(b);
        for ((p, &pad), &c) in rest.iter().zip(&layout.left_pad).zip(&cached) {
            ids.extend(std::iter::repeat_n(batch.pad_id, pad).chain(p.iter().copied()));
            let real = |j: usize| (j >= past - c && j < past) || j >= past + pad;
            batch
                .mask
                .push((0..past + width).map(|j| u32::from(real(j))).collect());
            positions.push(
                (0..width)
                    .map(|j| (c + j).saturating_sub(pad) as u32)
                    .collect(),
            );
            hook_pad.push(past - c + pad);
        }
        hooks.prepare(&PromptLayout {
            prompt_lens: requests.iter().map(|r| r.prompt.len()).collect(),
            left_pad: hook_pad,
        })?;
        if past > 0 {
            batch.cache = prefix_rows(model.config().num_layers, &reused, past)?;
        }
        let ids = Tensor::from_vec(ids, (b, width), model.device())?;
        let any_pad = past > 0 || layout.left_pad.iter().any(|&p| p > 0);
        let input = ForwardInput {
            input_ids: &ids,
            attention_mask: any_pad.then_some(batch.mask.as_slice()),
            position_ids: any_pad.then_some(positions.as_slice()),
            start: None,
        };
        let hidden = model.forward(&input, hooks, Some(&mut batch.cache))?;
        let logits = last_logits(model, &hidden)?;
        for (r, logits) in requests.into_iter().zip(logits) {
            let n = r.prompt.len();
            let budget = match limit {
                Some(limit) => r.cfg.max_new_tokens.min(limit - n),
                None => r.cfg.max_new_tokens,
            };
            batch.rows.push(Row {
                tag: r.tag,
                sampler: Sampler::new(&r.cfg),
                cfg: r.cfg,
                seen: r.prompt,
                state: SeqState {
                    ids: Vec::new(),
                    emitted: 0,
                    text: String::new(),
                    finish: None,
                },
                position: n,
                budget,
                logits,
                done: false,
            });
        }
        Ok(batch)
    }

    /// The keys and values of row `row`'s first `len` positions (real tokens only), copied out
    /// of the batch's cache; for caching a prompt prefix right after its prefill.
    pub fn prompt_kv(&self, row: usize, len: usize) -> Result<PrefixKv> {
        let columns: Vec<u32> = self.mask[row]
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0)
            .map(|(j, _)| j as u32)
            .take(len)
            .collect();
        if columns.len() < len {
            return Err(Error::InvalidArgument(format!(
                "row {row} holds {} positions, not {len}",
                columns.len()
            )));
        }
        let mut layers = Vec::with_capacity(self.cache.num_layers());
        let mut idx: Option<Tensor> = None;
        for l in 0..self.cache.num_layers() {
            let (k, v) = self.cache.layer(l).ok_or_else(|| {
                Error::InvalidArgument(format!("the batch's cache misses layer {l}"))
            })?;
            let idx = match &idx {
                Some(i) => i,
                None => idx.insert(Tensor::from_vec(columns.clone(), len, k.device())?),
            };
            let pick = |t: &Tensor| t.narrow(0, row, 1)?.contiguous()?.index_select(idx, 2);
            layers.push((pick(&k)?, pick(&v)?));
        }
        Ok(PrefixKv { len, layers })
    }

    /// Takes in the sequences of `other`, which decode with this batch's from the next step.
    pub fn merge(&mut self, mut other: DecodeBatch) -> Result<()> {
        if other.rows.is_empty() {
            return Ok(());
        }
        if self.fixed_rows || other.fixed_rows {
            return Err(Error::InvalidArgument(
                "a batch with fixed rows (hooks on generated tokens) takes no new sequences".into(),
            ));
        }
        if self.rows.is_empty() {
            *self = other;
            return Ok(());
        }
        let (mine, theirs) = (self.cache.len(), other.cache.len());
        if mine < theirs {
            self.cache.pad_left(theirs - mine)?;
            pad_mask(&mut self.mask, theirs - mine);
        } else {
            other.cache.pad_left(mine - theirs)?;
            pad_mask(&mut other.mask, mine - theirs);
        }
        self.cache.append_rows(other.cache)?;
        self.mask.append(&mut other.mask);
        self.rows.append(&mut other.rows);
        Ok(())
    }

    /// Ends the sequences tagged `tags` (a client went away); they leave without an event.
    pub fn cancel(&mut self, tags: &[u64]) -> Result<()> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&i| !tags.contains(&self.rows[i].tag))
            .collect();
        self.keep_rows(&keep)
    }

    /// One step: every sequence picks its next token from its pending logits; those that end
    /// leave the batch; the rest run one forward pass together (with `hooks` when
    /// `hooks_on_generated`, already prepared by the caller). Events go to `on_event`.
    pub fn step(
        &mut self,
        model: &Decoder,
        tokenizer: &Tokenizer,
        hooks: Option<&mut dyn Hooks>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let mut next = Vec::with_capacity(self.rows.len());
        let mut keep = Vec::with_capacity(self.rows.len());
        for (i, row) in self.rows.iter_mut().enumerate() {
            if row.done {
                keep.push(i);
                next.push(self.pad_id);
                continue;
            }
            let mut text = String::new();
            let mut sink = |t: &str| text.push_str(t);
            let mut tok = self.pad_id;
            if row.budget > 0 {
                tok = row.sampler.pick(&mut row.logits, &row.seen);
                row.seen.push(tok);
                advance(&mut row.state, tok, tokenizer, &row.cfg, &mut sink)?;
                row.budget -= 1;
            }
            if row.state.finish.is_none() && row.budget == 0 {
                row.state.finish = Some(FinishReason::Length);
                drop_partial_char(&mut row.state);
                flush(&mut row.state, &mut sink);
            }
            if !text.is_empty() {
                on_event(Event::Text { tag: row.tag, text });
            }
            match row.state.finish {
                Some(finish) => {
                    on_event(Event::Done {
                        tag: row.tag,
                        generation: Generation {
                            ids: std::mem::take(&mut row.state.ids),
                            text: std::mem::take(&mut row.state.text),
                            finish,
                        },
                    });
                    row.done = true;
                    if self.fixed_rows {
                        keep.push(i);
                        next.push(self.pad_id);
                    }
                }
                None => {
                    keep.push(i);
                    next.push(tok);
                }
            }
        }
        if self.rows.iter().all(|r| r.done) {
            return self.keep_rows(&[]);
        }
        self.keep_rows(&keep)?;
        for m in self.mask.iter_mut() {
            m.push(1);
        }
        let pos: Vec<Vec<u32>> = self.rows.iter().map(|r| vec![r.position as u32]).collect();
        let any_pad = self.mask.iter().any(|m| m.contains(&0));
        let b = self.rows.len();
        let ids = Tensor::from_vec(next, (b, 1), model.device())?;
        let input = ForwardInput {
            input_ids: &ids,
            attention_mask: any_pad.then_some(self.mask.as_slice()),
            position_ids: any_pad.then_some(pos.as_slice()),
            start: None,
        };
        let hidden = match hooks {
            Some(h) => model.forward(&input, h, Some(&mut self.cache))?,
            None => model.forward(&input, &mut crate::model::NoHooks, Some(&mut self.cache))?,
        };
        for (row, logits) in self.rows.iter_mut().zip(last_logits(model, &hidden)?) {
            row.position += 1;
            row.logits = logits;
        }
        Ok(())
    }

    /// Keeps rows `keep` (in order) and drops the leading padding no kept row needs.
    fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() == self.rows.len() {
            return Ok(());
        }
        if keep.is_empty() {
            self.rows.clear();
            self.mask.clear();
            self.cache = KvCache::new(self.cache.num_layers());
            return Ok(());
        }
        self.cache.select_rows(keep)?;
        let mut rows: Vec<Option<Row>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        self.rows = keep
            .iter()
            .map(|&i| rows[i].take().expect("each row kept once"))
            .collect();
        let mut mask = std::mem::take(&mut self.mask);
        self.mask = keep.iter().map(|&i| std::mem::take(&mut mask[i])).collect();
        let unused = self
            .mask
            .iter()
            .map(|m| m.iter().take_while(|&&x| x == 0).count())
            .min()
            .unwrap_or(0);
        if unused > 0 {
            self.cache.drop_leading(unused)?;
            for m in self.mask.iter_mut() {
                m.drain(..unused);
            }
        }
        Ok(())
    }
}

/// A cache of `past` positions per row holding each row's reused prefix right-aligned after
/// zeros (`None`: all zeros, masked as padding).
fn prefix_rows(num_layers: usize, reused: &[Option<PrefixKv>], past: usize) -> Result<KvCache> {
    let missing = |l: usize| Error::InvalidArgument(format!("a reused prefix misses layer {l}"));
    let proto = reused.iter().flatten().next().ok_or_else(|| missing(0))?;
    let mut layers = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        let (k0, _) = proto.layers.get(l).ok_or_else(|| missing(l))?;
        let (_, h, _, d) = k0.dims4()?;
        let (mut ks, mut vs) = (
            Vec::with_capacity(reused.len()),
            Vec::with_capacity(reused.len()),
        );
        for p in reused {
            match p {
                Some(p) => {
                    let (k, v) = p.layers.get(l).ok_or_else(|| missing(l))?;
                    ks.push(k.pad_with_zeros(2, past - p.len, 0)?);
                    vs.push(v.pad_with_zeros(2, past - p.len, 0)?);
                }
                None => {
                    let zeros = Tensor::zeros((1, h, past, d), k0.dtype(), k0.device())?;
                    ks.push(zeros.clone());
                    vs.push(zeros);
                }
            }
        }
        layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
    }
    Ok(KvCache::from_layers(layers))
}

/// Marks `n` new leading positions of every row as padding.
fn pad_mask(mask: &mut [Vec<u32>], n: usize) {
    for m in mask {
        m.splice(0..0, std::iter::repeat_n(0, n));
    }
}
