//! Training adapters on causal LMs (SPEC §5, §7).
//!
//! Loss: mean next-token cross-entropy over response tokens, the LM head applied only at
//! labelled positions. Speed comes from what ReFT leaves frozen: each example's frozen prefix —
//! every layer below the lowest intervened one, and every position before the first edited one
//! at all layers — is computed once, kept (hidden states at the start layer, keys/values of the
//! prefix), and each step recomputes only the edited position onwards from the start layer.

pub mod classify;
pub mod optim;
pub mod prefix;
mod samples;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::data::Example;
use crate::load::LanguageModel;
use crate::model::llama::ForwardInput;
use crate::model::PromptLayout;
use crate::{Error, Result};

pub use optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
pub use prefix::{FrozenPass, PrefixCache, PrefixCaches};
pub use samples::{Sample, SAMPLE_TOKENS};

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// AdamW settings (peak learning rate, weight decay, …).
    pub optim: AdamWConfig,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Fraction of steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Seed of data order.
    pub seed: u64,
    /// Reuse each example's frozen prefix across steps (same losses, much faster).
    pub cache_prefix: bool,
    /// Memory budget of that cache in bytes; examples beyond it run in full.
    pub cache_budget_bytes: usize,
    /// Save a checkpoint every this many optimiser steps (and at the end).
    pub checkpoint_every: Option<usize>,
    /// Held-out prompts the adapter answers greedily after each epoch (reported with the epoch
    /// and appended to `samples.jsonl`); 0 for none.
    #[serde(default)]
    pub eval_samples: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 8,
            grad_accum: 1,
            optim: AdamWConfig::default(),
            schedule: Schedule::Linear,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            cache_prefix: true,
            cache_budget_bytes: 2 << 30,
            checkpoint_every: None,
            eval_samples: 0,
        }
    }
}

/// One optimiser step's record (a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimiser step.
    pub step: usize,
    /// Epochs completed, fractional.
    pub epoch: f64,
    /// Mean loss over the step's response tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Response tokens in the step.
    pub tokens: usize,
    /// Wall time of the step.
    pub step_time_s: f64,
}

/// What [`Trainer::run`] reports as it goes.
pub enum Event<'a> {
    /// An optimiser step finished.
    Step(&'a StepMetrics),
    /// An epoch finished, with the held-out loss if there is held-out data.
    Epoch {
        /// The epoch just finished (1-based).
        epoch: usize,
        /// Mean held-out loss.
        eval_loss: Option<f64>,
        /// Held-out prompts answered by the adapter (`TrainConfig::eval_samples` of them).
        samples: &'a [Sample],
    },
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// Trains one adapter on examples.
pub struct Trainer<'a> {
    lm: &'a LanguageModel,
    /// The adapter being trained.
    pub adapter: Adapter,
    opt: AdamW,
    cfg: TrainConfig,
    train: Vec<Example>,
    eval: Vec<Example>,
    caches: PrefixCaches,
    step: usize,
    /// Every step so far.
    pub metrics: Vec<StepMetrics>,
    out: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainConfig,
    metrics: Vec<StepMetrics>,
}

impl<'a> Trainer<'a> {
    /// A trainer for `adapter` on `train` (and `eval`, held out).
    pub fn new(
        lm: &'a LanguageModel,
        adapter: Adapter,
        train: Vec<Example>,
        eval: Vec<Example>,
        cfg: TrainConfig,
    ) -> Result<Self> {
        let caches = match cfg.cache_prefix {
            true => PrefixCache::build_all(lm, &adapter, &train, cfg.cache_budget_bytes)?,
            false => PrefixCaches::new((0..train.len()).map(|_| None).collect()),
        };
        Self::with_caches(lm, adapter, train, eval, cfg, caches)
    }

