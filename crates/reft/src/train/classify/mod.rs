//! Sequence classification with a frozen encoder (SPEC §5): interventions and a trainable head
//! are trained together. The head ([`Head`]: mean pooling, BERT pooler or RoBERTa style, in
//! `head.rs`) and the problem ([`Problem`]: single-label cross-entropy, regression MSE or
//! multi-label BCE, in `problem.rs`) are data, so training and prediction here are one path for
//! every combination. With no interventions and the mean head this is exactly a (softmax)
//! logistic-regression probe on frozen mean-pooled embeddings, the baseline ReFT classification
//! is compared with.

mod head;
mod problem;

pub use head::{Head, HeadFile, HeadKind, HeadSpec};
pub use problem::{bce_with_logits, cross_entropy, mse, score, Labels, Predictions, Problem};

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::adapter::Adapter;
use crate::model::bert::Encoder;
use crate::model::{NoHooks, PromptLayout};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Classification training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// AdamW settings (learning rate of both the interventions and the head).
    pub optim: AdamWConfig,
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Seed of the data order and of the head's dropout masks (the head's initialisation has
    /// its own seed, given when it is built).
    pub seed: u64,
    /// Longest input in tokens (longer ones are cut, keeping `[SEP]` last).
    pub max_length: usize,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            optim: AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.0,
                ..Default::default()
            },
            max_grad_norm: 1.0,
            seed: 42,
            max_length: 128,
        }
    }
}

/// What is classified: single texts, or text pairs (`second[i]` goes with `texts[i]`).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The (first) texts.
    pub texts: &'a [&'a str],
    /// The second texts of pairs, as many as `texts`.
    pub second: Option<&'a [&'a str]>,
}

