//! Text generation with a KV cache: greedy or sampled decoding, several prompts at once with left
//! padding, stop ids and stop strings, and streamed output.

use candle_core::Tensor;
use rand::distributions::{Distribution, WeightedIndex};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::model::{Decoder, Hooks};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

mod batch;

pub use batch::{DecodeBatch, Event, Request};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// Sampling temperature; `None` or 0 means greedy.
    pub temperature: Option<f64>,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` before sampling.
    pub top_p: Option<f64>,
    /// Hugging Face-style repetition penalty (1 = none) over prompt and generated tokens.
    pub repetition_penalty: f64,
    /// Seed of the sampler.
    pub seed: u64,
    /// Token ids that end a sequence (not included in the output text).
    pub stop_ids: Vec<u32>,
    /// Strings that end a sequence (the output is cut before them).
    pub stop_strings: Vec<String>,
    /// Also pass the hooks on every generated token (default: the prompt pass only, whose edits
    /// reach later tokens through the KV cache).
    pub hooks_on_generated: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: None,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
            hooks_on_generated: false,
        }
    }
}

/// One prompt's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Generated ids, without the stop id.
    pub ids: Vec<u32>,
    /// Their text (cut before a stop string).
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was produced.
    StopId,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` was reached, or the context of a model with learned positions is full.
    Length,
}

/// How the prompts of a batch were padded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddingLayout {
    /// Left padding of each prompt.
    pub left_pad: Vec<usize>,
    /// Padded prompt length.
    pub width: usize,
}

impl PaddingLayout {
    /// The layout of `prompts` left-padded to the longest.
    pub fn left(prompts: &[Vec<u32>]) -> Self {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            left_pad: prompts.iter().map(|p| width - p.len()).collect(),
            width,
        }
    }
}

/// Per-sequence streaming state: text emitted so far and whether it is done.
struct SeqState {
    ids: Vec<u32>,
    emitted: usize,
    text: String,
    finish: Option<FinishReason>,
}

/// A sampler over next-token logits.
pub struct Sampler {
    cfg: GenerationConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `cfg.seed`.
    pub fn new(cfg: &GenerationConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            rng: StdRng::seed_from_u64(cfg.seed),
        }
    }

    /// Picks the next token from `logits` given the tokens seen so far (for the penalty).
    pub fn pick(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let p = self.cfg.repetition_penalty as f32;
        if p != 1.0 {
            let mut ids = seen.to_vec();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        let temp = self.cfg.temperature.unwrap_or(0.0);
        if temp <= 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / temp as f32))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.cfg.top_k {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = self.cfg.top_p {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc as f64 >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        match WeightedIndex::new(&probs) {
            Ok(dist) => cand[dist.sample(&mut self.rng)].0,
            Err(_) => cand[0].0,
        }
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates continuations of `prompts` (token ids) with `hooks` applied to the prompt pass (and
/// to every generated token with `cfg.hooks_on_generated`). `on_text(i, delta)` receives each
/// prompt's new text as soon as it is final.
pub fn generate(
    model: &Decoder,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    hooks: &mut dyn Hooks,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generation>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidArgument(
            "cannot generate from an empty prompt".into(),
        ));
    }
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            tag: i as u64,
            prompt: p.clone(),
            cfg: cfg.clone(),
        })
        .collect();
    let mut batch = DecodeBatch::prefill(model, tokenizer, requests, hooks)?;
    if cfg.hooks_on_generated {
        batch = batch.with_fixed_rows();
    }
    let mut done: Vec<Option<Generation>> = vec![None; prompts.len()];
    while !batch.is_empty() {
        let decode_hooks: Option<&mut dyn Hooks> = if cfg.hooks_on_generated {
            Some(&mut *hooks)
        } else {
            None
        };
        batch.step(model, tokenizer, decode_hooks, &mut |event| match event {
            Event::Text { tag, text } => on_text(tag as usize, &text),
            Event::Done { tag, generation } => done[tag as usize] = Some(generation),
        })?;
    }
    Ok(done
        .into_iter()
        .map(|g| g.expect("every sequence ends with a Done event"))
        .collect())
}

/// Logits at the last column of `hidden` `[b, t, d]`, one host vector per row.
fn last_logits(model: &Decoder, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
    let logits = model.lm_head(&last)?.to_dtype(candle_core::DType::F32)?;
    Ok(logits.to_vec2::<f32>()?)
}