    /// A trainer that uses `caches`, built by [`PrefixCache::build_all`] for `train` and an
    /// adapter with the same [`PrefixCache::key`] on every example as `adapter` (refused
    /// otherwise): trials of a sweep share them instead of each running the frozen model.
    pub fn with_caches(
        lm: &'a LanguageModel,
        mut adapter: Adapter,
        train: Vec<Example>,
        eval: Vec<Example>,
        cfg: TrainConfig,
        caches: PrefixCaches,
    ) -> Result<Self> {
        if caches.len() != train.len() {
            return Err(Error::InvalidArgument(format!(
                "{} prefix caches for {} training examples",
                caches.len(),
                train.len()
            )));
        }
        for (i, (c, ex)) in caches.iter().zip(&train).enumerate() {
            if let Some(c) = c {
                if PrefixCache::key(lm, &adapter, ex)? != (c.start_layer, c.p0) {
                    return Err(Error::InvalidArgument(format!(
                        "the prefix cache of training example {i} was built for another start \
                         layer or first position"
                    )));
                }
            }
        }
        if train.is_empty() {
            return Err(Error::InvalidArgument("the training set is empty".into()));
        }
        if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.epochs == 0 {
            return Err(Error::InvalidArgument(
                "epochs, batch size and accumulation must be ≥ 1".into(),
            ));
        }
        adapter.set_training(true);
        let opt = AdamW::new(adapter.vars(), cfg.optim)?;
        Ok(Self {
            lm,
            adapter,
            opt,
            cfg,
            train,
            eval,
            caches,
            step: 0,
            metrics: Vec::new(),
            out: None,
        })
    }

    /// Writes `metrics.jsonl`, checkpoints and the final adapter under `dir`.
    pub fn with_output(mut self, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.out = Some(dir.to_path_buf());
        Ok(self)
    }