impl<'a> Inputs<'a> {
    /// Single texts.
    pub fn single(texts: &'a [&'a str]) -> Self {
        Self {
            texts,
            second: None,
        }
    }

    /// Text pairs.
    pub fn pairs(texts: &'a [&'a str], second: &'a [&'a str]) -> Self {
        Self {
            texts,
            second: Some(second),
        }
    }

    /// An error when there are second texts, but not as many as texts.
    fn check_pairs(&self) -> Result<()> {
        match self.second {
            Some(p) if p.len() != self.texts.len() => Err(Error::InvalidArgument(format!(
                "{} texts and {} second texts: need the same number",
                self.texts.len(),
                p.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// Tokenised, padded batch: ids `[b, t]`, token types `[b, t]`, mask rows and lengths. With
/// pairs, each text is encoded with its partner (`[CLS] a [SEP] b [SEP]`).
#[allow(clippy::type_complexity)]
fn batch(
    tok: &Tokenizer,
    inputs: Inputs,
    max_length: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor, Vec<Vec<u32>>, Vec<usize>)> {
    inputs.check_pairs()?;
    let mut enc: Vec<(Vec<u32>, Vec<u32>)> = inputs
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| match inputs.second {
            Some(p) => tok.encode_pair(t, p[i]),
            None => tok.encode_with_special_tokens(t).map(|ids| {
                let n = ids.len();
                (ids, vec![0; n])
            }),
        })
        .collect::<Result<_>>()?;
    for (ids, types) in &mut enc {
        if ids.len() > max_length {
            let last = *ids.last().expect("non-empty");
            ids.truncate(max_length);
            types.truncate(max_length);
            *ids.last_mut().expect("non-empty") = last;
        }
    }
    let t = enc.iter().map(|e| e.0.len()).max().unwrap_or(1).max(1);
    let lens: Vec<usize> = enc.iter().map(|e| e.0.len()).collect();
    let mask = lens
        .iter()
        .map(|&n| (0..t).map(|j| u32::from(j < n)).collect())
        .collect();
    let pad = |v: &[u32]| {
        v.iter()
            .copied()
            .chain(std::iter::repeat(0))
            .take(t)
            .collect::<Vec<_>>()
    };
    let ids: Vec<u32> = enc.iter().flat_map(|e| pad(&e.0)).collect();
    let types: Vec<u32> = enc.iter().flat_map(|e| pad(&e.1)).collect();
    Ok((
        Tensor::from_vec(ids, (inputs.texts.len(), t), device)?,
        Tensor::from_vec(types, (inputs.texts.len(), t), device)?,
        mask,
        lens,
    ))
}

/// Logits of `texts` through the encoder (with `adapter`'s edits, if any) and `head`, at
/// inference (no dropout).
pub fn classify_logits(
    encoder: &Encoder,
    tok: &Tokenizer,
    adapter: Option<&mut Adapter>,
    head: &Head,
    inputs: Inputs,
    max_length: usize,
) -> Result<Tensor> {
    logits(encoder, tok, adapter, head, inputs, max_length, None)
}

/// [`classify_logits`], with the head's dropout on when `rng` is given (training).
fn logits(
    encoder: &Encoder,
    tok: &Tokenizer,
    adapter: Option<&mut Adapter>,
    head: &Head,
    inputs: Inputs,
    max_length: usize,
    rng: Option<&mut StdRng>,
) -> Result<Tensor> {
    let (hidden, mask) = hidden_states(encoder, tok, adapter, inputs, max_length)?;
    head.forward(&hidden, &mask, rng)
}

/// The last hidden states `[b, t, d]` of `inputs` as one padded batch (with `adapter`'s
/// edits, if any) and the real-token mask, what [`Head::forward`] reads: several heads can be
/// applied to one encoding.
pub fn hidden_states(
    encoder: &Encoder,
    tok: &Tokenizer,
    adapter: Option<&mut Adapter>,
    inputs: Inputs,
    max_length: usize,
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let dev = encoder.device().clone();
    let (ids, types, mask, lens) = batch(tok, inputs, max_length, &dev)?;
    let hidden = match adapter {
        Some(a) => {
            // Positions count over the whole input (`f1` is `[CLS]`).
            crate::model::Hooks::prepare(a, &PromptLayout::unpadded(lens))?;
            encoder.forward_with_types(&ids, Some(&types), Some(&mask), a)?
        }
        None => encoder.forward_with_types(&ids, Some(&types), Some(&mask), &mut NoHooks)?,
    };
    Ok((hidden, mask))
}

/// The head's [`pooled`](Head::pool) vectors of every input `[n, d]`, through the bare
/// encoder, in batches of `batch_size`.
fn frozen_features(
    encoder: &Encoder,
    tok: &Tokenizer,
    head: &Head,
    inputs: Inputs,
    batch_size: usize,
    max_length: usize,
) -> Result<Tensor> {
    by_length(inputs, batch_size, |chunk| {
        let (hidden, mask) = hidden_states(encoder, tok, None, chunk, max_length)?;
        Ok(head.pool(&hidden, &mask)?.to_dtype(DType::F32)?)
    })
}

/// Runs `f` on batches of at most `size` inputs of similar length (each batch is padded to its
/// longest input, so this pads less than file order) and returns its per-input rows
/// concatenated back in input order. At least one input.
fn by_length(
    inputs: Inputs,
    size: usize,
    mut f: impl FnMut(Inputs<'_>) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = inputs.texts.len();
    let len = |i: usize| inputs.texts[i].len() + inputs.second.map_or(0, |p| p[i].len());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| len(i));
    let mut parts = Vec::with_capacity(n.div_ceil(size.max(1)));
    for chunk in order.chunks(size.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|&i| inputs.texts[i]).collect();
        let second: Option<Vec<&str>> =
            inputs.second.map(|p| chunk.iter().map(|&i| p[i]).collect());
        parts.push(f(Inputs {
            texts: &texts,
            second: second.as_deref(),
        })?);
    }
    let sorted = Tensor::cat(&parts, 0)?;
    // Input i is row `at[i]` of the sorted result.
    let mut at = vec![0u32; n];
    for (row, &i) in order.iter().enumerate() {
        at[i] = row as u32;
    }
    Ok(sorted.index_select(&Tensor::from_vec(at, n, sorted.device())?, 0)?)
}

/// Predictions for `inputs`, in batches: classes, values or class sets as the head's problem
/// says.
pub fn predict(
    encoder: &Encoder,
    tok: &Tokenizer,
    mut adapter: Option<&mut Adapter>,
    head: &Head,
    inputs: Inputs,
    cfg: &ClassifyConfig,
) -> Result<Predictions> {
    // Before `by_length`, which pairs them up by index.
    inputs.check_pairs()?;
    if inputs.texts.is_empty() {
        return Ok(head.problem().decode_empty());
    }
    if let Some(a) = adapter.as_deref_mut() {
        a.set_training(false);
    }
    let logits = by_length(inputs, cfg.batch_size, |chunk| {
        let l = classify_logits(
            encoder,
            tok,
            adapter.as_deref_mut(),
            head,
            chunk,
            cfg.max_length,
        )?;
        Ok(l.to_dtype(DType::F32)?)
    })?;
    head.problem().decode(&logits)
}

/// Trains `head` (and `adapter`, when given) on `inputs` and `labels` with the loss of the
/// head's problem (which the labels must pose); returns each step's loss.
pub fn train_classifier(
    encoder: &Encoder,
    tok: &Tokenizer,
    mut adapter: Option<&mut Adapter>,
    head: &Head,
    inputs: Inputs,
    labels: Labels,
    cfg: &ClassifyConfig,
) -> Result<Vec<f64>> {
    let (texts, pairs) = (inputs.texts, inputs.second);
    if texts.is_empty()
        || texts.len() != labels.len()
        || pairs.is_some_and(|p| p.len() != texts.len())
    {
        return Err(Error::InvalidArgument(format!(
            "{} texts, {} labels and {} second texts: need the same number, at least one",
            texts.len(),
            labels.len(),
            pairs.map_or(texts.len(), <[&str]>::len)
        )));
    }
    if labels.problem() != head.problem() {
        return Err(Error::InvalidArgument(format!(
            "the head is for `{}` but the labels are for `{}`",
            head.problem(),
            labels.problem()
        )));
    }
    labels.validate(head.num_labels())?;
    let mut vars = head.vars();
    if let Some(a) = adapter.as_deref_mut() {
        a.set_training(true);
        vars.extend(a.vars());
    }
    let mut opt = AdamW::new(vars.clone(), cfg.optim)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    // Dropout has its own stream, so turning it on leaves the data order as it was.
    let mut dropout_rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(0x5eed));
    let mut order: Vec<usize> = (0..texts.len()).collect();
    let steps_per_epoch = texts.len().div_ceil(cfg.batch_size.max(1));
    let total = steps_per_epoch * cfg.epochs;
    let mut losses = Vec::with_capacity(total);
    let dev = head.device().clone();
    // Without interventions nothing before the head is trained: encode every input once.
    let features = if adapter.is_none() {
        Some(frozen_features(
            encoder,
            tok,
            head,
            inputs,
            cfg.batch_size,
            cfg.max_length,
        )?)
    } else {
        None
    };
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let out = match &features {
                Some(f) => {
                    let rows: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
                    let rows = Tensor::from_vec(rows, chunk.len(), &dev)?;
                    head.forward_pooled(&f.index_select(&rows, 0)?, Some(&mut dropout_rng))?
                }
                None => {
                    let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
                    let batch_pairs: Option<Vec<&str>> =
                        pairs.map(|p| chunk.iter().map(|&i| p[i]).collect());
                    logits(
                        encoder,
                        tok,
                        adapter.as_deref_mut(),
                        head,
                        Inputs {
                            texts: &batch_texts,
                            second: batch_pairs.as_deref(),
                        },
                        cfg.max_length,
                        Some(&mut dropout_rng),
                    )?
                }
            }
            .to_dtype(DType::F32)?;
            let targets = labels.targets(chunk, head.num_labels(), DType::F32, &dev)?;
            let loss = head.problem().loss(&out, &targets)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the loss became {value} at step {}",
                    losses.len() + 1
                )));
            }
            let mut grads = match adapter.as_deref() {
                Some(a) => a.backward(&loss)?,
                None => loss.backward()?,
            };
            clip_grad_norm(&mut grads, &vars, cfg.max_grad_norm)?;
            // Linear decay to zero, as the causal trainer's default.
            let lr = cfg.optim.lr * (1.0 - losses.len() as f64 / total as f64);
            opt.step(&grads, lr)?;
            losses.push(value);
        }
    }
    Ok(losses)
}