/// Records `tok` for one sequence, detects stops, and streams the text that became final.
fn advance(
    s: &mut SeqState,
    tok: u32,
    tokenizer: &Tokenizer,
    cfg: &GenerationConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<()> {
    if cfg.stop_ids.contains(&tok) {
        s.finish = Some(FinishReason::StopId);
        flush(s, on_text);
        return Ok(());
    }
    s.ids.push(tok);
    s.text = tokenizer.decode(&s.ids, true)?;
    if let Some(cut) = cfg
        .stop_strings
        .iter()
        .filter_map(|st| s.text.find(st.as_str()))
        .min()
    {
        s.text.truncate(cut);
        s.finish = Some(FinishReason::StopString);
        flush(s, on_text);
        return Ok(());
    }
    // Hold back an incomplete UTF-8 sequence and anything that may begin a stop string.
    let mut safe = s.text.len();
    while s.text[..safe].ends_with(PARTIAL) {
        safe -= PARTIAL.len_utf8();
    }
    for st in &cfg.stop_strings {
        for k in (1..st.len()).rev() {
            if st.is_char_boundary(k) && s.text[..safe].ends_with(&st[..k]) {
                safe = safe.min(s.text[..safe].len() - k);
            }
        }
    }
    if safe > s.emitted && s.text.is_char_boundary(safe) {
        on_text(&s.text[s.emitted..safe]);
        s.emitted = safe;
    }
    Ok(())
}

/// What the tokenizer's lossy decoding shows for the bytes of a character not yet complete.
const PARTIAL: char = '\u{FFFD}';

/// Cuts the text of a sequence stopped by the token limit back to its last whole character: the
/// limit can fall inside a multi-byte character (an emoji is often two or three tokens), whose
/// bytes so far decode as replacement characters. Those were held back from the stream, so
/// nothing already streamed is taken back.
fn drop_partial_char(s: &mut SeqState) {
    let whole = s.text.trim_end_matches(PARTIAL).len().max(s.emitted);
    s.text.truncate(whole);
}

/// Streams whatever text is still held back.
fn flush(s: &mut SeqState, on_text: &mut dyn FnMut(&str)) {
    if s.text.len() > s.emitted {
        on_text(&s.text[s.emitted..]);
        s.emitted = s.text.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_inside_a_character_drops_its_partial_bytes_only() {
        let state = |text: &str, emitted: usize| SeqState {
            ids: Vec::new(),
            emitted,
            text: text.into(),
            finish: Some(FinishReason::Length),
        };
        let mut s = state("🌍🌍\u{FFFD}\u{FFFD}", 8);
        drop_partial_char(&mut s);
        assert_eq!(s.text, "🌍🌍");
        // What was already streamed stays.
        let mut s = state("ok\u{FFFD}", 5);
        drop_partial_char(&mut s);
        assert_eq!(s.text, "ok\u{FFFD}");
        let mut s = state("🌍", 0);
        drop_partial_char(&mut s);
        assert_eq!(s.text, "🌍");
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let cfg = GenerationConfig {
            temperature: Some(5.0),
            top_k: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&cfg);
        for _ in 0..20 {
            assert_eq!(s.pick(&mut [0.0, 2.0, 1.0], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let cfg = GenerationConfig {
            repetition_penalty: 4.0,
            ..Default::default()
        };
        let mut s = Sampler::new(&cfg);
        assert_eq!(s.pick(&mut [1.0, 2.0, 0.0], &[1]), 0);
    }

    #[test]
    fn sampling_is_seeded() {
        let cfg = GenerationConfig {
            temperature: Some(1.0),
            seed: 7,
            ..Default::default()
        };
        let draw = || {
            let mut s = Sampler::new(&cfg);
            (0..32)
                .map(|_| s.pick(&mut [0.0, 0.1, 0.2, 0.3], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw());
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_p_keeps_the_head() {
        let cfg = GenerationConfig {
            temperature: Some(1.0),
            top_p: Some(0.5),
            ..Default::default()
        };
        let mut s = Sampler::new(&cfg);
        for _ in 0..20 {
            assert_eq!(s.pick(&mut [0.0, 10.0, 0.0], &[]), 1);
        }
    }
}