    fn micro_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    /// Optimiser steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.micro_per_epoch().div_ceil(self.cfg.grad_accum)
    }

    /// Optimiser steps in the whole run.
    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    /// Steps already taken (after a resume, the checkpoint's).
    pub fn step(&self) -> usize {
        self.step
    }

    fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.train.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.cfg.seed.wrapping_add(epoch as u64));
        idx.shuffle(&mut rng);
        idx
    }

    /// Summed cross-entropy over the response tokens of examples `idx` (a graph when
    /// training), and their number. The examples run as one batch: each one's frozen prefix
    /// (cached keys/values, left-padded to the longest) is followed by its recomputed tail
    /// (right-padded), with masks and per-example positions, so the frozen weights are streamed
    /// once per batch rather than once per example.
    fn batch_loss(&mut self, idx: &[usize], set: Set) -> Result<(Tensor, usize)> {
        let exs: Vec<&Example> = idx
            .iter()
            .map(|&i| match set {
                Set::Train => &self.train[i],
                Set::Eval => &self.eval[i],
            })
            .collect();
        let caches: Vec<Option<&PrefixCache>> = idx
            .iter()
            .map(|&i| match set {
                Set::Train => self.caches[i].as_ref(),
                Set::Eval => None,
            })
            .collect();
        let cached = caches.iter().all(Option::is_some);
        let dev = self.lm.decoder.device().clone();
        let n_layers = self.lm.decoder.config().num_layers;
        let b = exs.len();
        let p0: Vec<usize> = caches
            .iter()
            .map(|c| if cached { c.map_or(0, |c| c.p0) } else { 0 })
            .collect();
        let p0max = p0.iter().copied().max().unwrap_or(0);
        // The last token predicts nothing and nothing attends to it: it is not run.
        let ids: Vec<Vec<u32>> = exs
            .iter()
            .map(|e| {
                let mut v = e.ids();
                if !e.response_ids.is_empty() {
                    v.pop();
                }
                v
            })
            .collect();
        let tails: Vec<usize> = ids.iter().zip(&p0).map(|(v, &p)| v.len() - p).collect();
        let t = tails.iter().copied().max().unwrap_or(0);
        let mut flat_ids = Vec::with_capacity(b * t);
        for (v, &p) in ids.iter().zip(&p0) {
            flat_ids.extend(v[p..].iter().copied().chain(std::iter::repeat(0)).take(t));
        }
        let input_ids = Tensor::from_vec(flat_ids, (b, t), &dev)?;
        let mask: Vec<Vec<u32>> = (0..b)
            .map(|bi| {
                (0..p0max + t)
                    .map(|j| {
                        u32::from(if j < p0max {
                            j >= p0max - p0[bi]
                        } else {
                            j - p0max < tails[bi]
                        })
                    })
                    .collect()
            })
            .collect();
        let positions: Vec<Vec<u32>> = (0..b)
            .map(|bi| (0..t).map(|c| (p0[bi] + c) as u32).collect())
            .collect();
        let start_layer = if cached {
            caches[0].map_or(0, |c| c.start_layer)
        } else {
            0
        };
        let hidden = match (cached, start_layer) {
            (true, l) if l > 0 => {
                let rows = caches
                    .iter()
                    .zip(&tails)
                    .map(|(c, &len)| {
                        let h = c.and_then(|c| c.hidden.as_ref()).ok_or_else(|| {
                            Error::InvalidArgument("prefix cache without hidden states".into())
                        })?;
                        Ok(h.narrow(1, 0, len)?.pad_with_zeros(1, 0, t - len)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&rows, 0)?)
            }
            _ => None,
        };
        let mut kv = if cached && p0max > 0 {
            let mut layers = Vec::with_capacity(n_layers);
            for l in 0..n_layers {
                if l < start_layer {
                    layers.push(None);
                    continue;
                }
                let mut ks = Vec::with_capacity(b);
                let mut vs = Vec::with_capacity(b);
                for (bi, c) in caches.iter().enumerate() {
                    let (k, v) = c.and_then(|c| c.kv.layer(l)).ok_or_else(|| {
                        Error::InvalidArgument(format!("prefix cache misses layer {l}"))
                    })?;
                    ks.push(k.pad_with_zeros(2, p0max - p0[bi], 0)?);
                    vs.push(v.pad_with_zeros(2, p0max - p0[bi], 0)?);
                }
                layers.push(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)));
            }
            crate::model::KvCache::from_layers(layers).read_only()
        } else {
            crate::model::KvCache::new(n_layers)
        };
        let layout = PromptLayout {
            prompt_lens: exs.iter().map(|e| e.prompt_ids.len()).collect(),
            left_pad: p0.iter().map(|&p| p0max - p).collect(),
        };
        self.adapter.set_layout(&layout)?;
        let input = ForwardInput {
            input_ids: &input_ids,
            attention_mask: Some(&mask),
            position_ids: Some(&positions),
            start: hidden.as_ref().map(|h| (start_layer, h)),
        };
        let h = self
            .lm
            .decoder
            .forward(&input, &mut self.adapter, Some(&mut kv))?;
        // Logits only where a label exists: position q predicts token q + 1.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, e) in exs.iter().enumerate() {
            let first = e.prompt_ids.len() - 1 - p0[bi];
            rows.extend((0..e.response_ids.len()).map(|k| (bi * t + first + k) as u32));
            targets.extend_from_slice(&e.response_ids);
        }
        let n = rows.len();
        let d = h.dim(2)?;
        let picked = h
            .reshape((b * t, d))?
            .index_select(&Tensor::from_vec(rows, n, &dev)?, 0)?;
        let r = self.lm.decoder.head_loss(&picked, &targets)?;
        Ok((r, n))
    }

    /// Splits a micro-batch into groups of similar recomputed length, so that one long
    /// example does not pad every other one to its length (at most ~30 % padding per group),
    /// unless the model's fused layers skip padding anyway.
    fn length_groups(&self, idx: &[usize], set: Set) -> Vec<Vec<usize>> {
        if self.lm.decoder.runs_fused_layers() {
            // Padding costs nothing there: padding rows are skipped.
            return vec![idx.to_vec()];
        }
        let len = |i: usize| -> usize {
            match set {
                Set::Train => {
                    let e = &self.train[i];
                    e.prompt_ids.len() + e.response_ids.len()
                        - self.caches[i].as_ref().map_or(0, |c| c.p0)
                }
                Set::Eval => self.eval[i].prompt_ids.len() + self.eval[i].response_ids.len(),
            }
        };
        let mut sorted: Vec<(usize, usize)> = idx.iter().map(|&i| (len(i), i)).collect();
        sorted.sort_unstable();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let (mut sum, mut count) = (0usize, 0usize);
        for (l, i) in sorted {
            let fits = count > 0 && (l * (count + 1)) as f64 <= 1.3 * (sum + l) as f64;
            if !fits {
                groups.push(Vec::new());
                sum = 0;
                count = 0;
            }
            groups.last_mut().expect("a group was just pushed").push(i);
            sum += l;
            count += 1;
        }
        groups
    }

    /// Mean held-out loss (no graph), if there is held-out data.
    pub fn eval_loss(&mut self) -> Result<Option<f64>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        self.adapter.set_training(false);
        self.adapter.refresh_params()?;
        let (mut sum, mut n) = (0f64, 0usize);
        let result = (|| -> Result<()> {
            let all: Vec<usize> = (0..self.eval.len()).collect();
            for chunk in all.chunks(self.cfg.batch_size) {
                for group in self.length_groups(chunk, Set::Eval) {
                    let (l, t) = self.batch_loss(&group, Set::Eval)?;
                    sum += l.to_scalar::<f32>()? as f64;
                    n += t;
                }
            }
            Ok(())
        })();
        self.adapter.set_training(true);
        result?;
        Ok(Some(sum / n.max(1) as f64))
    }

    /// Mean loss on `examples` instead of the held-out set given at construction (a sweep
    /// scores its dev split only at its rungs, not after every epoch).
    pub fn eval_loss_on(&mut self, examples: Vec<Example>) -> Result<Option<f64>> {
        let held_out = std::mem::replace(&mut self.eval, examples);
        let out = self.eval_loss();
        self.eval = held_out;
        out
    }

    /// Each example's summed cross-entropy over its response tokens (its negative
    /// log-likelihood), with the adapter in inference mode, using `caches` (built for these
    /// examples and this adapter's key, as [`FrozenPass::caches`] gives them): a sweep scores
    /// multiple-choice options this way, each a short tail over a cached question.
    pub fn summed_losses(
        &mut self,
        examples: Vec<Example>,
        caches: PrefixCaches,
    ) -> Result<Vec<f64>> {
        if caches.len() != examples.len() {
            return Err(Error::InvalidArgument(format!(
                "{} prefix caches for {} examples",
                caches.len(),
                examples.len()
            )));
        }
        let train = std::mem::replace(&mut self.train, examples);
        let own = std::mem::replace(&mut self.caches, caches);
        self.adapter.set_training(false);
        let result = (|| -> Result<Vec<f64>> {
            self.adapter.refresh_params()?;
            (0..self.train.len())
                .map(|i| Ok(self.batch_loss(&[i], Set::Train)?.0.to_scalar::<f32>()? as f64))
                .collect()
        })();
        self.adapter.set_training(true);
        self.train = train;
        self.caches = own;
        result
    }

    /// One optimiser step over the given micro-batches of example indices.
    fn optimiser_step(&mut self, micro: &[Vec<usize>], epoch_progress: f64) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let vars = self.adapter.vars();
        let mut acc: Option<candle_core::backprop::GradStore> = None;
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for batch in micro {
            self.adapter.refresh_params()?;
            let mut total: Option<Tensor> = None;
            let mut n = 0;
            for group in self.length_groups(batch, Set::Train) {
                let (l, k) = self.batch_loss(&group, Set::Train)?;
                n += k;
                total = Some(match total {
                    Some(t) => (t + l)?,
                    None => l,
                });
            }
            let total = total.ok_or_else(|| Error::InvalidArgument("empty micro-batch".into()))?;
            let value = total.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the loss became {value} at step {}: training stopped; the last checkpoint is kept",
                    self.step + 1
                )));
            }
            loss_sum += value;
            tokens += n;
            let loss = (total / (n as f64 * micro.len() as f64))?;
            let grads = self.adapter.backward(&loss)?;
            acc = Some(match acc {
                None => grads,
                Some(mut a) => {
                    for (_, v) in &vars {
                        if let (Some(x), Some(y)) = (a.get(v.as_tensor()), grads.get(v.as_tensor()))
                        {
                            let s = (x + y)?;
                            a.insert(v.as_tensor(), s);
                        }
                    }
                    a
                }
            });
        }
        let mut grads = acc.ok_or_else(|| Error::InvalidArgument("no micro-batch".into()))?;
        for (name, v) in &vars {
            if grads.get(v.as_tensor()).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "trainable tensor `{name}` received no gradient (is its intervention's layer or position reached?)"
                )));
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, &vars, self.cfg.max_grad_norm)?;
        let total = self.total_steps();
        let warmup = (self.cfg.warmup_ratio * total as f64).ceil() as usize;
        let lr = self.cfg.optim.lr * self.cfg.schedule.factor(self.step, total, warmup);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            epoch: epoch_progress,
            loss: loss_sum / tokens.max(1) as f64,
            lr,
            grad_norm,
            tokens,
            step_time_s: t0.elapsed().as_secs_f64(),
        })
    }

    /// Runs to the end (or until `stop()` says so between steps), reporting through `on_event`.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event), stop: &dyn Fn() -> bool) -> Result<()> {
        self.run_until(self.total_steps(), on_event, stop)
    }

    /// Runs until `steps` optimiser steps are taken (at most the whole run), on the whole
    /// run's schedule: a sweep trains a trial to each early-stopping rung this way and scores
    /// it in between. The adapter is saved (with an output folder) when the run ends or stops.
    pub fn run_until(
        &mut self,
        steps: usize,
        on_event: &mut dyn FnMut(Event),
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let spe = self.steps_per_epoch();
        let total = self.total_steps();
        let end = steps.min(total);
        while self.step < end {
            let epoch = self.step / spe;
            let in_epoch = self.step % spe;
            let order = self.order(epoch);
            let micro: Vec<Vec<usize>> = order
                .chunks(self.cfg.batch_size)
                .map(<[usize]>::to_vec)
                .collect();
            let group: Vec<Vec<usize>> = micro
                .iter()
                .skip(in_epoch * self.cfg.grad_accum)
                .take(self.cfg.grad_accum)
                .cloned()
                .collect();
            let progress = epoch as f64 + (in_epoch + 1) as f64 / spe as f64;
            let m = self.optimiser_step(&group, progress)?;
            self.append_metrics(&m)?;
            on_event(Event::Step(&m));
            self.metrics.push(m);
            if self.step.is_multiple_of(spe) {
                let epoch = self.step / spe;
                let eval_loss = self.eval_loss()?;
                let samples = self.eval_samples(self.cfg.eval_samples, epoch)?;
                self.append_jsonl("samples.jsonl", &samples)?;
                on_event(Event::Epoch {
                    epoch,
                    eval_loss,
                    samples: &samples,
                });
            }
            let due = self
                .cfg
                .checkpoint_every
                .is_some_and(|k| k > 0 && self.step.is_multiple_of(k));
            if due || self.step == total || stop() {
                if let Some(dir) = self.checkpoint()? {
                    on_event(Event::Checkpoint(&dir));
                }
            }
            if stop() {
                break;
            }
        }
        if let Some(out) = self.out.as_ref().filter(|_| self.step == total || stop()) {
            self.adapter.save(out)?;
        }
        Ok(())
    }

    fn append_metrics(&self, m: &StepMetrics) -> Result<()> {
        self.append_jsonl("metrics.jsonl", std::slice::from_ref(m))
    }

    /// Appends one JSON line per item to `name` in the output folder, if there is one.
    fn append_jsonl<T: Serialize>(&self, name: &str, items: &[T]) -> Result<()> {
        let Some(out) = &self.out else { return Ok(()) };
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        for item in items {
            let line =
                serde_json::to_string(item).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Writes `checkpoint-<step>/` (adapter, optimiser state with the raw parameters, trainer
    /// state) under the output folder; returns its path.
    pub fn checkpoint(&self) -> Result<Option<PathBuf>> {
        let Some(out) = &self.out else {
            return Ok(None);
        };
        let dir = out.join(format!("checkpoint-{}", self.step));
        self.adapter.save(&dir)?;
        let (mut tensors, opt_step) = self.opt.state();
        for (n, v) in self.adapter.vars() {
            tensors.push((format!("param.{n}"), v.as_tensor().clone()));
        }
        for (n, t) in self.adapter.bases() {
            tensors.push((format!("param.{n}"), t));
        }
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
            .map_err(|e| Error::InvalidArgument(format!("serialising optimiser state: {e}")))?;
        crate::adapter::native::write_atomic(&dir.join("optimizer.safetensors"), &bytes)?;
        let state = TrainerState {
            step: self.step,
            config: self.cfg.clone(),
            metrics: self.metrics.clone(),
        };
        debug_assert_eq!(opt_step as usize, self.step);
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        crate::adapter::native::write_atomic(&dir.join("trainer_state.json"), json.as_bytes())?;
        Ok(Some(dir))
    }

    /// Continues from a checkpoint written by [`checkpoint`](Self::checkpoint): parameters
    /// (raw, exactly), optimiser moments, step and metrics.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: sp.clone(),
            msg: e.to_string(),
        })?;
        let op = dir.join("optimizer.safetensors");
        let tensors =
            candle_core::safetensors::load(&op, self.lm.decoder.device()).map_err(|e| {
                Error::BadWeights {
                    path: op.clone(),
                    msg: e.to_string(),
                }
            })?;
        for (n, v) in self.adapter.vars() {
            let t = tensors
                .get(&format!("param.{n}"))
                .ok_or_else(|| Error::BadWeights {
                    path: op.clone(),
                    msg: format!("no `param.{n}`: the checkpoint is for another adapter"),
                })?;
            v.set(t)?;
        }
        for (n, _) in self.adapter.bases() {
            let t = tensors
                .get(&format!("param.{n}"))
                .ok_or_else(|| Error::BadWeights {
                    path: op.clone(),
                    msg: format!("no `param.{n}`"),
                })?;
            self.adapter.set_base(&n, t)?;
        }
        self.opt.restore(&tensors, state.step as u64)?;
        self.step = state.step;
        self.metrics = state.metrics;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Set {
    Train,
    Eval,
}
